// extern "C" launchers of the CUDA kernels for DenseNet's shared-storage ops.
//
// Plain C types only: the C++ side includes this header without the CUDA
// toolkit, and the .cu includes no torch headers. Every launcher takes the
// device index and the stream (torch's current stream on that device), runs
// asynchronously on it, and returns a cudaError_t value (0 on success).
//
// A tensor is seen as [N, C, HW] through its three element strides; the
// per-channel vectors are contiguous [C] in the accumulation type (double for
// float64 x, float otherwise).
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

// Bytes of device scratch the two reductions over x need (per-chunk partials).
int64_t fastres_cuda_reduce_workspace_bytes(int dtype, FastresShape shape,
                                            FastresStrides x_strides);

// Per-channel mean and biased variance of x.
int fastres_cuda_batch_stats(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* x, FastresStrides x_strides,
    void* mean, void* var,  // outputs [C]
    void* workspace);       // fastres_cuda_reduce_workspace_bytes bytes

// out = relu((x - mean) * invstd * weight + bias); weight/bias may be NULL (1, 0).
int fastres_cuda_bn_relu_forward(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* x, FastresStrides x_strides,
    const void* mean, const void* invstd, const void* weight, const void* bias,
    void* out, FastresStrides out_strides);

// sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)), dy = grad_out where not (y <= 0).
int fastres_cuda_bn_relu_backward_reduce(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* grad_out, FastresStrides grad_out_strides,
    const void* x, FastresStrides x_strides,
    const void* mean, const void* invstd, const void* weight, const void* bias,
    void* sum_dy, void* sum_dy_xmu,  // outputs [C]
    void* workspace);                // fastres_cuda_reduce_workspace_bytes bytes

// grad_in += dx (training: through the batch statistics; eval: dy * weight * invstd).
int fastres_cuda_bn_relu_backward_input(
    int device, cudaStream_t stream, int dtype, FastresShape shape,
    const void* grad_out, FastresStrides grad_out_strides,
    const void* x, FastresStrides x_strides,
    const void* mean, const void* invstd, const void* weight, const void* bias,
    const void* sum_dy, const void* sum_dy_xmu,
    void* grad_in, FastresStrides grad_in_strides, int training);

#ifdef __cplusplus
}
#endif
