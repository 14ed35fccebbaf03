// CUDA kernels of the dense-block ops and their extern "C" launchers (see
// dense_cuda.h). No torch headers: this file compiles and links on machines
// without a GPU or a CUDA build of torch.
//
// Reductions are deterministic (no atomics): a block per (channel group, chunk
// of the N*HW positions) writes one partial per channel to the workspace, then
// one thread per channel merges the chunks in order, in double. Elementwise
// kernels walk [rows, inner] tiles with the written tensor's smallest stride
// innermost, so consecutive threads touch consecutive addresses.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dense_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTargetBlocks = 1024;        // reduction blocks to aim for (~8 per H100 SM)
constexpr int64_t kMinBlockElements = 4096;    // smallest chunk worth a block
constexpr int64_t kMaxChunk = int64_t(1) << 24;  // keeps a block's float element count exact
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- scalars: loads widen to the accumulation type, stores round to nearest ----

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A 4-D tensor seen as [N, C, HW] through its strides.
template <typename T>
struct View {
  T* data;
  int64_t stride_n, stride_c, stride_hw;
  __device__ __forceinline__ T* at(int64_t n, int64_t c, int64_t p) const {
    return data + n * stride_n + c * stride_c + p * stride_hw;
  }
};

template <typename T>
View<const T> input_view(const void* data, FastresStrides s) {
  return {static_cast<const T*>(data), s.n, s.c, s.hw};
}

template <typename T>
View<T> output_view(void* data, FastresStrides s) {
  return {static_cast<T*>(data), s.n, s.c, s.hw};
}

// y = (x - mean) * scale + shift of BatchNorm; weight, bias may be null (1, 0).
template <typename A>
struct BnAffine {
  const A *mean, *invstd, *weight, *bias;  // [C]
  __device__ __forceinline__ A scale(int64_t c) const {
    return weight ? invstd[c] * weight[c] : invstd[c];
  }
  __device__ __forceinline__ A shift(int64_t c) const { return bias ? bias[c] : A(0); }
};

template <typename A>
BnAffine<A> affine_of(const void* mean, const void* invstd, const void* weight, const void* bias) {
  return {static_cast<const A*>(mean), static_cast<const A*>(invstd),
          static_cast<const A*>(weight), static_cast<const A*>(bias)};
}

template <typename A>
__device__ __forceinline__ A relu(A y) {  // NaN stays NaN, like torch.relu
  return y <= A(0) ? A(0) : y;
}

// threshold_backward(g, y, 0): the gradient passes where not (y <= 0), NaN y included.
template <typename A>
__device__ __forceinline__ A relu_grad(A y, A g) {
  return y <= A(0) ? A(0) : g;
}

__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {  // 32-bit division is several times cheaper
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = a - q * b;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// ---- reduction partial states, their warp shuffles and merges ----

template <typename A>
struct Welford {
  A count, mean, m2;
};

template <typename A>
__device__ __forceinline__ void merge(Welford<A>& a, const Welford<A>& b) {
  if (b.count == A(0)) return;
  if (a.count == A(0)) {
    a = b;
    return;
  }
  const A count = a.count + b.count;
  const A delta = b.mean - a.mean;
  const A b_share = b.count / count;
  a.mean += delta * b_share;
  a.m2 += b.m2 + delta * delta * a.count * b_share;
  a.count = count;
}

template <typename A>
__device__ __forceinline__ Welford<A> shfl_down(const Welford<A>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.count, offset),
          __shfl_down_sync(0xffffffffu, s.mean, offset),
          __shfl_down_sync(0xffffffffu, s.m2, offset)};
}

template <typename A>
struct GradSums {
  A dy, dy_xmu;
};

template <typename A>
__device__ __forceinline__ void merge(GradSums<A>& a, const GradSums<A>& b) {
  a.dy += b.dy;
  a.dy_xmu += b.dy_xmu;
}

template <typename A>
__device__ __forceinline__ GradSums<A> shfl_down(const GradSums<A>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.dy, offset),
          __shfl_down_sync(0xffffffffu, s.dy_xmu, offset)};
}

