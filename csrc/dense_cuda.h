// C interface of the dense-block ops' CUDA kernels (dense_cuda.cu).
//
// Plain C: neither torch nor CUDA headers, so the C++ side (bindings,
// compiled against a CPU or a CUDA build of torch) and nvcc meet here. The
// caller owns every allocation (torch's caching allocator) and passes raw
// pointers, element strides and the stream; nothing here synchronizes with
// the host. Every function returns 0 or a cudaError_t code
// (fastres_cuda_error_string gives its text). When fastres._C is built
// without a CUDA toolkit, no_cuda.cpp defines the same functions, returning
// FASTRES_NOT_BUILT.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { FASTRES_FLOAT32 = 0, FASTRES_FLOAT64 = 1, FASTRES_FLOAT16 = 2, FASTRES_BFLOAT16 = 3 };

enum {
  FASTRES_NOT_BUILT = -1,    // fastres._C was built without its CUDA kernels
  FASTRES_TOO_LARGE = -2,    // more than 65535 channels, or 2^31 positions per channel
};

// A [N, C, H, W] tensor with H and W merged into P = H * W: element (n, c, p)
// at data + n * sn + c * sc + p * sp (in elements).
typedef struct {
  void* data;
  int64_t sn, sc, sp;
} fastres_view;

// What every call shares: the sizes, the element type of the x-shaped
// tensors, and where to run (a device ordinal and a cudaStream_t).
typedef struct {
  int64_t n, c, p;
  int dtype;
  int device;
  void* stream;
} fastres_problem;

// Per-channel inputs: contiguous [C] arrays in the math type (double for
// float64 x, float otherwise). weight and bias may be NULL (1 and 0); sum_g
// and sum_gx are read by the training input gradient only.
typedef struct {
  const void *mean, *rstd, *weight, *bias, *sum_g, *sum_gx;
} fastres_channels;

const char* fastres_cuda_error_string(int code);

// The number of devices the CUDA runtime sees (0 and an error code when none).
int fastres_cuda_device_count(int* count);

// How many partial results per channel a reduction over these tensors
// writes: the caller allocates [parts, k, C] doubles (k = 3 for moments, 2 for
// the gradient sums). The same tensors must be passed to the reduction.
int fastres_cuda_reduce_parts(const fastres_problem* pr, const fastres_view* x,
                              const fastres_view* grad_out, int64_t* parts);

// The plan of a call over these tensors (x first; the others, or NULL, as
// the op passes them): its iteration (1: channels innermost, 0: by rows), its
// elements per access, and its parts per channel. Any output may be NULL.
int fastres_cuda_plan(const fastres_problem* pr, const fastres_view* x, const fastres_view* second,
                      const fastres_view* third, int* channels_layout, int* vec, int64_t* parts);

// Partial moments of x: [parts, 3, C] doubles, rows sum, M2 and count.
int fastres_cuda_moments(const fastres_problem* pr, const fastres_view* x, double* partials,
                         int64_t parts);

// Merges [parts, 3, C] moments (a reduction's partials, or every process's
// moments gathered). With moments_out: the merged [3, C] moments. Else mean and
// rstd ([C], math type) and, when running_mean and running_var are not NULL
// ([C], math type), the running statistics' update.
int fastres_cuda_finish_moments(const fastres_problem* pr, const double* moments, int64_t parts,
                                double momentum, double eps, void* running_mean,
                                void* running_var, void* mean, void* rstd, double* moments_out);

// Eval: mean = running_mean, rstd = 1 / sqrt(running_var + eps) (all [C], math type).
int fastres_cuda_running_stats(const fastres_problem* pr, const void* running_mean,
                               const void* running_var, double eps, void* mean, void* rstd);

// out = relu((x - mean) * rstd * weight + bias).
int fastres_cuda_bn_relu_forward(const fastres_problem* pr, const fastres_view* x,
                                 const fastres_channels* ch, const fastres_view* out);

// Partial sums of g and g * (x - mean), g the gradient through the ReLU:
// [parts, 2, C] doubles.
int fastres_cuda_grad_sums(const fastres_problem* pr, const fastres_view* grad_out,
                           const fastres_view* x, const fastres_channels* ch, double* partials,
                           int64_t parts);

// Sums [parts, 2, C] partials into sum_g and sum_gx ([C], math type).
int fastres_cuda_finish_sums(const fastres_problem* pr, const double* partials, int64_t parts,
                             void* sum_g, void* sum_gx);

// grad_in += dx (training: through the batch statistics, with sum_g and sum_gx
// over m = N * P elements).
int fastres_cuda_bn_relu_backward_input(const fastres_problem* pr, const fastres_view* grad_out,
                                        const fastres_view* x, const fastres_channels* ch,
                                        const fastres_view* grad_in, int training);

#ifdef __cplusplus
}
#endif
