// float16 for the host CUDA emulator (cuda_runtime.h here): the storage type
// and the conversions dense_cuda.cu uses, rounded as torch rounds (c10::Half:
// round to nearest even), as __float2half_rn does on a GPU.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

struct __half {
  std::uint16_t x;
};

inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }

inline __half __float2half_rn(float f) { return __half{c10::Half(f).x}; }
