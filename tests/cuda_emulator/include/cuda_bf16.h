// bfloat16 for the host CUDA emulator (cuda_runtime.h here): the storage type
// and the conversions dense_cuda.cu uses, rounded as torch rounds
// (c10::BFloat16: round to nearest even), as __float2bfloat16_rn does on a GPU.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

struct __nv_bfloat16 {
  std::uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.x, c10::BFloat16::from_bits()));
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{c10::BFloat16(f).x}; }