// Thread t holds a partial for channel t % CPB of the block; returns the
// block's merged partial in threads t < CPB (for channel t), in a fixed order.
template <int CPB, class S>
__device__ __forceinline__ S block_reduce(S s) {
  static_assert(32 % CPB == 0, "channels per block must divide the warp");
  for (int offset = 16; offset >= CPB; offset /= 2) merge(s, shfl_down(s, offset));
  __shared__ S warp_partials[kWarps][CPB];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < CPB) warp_partials[warp][lane] = s;
  __syncthreads();
  if (threadIdx.x < CPB) {
    s = warp_partials[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) merge(s, warp_partials[w][threadIdx.x]);
  }
  return s;
}

// Calls f(n, p) for positions begin, begin + STEP, ... < end of the flattened
// [N, HW] grid, stepping (n, p) without a division per position.
template <int STEP, class F>
__device__ __forceinline__ void for_positions(int64_t begin, int64_t end, int64_t hw, F&& f) {
  if (begin >= end) return;
  int64_t n = begin / hw, p = begin - n * hw;
  const int64_t step_n = STEP / hw, step_p = STEP - step_n * hw;
  for (int64_t i = begin; i < end; i += STEP) {
    f(n, p);
    n += step_n;
    p += step_p;
    if (p >= hw) {
      p -= hw;
      ++n;
    }
  }
}

// How a reduction splits the work: CPB channels per block (32 when channels
// are innermost in memory, so a warp reads 32 adjacent channels), `chunks`
// chunks of `chunk_len` positions.
struct ReducePlan {
  int cpb;
  int64_t groups, chunks, chunk_len;
};

bool channels_innermost(FastresShape d, FastresStrides s) {
  const int64_t position_stride = d.hw > 1 ? s.hw : s.n;
  return d.c > 1 && s.c < position_stride;
}

ReducePlan reduce_plan(FastresShape d, FastresStrides x) {
  ReducePlan plan;
  plan.cpb = channels_innermost(d, x) ? 32 : 1;
  plan.groups = ceil_div(d.c, plan.cpb);
  const int64_t m = d.n * d.hw;
  int64_t chunks = ceil_div(kTargetBlocks, max64(plan.groups, 1));
  chunks = min64(chunks, ceil_div(m * plan.cpb, kMinBlockElements));
  chunks = max64(chunks, ceil_div(m, kMaxChunk));
  chunks = max64(1, min64(chunks, kMaxGridY));
  plan.chunk_len = max64(1, ceil_div(m, chunks));
  plan.chunks = max64(1, ceil_div(m, plan.chunk_len));
  return plan;
}

// ---- batch_stats ----

// Welford per thread on x - x[0, c, 0], a shift shared by the whole channel
// and exact for values near it (Sterbenz): a large mean costs no precision.
// Partials keep the shifted mean; the finalize kernel adds the shift back.
template <typename T, int CPB>
__global__ void __launch_bounds__(kThreads)
    stats_partials_kernel(FastresShape d, View<const T> x,  // x [N, C, HW]
                          int64_t chunk_len, Welford<typename AccOf<T>::type>* partials) {
  using A = typename AccOf<T>::type;
  const int64_t c = int64_t(blockIdx.x) * CPB + threadIdx.x % CPB;
  const int64_t begin = int64_t(blockIdx.y) * chunk_len;
  const int64_t end = min64(d.n * d.hw, begin + chunk_len);
  Welford<A> s{A(0), A(0), A(0)};
  if (c < d.c) {
    const A shift = widen(*x.at(0, c, 0));
    for_positions<kThreads / CPB>(begin + threadIdx.x / CPB, end, d.hw, [&](int64_t n, int64_t p) {
      const A v = widen(*x.at(n, c, p)) - shift;
      s.count += A(1);
      const A delta = v - s.mean;
      s.mean += delta / s.count;
      s.m2 += delta * (v - s.mean);
    });
  }
  s = block_reduce<CPB>(s);
  const int64_t out_c = int64_t(blockIdx.x) * CPB + threadIdx.x;
  if (threadIdx.x < CPB && out_c < d.c) partials[int64_t(blockIdx.y) * d.c + out_c] = s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(FastresShape d, View<const T> x,  // x for the shift x[0, c, 0]
                          int64_t chunks, const Welford<typename AccOf<T>::type>* partials,
                          typename AccOf<T>::type* mean, typename AccOf<T>::type* var) {
  using A = typename AccOf<T>::type;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d.c) return;
  double count = 0, shifted_mean = 0, m2 = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    const Welford<A> part = partials[j * d.c + c];
    if (part.count == A(0)) continue;
    const double part_count = part.count, total = count + part_count;
    const double delta = double(part.mean) - shifted_mean;
    shifted_mean += delta * part_count / total;
    m2 += double(part.m2) + delta * delta * count * part_count / total;
    count = total;
  }
  if (count == 0) {  // no elements: NaN, like the mean of an empty tensor
    mean[c] = var[c] = A(__longlong_as_double(0x7ff8000000000000LL));
    return;
  }
  mean[c] = A(double(widen(*x.at(0, c, 0))) + shifted_mean);
  var[c] = A(m2 / count);
}

