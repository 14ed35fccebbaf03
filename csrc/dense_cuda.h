// extern "C" launchers of the CUDA kernels for DenseNet's shared-storage ops.
//
// Plain C types only: the C++ side includes this header without the CUDA
// toolkit, and the .cu includes no torch headers. Every launcher takes the
// device index and the stream (torch's current stream on that device), runs
// asynchronously on it, and returns a cudaError_t value (0 on success).
//
// A tensor is seen as [N, C, HW] through its three element strides; the
// per-channel vectors (mean, rstd, weight, bias, sum_g, sum_gx and the running
// statistics) are contiguous [C] in the accumulation type (double for float64
// x, float otherwise). The kernels take 16-byte vectors along the innermost
// axis when every tensor of an op allows it (stride 1 there, the other strides
// and the extent multiples of the vector, 16-byte aligned data), else single
// elements; the launchers decide from the pointers and strides they are given.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_runtime_api.h>
#else
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;  // the same typedef as CUDA's driver_types.h
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Scalar type of x (and grad_out, out, grad_in).
enum FastresDtype {
  FASTRES_FLOAT32 = 0,
  FASTRES_FLOAT64 = 1,
  FASTRES_FLOAT16 = 2,
  FASTRES_BFLOAT16 = 3,
};

typedef struct {
  int64_t n, c, hw;  // N, C, H*W
} FastresShape;

typedef struct {
  int64_t n, c, hw;  // element strides along N, C and the merged H*W
} FastresStrides;

// 1 when the kernels were compiled in (dense_cuda.cu), 0 from the stub.
int fastres_cuda_kernels_compiled(void);

// The runtime's message for an error code returned by a launcher.
const char* fastres_cuda_error_string(int error);

// cudaGetDeviceCount; returns the error (no driver, no device) instead of crashing.
int fastres_cuda_device_count(int* count);

// Bytes of device scratch the two reductions over x need (per-chunk partials):
// enough for either choice of vector width.
int64_t fastres_cuda_reduce_workspace_bytes(int dtype, FastresShape shape,
                                            FastresStrides x_strides);

// Per-channel batch statistics of x: mean and rstd = 1 / sqrt(var + eps), var
// the biased variance. When running_mean and running_var are not NULL they are
// updated in place: running = (1 - momentum) * running + momentum * batch, with
// the unbiased variance var * m / (m - 1) (m = N * H * W).
int fastres_cuda_batch_stats(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* x, FastresStrides x_strides,
    void* running_mean, void* running_var,  // [C] or NULL (both or neither)
    double momentum, double eps,
    void* mean, void* rstd,  // outputs [C]
    void* workspace);        // fastres_cuda_reduce_workspace_bytes bytes

// out = relu((x - mean) * rstd * weight + bias); weight/bias may be NULL (1, 0).
int fastres_cuda_bn_relu_forward(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* x, FastresStrides x_strides,
    const void* mean, const void* rstd, const void* weight, const void* bias,
    void* out, FastresStrides out_strides);

// sum_g = sum(g), sum_gx = sum(g * (x - mean)), g = grad_out where not (y <= 0).
int fastres_cuda_bn_relu_backward_reduce(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* grad_out, FastresStrides grad_out_strides,
    const void* x, FastresStrides x_strides,
    const void* mean, const void* rstd, const void* weight, const void* bias,
    void* sum_g, void* sum_gx,  // outputs [C]
    void* workspace);           // fastres_cuda_reduce_workspace_bytes bytes

// grad_in += dx (training: through the batch statistics; eval: g * weight * rstd).
int fastres_cuda_bn_relu_backward_input(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* grad_out, FastresStrides grad_out_strides,
    const void* x, FastresStrides x_strides,
    const void* mean, const void* rstd, const void* weight, const void* bias,
    const void* sum_g, const void* sum_gx,
    void* grad_in, FastresStrides grad_in_strides, int training);

#ifdef __cplusplus
}
#endif
