// Stand-ins for the launchers of dense_cuda.cu, linked when fastres._C is
// built without nvcc (FASTRES_CUDA=0, or no toolkit). bindings.cpp asks
// fastres_cuda_kernels_compiled() first and raises before calling any launcher.

#include "dense_cuda.h"

namespace {
constexpr int kNotCompiled = -1;
}

extern "C" {

int fastres_cuda_kernels_compiled(void) { return 0; }

const char* fastres_cuda_error_string(int) {
  return "fastres._C was built without its CUDA kernels";
}

int fastres_cuda_device_count(int* count) {
  *count = 0;
  return kNotCompiled;
}

int64_t fastres_cuda_reduce_workspace_bytes(int, FastresShape, FastresStrides) { return 0; }

int fastres_cuda_batch_stats(int, cudaStream_t, int, FastresShape, const void*, FastresStrides,
                             void*, void*, double, double, void*, void*, void*) {
  return kNotCompiled;
}

int fastres_cuda_bn_relu_forward(int, cudaStream_t, int, FastresShape, const void*,
                                 FastresStrides, const void*, const void*, const void*,
                                 const void*, void*, FastresStrides) {
  return kNotCompiled;
}

int fastres_cuda_bn_relu_backward_reduce(int, cudaStream_t, int, FastresShape, const void*,
                                         FastresStrides, const void*, FastresStrides,
                                         const void*, const void*, const void*, const void*,
                                         void*, void*, void*) {
  return kNotCompiled;
}

int fastres_cuda_bn_relu_backward_input(int, cudaStream_t, int, FastresShape, const void*,
                                        FastresStrides, const void*, FastresStrides,
                                        const void*, const void*, const void*, const void*,
                                        const void*, const void*, void*, FastresStrides, int) {
  return kNotCompiled;
}

}  // extern "C"