// ---- bn_relu_backward_reduce ----

template <typename T, int CPB>
__global__ void __launch_bounds__(kThreads)
    grad_sums_partials_kernel(FastresShape d,
                              View<const T> grad_out,  // [N, C, HW]
                              View<const T> x,         // [N, C, HW]
                              BnAffine<typename AccOf<T>::type> bn, int64_t chunk_len,
                              GradSums<typename AccOf<T>::type>* partials) {
  using A = typename AccOf<T>::type;
  const int64_t c = int64_t(blockIdx.x) * CPB + threadIdx.x % CPB;
  const int64_t begin = int64_t(blockIdx.y) * chunk_len;
  const int64_t end = min64(d.n * d.hw, begin + chunk_len);
  GradSums<A> s{A(0), A(0)};
  if (c < d.c) {
    const A mean = bn.mean[c], scale = bn.scale(c), shift = bn.shift(c);
    for_positions<kThreads / CPB>(begin + threadIdx.x / CPB, end, d.hw, [&](int64_t n, int64_t p) {
      const A xmu = widen(*x.at(n, c, p)) - mean;
      const A dy = relu_grad(xmu * scale + shift, widen(*grad_out.at(n, c, p)));
      s.dy += dy;
      s.dy_xmu += dy * xmu;
    });
  }
  s = block_reduce<CPB>(s);
  const int64_t out_c = int64_t(blockIdx.x) * CPB + threadIdx.x;
  if (threadIdx.x < CPB && out_c < d.c) partials[int64_t(blockIdx.y) * d.c + out_c] = s;
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    grad_sums_finalize_kernel(int64_t channels, int64_t chunks, const GradSums<A>* partials,
                              A* sum_dy, A* sum_dy_xmu) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double dy = 0, dy_xmu = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    dy += partials[j * channels + c].dy;
    dy_xmu += partials[j * channels + c].dy_xmu;
  }
  sum_dy[c] = A(dy);
  sum_dy_xmu[c] = A(dy_xmu);
}

// ---- elementwise: forward and backward_input ----

// Calls op(n, c, p) for every element. Rows are (n, c) with H*W inner, or
// (n, p) with C inner when CHANNELS_INNER; a block covers
// kThreads / threads_per_row rows of one tile of threads_per_row inner indices.
template <bool CHANNELS_INNER, class Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(FastresShape d, int threads_per_row, Op op) {
  const int64_t rows = CHANNELS_INNER ? d.n * d.hw : d.n * d.c;
  const int64_t inner = CHANNELS_INNER ? d.c : d.hw;
  const int64_t row_split = CHANNELS_INNER ? d.hw : d.c;  // row = n * row_split + rest
  const int rows_per_block = kThreads / threads_per_row;
  const int64_t i = int64_t(blockIdx.x) * threads_per_row + threadIdx.x % threads_per_row;
  if (i >= inner) return;
  const int64_t row_step = int64_t(gridDim.y) * rows_per_block;
  for (int64_t row = int64_t(blockIdx.y) * rows_per_block + threadIdx.x / threads_per_row;
       row < rows; row += row_step) {
    int64_t n, rest;
    divmod(row, row_split, n, rest);
    if (CHANNELS_INNER) {
      op(n, i, rest);
    } else {
      op(n, rest, i);
    }
  }
}

template <typename T>
struct ForwardOp {
  using A = typename AccOf<T>::type;
  View<const T> x;
  View<T> out;
  BnAffine<A> bn;
  __device__ __forceinline__ void operator()(int64_t n, int64_t c, int64_t p) const {
    const A y = (widen(*x.at(n, c, p)) - bn.mean[c]) * bn.scale(c) + bn.shift(c);
    store(out.at(n, c, p), relu(y));
  }
};

