// dense_cuda.h's functions when fastres._C is built without a CUDA toolkit:
// each reports FASTRES_NOT_BUILT, which the bindings turn into an error that
// says so (CUDA tensors then run the Triton kernels or eager PyTorch).
#include "dense_cuda.h"

extern "C" {

const char* fastres_cuda_error_string(int) {
  return "fastres._C was built without its CUDA kernels (no CUDA toolkit at install time, or "
         "FASTRES_CUDA=0): reinstall with nvcc on PATH or CUDA_HOME set";
}

int fastres_cuda_device_count(int* count) {
  *count = 0;
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_reduce_parts(const fastres_problem*, const fastres_view*, const fastres_view*,
                              int64_t*) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_plan(const fastres_problem*, const fastres_view*, const fastres_view*,
                      const fastres_view*, int*, int*, int64_t*) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_moments(const fastres_problem*, const fastres_view*, double*, int64_t) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_finish_moments(const fastres_problem*, const double*, int64_t, double, double,
                                void*, void*, void*, void*, double*) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_running_stats(const fastres_problem*, const void*, const void*, double, void*,
                               void*) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_bn_relu_forward(const fastres_problem*, const fastres_view*,
                                 const fastres_channels*, const fastres_view*) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_grad_sums(const fastres_problem*, const fastres_view*, const fastres_view*,
                           const fastres_channels*, double*, int64_t) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_finish_sums(const fastres_problem*, const double*, int64_t, void*, void*) {
  return FASTRES_NOT_BUILT;
}

int fastres_cuda_bn_relu_backward_input(const fastres_problem*, const fastres_view*,
                                        const fastres_view*, const fastres_channels*,
                                        const fastres_view*, int) {
  return FASTRES_NOT_BUILT;
}

}  // extern "C"
