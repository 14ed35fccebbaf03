// Kernels with the defects the CUDA emulator must report (tests/test_cuda_emulator.py),
// and one whose result depends on the order threads run in. Each entry point
// launches one and returns cudaGetLastError().
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 64;

// 16-byte loads and stores; the last block's are src_skew and dst_skew bytes further on.
__global__ void copy_vectors(const char* src, char* dst, int src_skew, int dst_skew) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool last = blockIdx.x + 1 == gridDim.x;
  const uint4 v = *reinterpret_cast<const uint4*>(src + 16 * i + (last ? src_skew : 0));
  __stwb(reinterpret_cast<uint4*>(dst + 16 * i + (last ? dst_skew : 0)), v);
}

// No barrier in the first block (so the emulator runs later blocks' threads as plain calls).
__global__ void barrier_after_the_first_block(int* out) {
  if (blockIdx.x > 0) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

__global__ void early_exit_before_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void early_exit_before_shuffle(float* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void warp_sums(const float* in, float* out) {  // a correct shuffle tree
  float v = in[blockIdx.x * kThreads + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) out[blockIdx.x * 2 + threadIdx.x / 32] = v;
}

// Thread i reads what thread 63 - i writes, with (barrier = 1) or without a barrier between.
__global__ void neighbour(int barrier, int seed, int* out) {
  __shared__ int cell[kThreads];
  cell[threadIdx.x] = seed + int(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = cell[kThreads - 1 - threadIdx.x];
}

}  // namespace

extern "C" {

int emulated_copy(const char* src, char* dst, int blocks, int src_skew, int dst_skew) {
  FASTRES_LAUNCH(copy_vectors, blocks, kThreads, nullptr)(src, dst, src_skew, dst_skew);
  return cudaGetLastError();
}

int emulated_barrier_after_the_first_block(int* out, int blocks) {
  FASTRES_LAUNCH(barrier_after_the_first_block, blocks, kThreads, nullptr)(out);
  return cudaGetLastError();
}

int emulated_early_exit_before_barrier(int* out, int blocks) {
  FASTRES_LAUNCH(early_exit_before_barrier, blocks, kThreads, nullptr)(out);
  return cudaGetLastError();
}

int emulated_early_exit_before_shuffle(float* out, int blocks) {
  FASTRES_LAUNCH(early_exit_before_shuffle, blocks, kThreads, nullptr)(out);
  return cudaGetLastError();
}

int emulated_warp_sums(const float* in, float* out, int blocks) {
  FASTRES_LAUNCH(warp_sums, blocks, kThreads, nullptr)(in, out);
  return cudaGetLastError();
}

int emulated_neighbour(int barrier, int seed, int* out) {
  FASTRES_LAUNCH(neighbour, 1, kThreads, nullptr)(barrier, seed, out);
  return cudaGetLastError();
}

int emulated_launch_empty_grid() {
  FASTRES_LAUNCH(neighbour, 0, kThreads, nullptr)(1, 0, nullptr);
  return cudaGetLastError();
}

const char* emulated_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