// grad_in += dx. Eval takes dx = dy * scale alone: 0 * (x - mean) would turn an
// infinite x into NaN.
template <typename T, bool TRAINING>
struct GradInputOp {
  using A = typename AccOf<T>::type;
  View<const T> grad_out, x;
  View<T> grad_in;
  BnAffine<A> bn;
  const A *sum_dy, *sum_dy_xmu;  // [C]
  A inv_m;                       // 1 / (N * H * W)
  __device__ __forceinline__ void operator()(int64_t n, int64_t c, int64_t p) const {
    const A scale = bn.scale(c);
    const A xmu = widen(*x.at(n, c, p)) - bn.mean[c];
    const A dy = relu_grad(xmu * scale + bn.shift(c), widen(*grad_out.at(n, c, p)));
    A dx;
    if (TRAINING) {
      const A invstd = bn.invstd[c];
      const A proj = invstd * invstd * sum_dy_xmu[c] * inv_m;
      dx = (dy - sum_dy[c] * inv_m - xmu * proj) * scale;
    } else {
      dx = dy * scale;
    }
    T* g = grad_in.at(n, c, p);
    store(g, widen(*g) + dx);
  }
};

template <class Op>
cudaError_t launch_elementwise(FastresShape d, FastresStrides written, const Op& op,
                               cudaStream_t stream) {
  if (d.n * d.c * d.hw == 0) return cudaSuccess;
  const bool channels_inner = channels_innermost(d, written);
  const int64_t rows = channels_inner ? d.n * d.hw : d.n * d.c;
  const int64_t inner = channels_inner ? d.c : d.hw;
  int threads_per_row = 1;  // a power of two, so that rows pack a block exactly
  while (threads_per_row < inner && threads_per_row < kThreads) threads_per_row *= 2;
  const int rows_per_block = kThreads / threads_per_row;
  const dim3 grid(static_cast<unsigned>(ceil_div(inner, threads_per_row)),
                  static_cast<unsigned>(min64(ceil_div(rows, rows_per_block), kMaxGridY)));
  if (channels_inner) {
    elementwise_kernel<true><<<grid, kThreads, 0, stream>>>(d, threads_per_row, op);
  } else {
    elementwise_kernel<false><<<grid, kThreads, 0, stream>>>(d, threads_per_row, op);
  }
  return cudaGetLastError();
}

// ---- host plumbing ----

// Makes `device` current for a launcher and restores the caller's device after
// (torch's current device may differ from the tensors').
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    (void)cudaGetLastError();  // an earlier, unrelated error must not be reported as ours
    error_ = cudaGetDevice(&previous_);
    if (error_ == cudaSuccess && previous_ != device) {
      error_ = cudaSetDevice(device);
      switched_ = error_ == cudaSuccess;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  cudaError_t error() const { return error_; }

 private:
  int previous_ = -1;
  bool switched_ = false;
  cudaError_t error_ = cudaSuccess;
};

// Calls f(T{}) for the scalar type of a FastresDtype code.
template <class F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case FASTRES_FLOAT32: return f(float{});
    case FASTRES_FLOAT64: return f(double{});
    case FASTRES_FLOAT16: return f(__half{});
    case FASTRES_BFLOAT16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

int64_t partial_bytes(int dtype) {
  return dtype == FASTRES_FLOAT64 ? sizeof(Welford<double>) : sizeof(Welford<float>);
}

}  // namespace

extern "C" int fastres_cuda_kernels_compiled(void) { return 1; }

extern "C" const char* fastres_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

extern "C" int fastres_cuda_device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

extern "C" int64_t fastres_cuda_reduce_workspace_bytes(int dtype, FastresShape shape,
                                                       FastresStrides x_strides) {
  // Welford partials are the larger state; the gradient sums fit in the same space.
  return reduce_plan(shape, x_strides).chunks * shape.c * partial_bytes(dtype);
}

extern "C" int fastres_cuda_batch_stats(int device, cudaStream_t stream, int dtype,
                                        FastresShape d, const void* x, FastresStrides x_strides,
                                        void* mean, void* var, void* workspace) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (d.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const ReducePlan plan = reduce_plan(d, x_strides);
    const View<const T> xv = input_view<T>(x, x_strides);
    auto* partials = static_cast<Welford<A>*>(workspace);
    const bool any_elements = d.n * d.hw > 0;
    if (any_elements) {
      auto kernel = plan.cpb == 32 ? stats_partials_kernel<T, 32> : stats_partials_kernel<T, 1>;
      const dim3 grid(static_cast<unsigned>(plan.groups), static_cast<unsigned>(plan.chunks));
      kernel<<<grid, kThreads, 0, stream>>>(d, xv, plan.chunk_len, partials);
    }
    stats_finalize_kernel<T><<<static_cast<unsigned>(ceil_div(d.c, kThreads)), kThreads, 0,
                               stream>>>(d, xv, any_elements ? plan.chunks : 0, partials,
                                         static_cast<A*>(mean), static_cast<A*>(var));
    return cudaGetLastError();
  });
}

extern "C" int fastres_cuda_bn_relu_forward(int device, cudaStream_t stream, int dtype,
                                            FastresShape d, const void* x,
                                            FastresStrides x_strides, const void* mean,
                                            const void* invstd, const void* weight,
                                            const void* bias, void* out,
                                            FastresStrides out_strides) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const ForwardOp<T> op{input_view<T>(x, x_strides), output_view<T>(out, out_strides),
                          affine_of<A>(mean, invstd, weight, bias)};
    return launch_elementwise(d, out_strides, op, stream);
  });
}

extern "C" int fastres_cuda_bn_relu_backward_reduce(
    int device, cudaStream_t stream, int dtype, FastresShape d, const void* grad_out,
    FastresStrides grad_out_strides, const void* x, FastresStrides x_strides, const void* mean,
    const void* invstd, const void* weight, const void* bias, void* sum_dy, void* sum_dy_xmu,
    void* workspace) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (d.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const ReducePlan plan = reduce_plan(d, x_strides);
    auto* partials = static_cast<GradSums<A>*>(workspace);
    const bool any_elements = d.n * d.hw > 0;
    if (any_elements) {
      auto kernel =
          plan.cpb == 32 ? grad_sums_partials_kernel<T, 32> : grad_sums_partials_kernel<T, 1>;
      const dim3 grid(static_cast<unsigned>(plan.groups), static_cast<unsigned>(plan.chunks));
      kernel<<<grid, kThreads, 0, stream>>>(d, input_view<T>(grad_out, grad_out_strides),
                                            input_view<T>(x, x_strides),
                                            affine_of<A>(mean, invstd, weight, bias),
                                            plan.chunk_len, partials);
    }
    grad_sums_finalize_kernel<A><<<static_cast<unsigned>(ceil_div(d.c, kThreads)), kThreads, 0,
                                   stream>>>(d.c, any_elements ? plan.chunks : 0, partials,
                                             static_cast<A*>(sum_dy),
                                             static_cast<A*>(sum_dy_xmu));
    return cudaGetLastError();
  });
}

extern "C" int fastres_cuda_bn_relu_backward_input(
    int device, cudaStream_t stream, int dtype, FastresShape d, const void* grad_out,
    FastresStrides grad_out_strides, const void* x, FastresStrides x_strides, const void* mean,
    const void* invstd, const void* weight, const void* bias, const void* sum_dy,
    const void* sum_dy_xmu, void* grad_in, FastresStrides grad_in_strides, int training) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const View<const T> g = input_view<T>(grad_out, grad_out_strides);
    const View<const T> xv = input_view<T>(x, x_strides);
    const View<T> gi = output_view<T>(grad_in, grad_in_strides);
    const BnAffine<A> bn = affine_of<A>(mean, invstd, weight, bias);
    const auto* dy_sums = static_cast<const A*>(sum_dy);
    const auto* dy_xmu_sums = static_cast<const A*>(sum_dy_xmu);
    const A inv_m = A(1) / A(d.n * d.hw);
    if (training) {
      const GradInputOp<T, true> op{g, xv, gi, bn, dy_sums, dy_xmu_sums, inv_m};
      return launch_elementwise(d, grad_in_strides, op, stream);
    }
    const GradInputOp<T, false> op{g, xv, gi, bn, dy_sums, dy_xmu_sums, inv_m};
    return launch_elementwise(d, grad_in_strides, op, stream);
  });
}
