// CUDA kernels of the dense-block ops and their extern "C" launchers (see
// dense_cuda.h). No torch headers: this file compiles and links on machines
// without a GPU or a CUDA build of torch.
//
// How threads walk a tensor. Every kernel sees its [N, C, HW] views through
// one of two mappings, chosen on the host from the strides:
//
//   rows      (NCHW slices, H*W innermost) a column is one channel; its items
//             are the vectors of V consecutive positions of the rows (n, c),
//             flattened over (n, q), q < Q = HW / V.
//   channels  (channels_last slices, C innermost) a column is V consecutive
//             channels; its items are the positions (n, p), q = p < Q = HW.
//
// A block holds `cols` columns of `lanes` threads each (lanes are consecutive
// threads in the rows mapping, columns in the channels one, so that a warp
// reads consecutive addresses), and a range (chunk) of items given by
// blockIdx.y; lane l of a column takes items begin + l, begin + l + lanes, ...
// Each thread loads its column's per-channel values once, and steps its item's
// (q, offsets) by additions (no division in the loops). V is 16 bytes' worth of
// elements (4 float, 2 double, 8 half/bfloat16) when the innermost stride is 1,
// the other strides and the extent along the vector are multiples of V, and
// the data are 16-byte aligned, for every tensor of the op (checked on the host
// per call: the views are channel slices of larger buffers); otherwise V = 1
// and any strides work.
//
// Reductions are deterministic (no atomics, a fixed order everywhere): each
// block merges its lanes in shared memory along a fixed tree and writes one
// partial per channel and chunk to the workspace; a finalize kernel (a block
// per group of channels, threads over chunks, then the same tree) merges them.
// The batch statistics keep a thread's sums of x - t0 and (x - t0)^2, t0 the
// thread's first value (a shift within the data: a large mean costs no
// precision), turn them into (count, mean, M2) once per thread, and merge those
// with Chan et al.'s formula in the block; means are kept relative to the
// channel's first element K = x[0, c, 0], so merges see numbers of the size of
// the spread. The finalize merges the chunks in double in two passes (the
// count-weighted mean, then sum(M2_j + n_j (mean_j - mean)^2)), writes mean and
// rstd, and updates the running statistics.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "dense_cuda.h"

namespace {

constexpr int kThreads = 256;
// __launch_bounds__'s minimum blocks per SM: caps registers at 128. (With the
// thread count alone, ptxas spills a few bytes in some kernels.)
constexpr int kMinBlocksPerSm = 2;
constexpr int kReduceColumns = 32;                    // most columns of a reduction block
constexpr int kFinalizeChannels = 32;                 // most channels of a finalize block
constexpr int64_t kTargetReduceBlocks = 1024;         // ~8 per H100 SM
constexpr int64_t kMinBlockElements = 4096;           // smallest reduction chunk worth a block
constexpr int64_t kMaxChunkElements = int64_t(1) << 24;  // per channel: float counts stay exact
constexpr int64_t kTargetElementwiseBlocks = 2048;
constexpr int64_t kMinItemsPerThread = 4;             // elementwise: amortizes a thread's setup
constexpr int64_t kMaxChunkItems = int64_t(1) << 30;  // 32-bit item counts in the kernels
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// ---- scalars and 16-byte vectors ----

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

// Elements of T in 16 bytes.
template <typename T> constexpr int kVecOf = int(16 / sizeof(T));

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds to nearest into T.
template <typename T> struct Narrow;
template <> struct Narrow<float> {
  __device__ static float of(float v) { return v; }
};
template <> struct Narrow<double> {
  __device__ static double of(double v) { return v; }
};
template <> struct Narrow<__half> {
  __device__ static __half of(float v) { return __float2half_rn(v); }
};
template <> struct Narrow<__nv_bfloat16> {
  __device__ static __nv_bfloat16 of(float v) { return __float2bfloat16_rn(v); }
};

// V consecutive elements, loaded and stored as one access (16 bytes when V > 1).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
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

// A shift for the statistics: v, or 0 when v is NaN or infinite (a shift of
// Inf would turn every value of the channel into NaN). A channel holding Inf
// or NaN gets a non-finite mean (NaN or Inf) and a NaN variance, as in eager.
template <typename A>
__device__ __forceinline__ A finite_or_zero(A v) {
  return isfinite(v) ? v : A(0);
}

// ---- how a launch walks its tensors ----

// One tensor as the threads of a launch walk it: item (n, q) of column `col`
// is at element offset col * col_stride + n * n_stride + q * q_stride.
struct TensorWalk {
  int64_t col_stride, n_stride, q_stride;
  int64_t step;  // offset change when an item index advances by `lanes` ...
  int64_t wrap;  // ... and the further change when q passes Q
};

template <int NT>
struct Walks {
  TensorWalk t[NT];
};

// What every kernel needs of its launch plan (see make_plan).
struct Launch {
  int cols, lanes, lanes_pow2;  // cols * lanes <= kThreads; lanes_pow2 >= lanes
  int64_t columns;              // columns in all: C, or C / V in the channels mapping
  int64_t q_extent;             // Q
  int64_t items;                // items per column: N * Q
  int64_t chunk_len;            // items per blockIdx.y
  int64_t step_q;               // lanes % Q
  double inv_q;                 // 1 / Q, to split a thread's first item without a division
};

// Where a thread is: its column and lane, and its block's chunk of items.
struct Place {
  int lane;
  bool in_block;  // one of the block's cols * lanes threads
  bool active;    // ... and its column exists
  int column;     // < 2^31 (fits() checks): 32 bits keep it in one register
  int64_t begin, end;
};

template <bool CH>
__device__ __forceinline__ Place place_of(const Launch& g) {
  const int t = threadIdx.x;
  const int col = CH ? t % g.cols : t / g.lanes;  // once per thread
  Place p;
  p.lane = CH ? t / g.cols : t % g.lanes;
  p.in_block = col < g.cols && p.lane < g.lanes;
  p.column = int(blockIdx.x) * g.cols + col;
  p.active = p.in_block && p.column < g.columns;
  p.begin = int64_t(blockIdx.y) * g.chunk_len;
  p.end = min64(g.items, p.begin + g.chunk_len);
  return p;
}

// Steps a thread's items: (q, one offset per tensor), by additions only.
template <int NT>
struct Walker {
  int64_t q;
  int64_t off[NT];

  __device__ __forceinline__ Walker(const Launch& g, const Walks<NT>& w, int64_t column,
                                    int64_t item) {
    // n = item / Q: the quotient through the reciprocal is within 1 of the
    // truth (item < 2^52), and one correction makes it exact. Integer division
    // of 64-bit values would be a call (and spills) in every kernel.
    int64_t n = static_cast<int64_t>(static_cast<double>(item) * g.inv_q);
    q = item - n * g.q_extent;
    if (q < 0) {
      --n;
      q += g.q_extent;
    } else if (q >= g.q_extent) {
      ++n;
      q -= g.q_extent;
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
      off[t] = column * w.t[t].col_stride + n * w.t[t].n_stride + q * w.t[t].q_stride;
  }

  __device__ __forceinline__ void next(const Launch& g, const Walks<NT>& w) {
    q += g.step_q;
#pragma unroll
    for (int t = 0; t < NT; ++t) off[t] += w.t[t].step;
    if (q >= g.q_extent) {
      q -= g.q_extent;
#pragma unroll
      for (int t = 0; t < NT; ++t) off[t] += w.t[t].wrap;
    }
  }
};

// How many items a thread takes: first, first + lanes, ... < end. The plan
// keeps a chunk under 2^31 items, so 32-bit division suffices (the compiler
// would otherwise emit a 64-bit division, a call, to unroll the loops).
__device__ __forceinline__ int items_from(int64_t first, int64_t end, int lanes) {
  return first < end ? int(uint32_t(end - first - 1) / uint32_t(lanes)) + 1 : 0;
}

// Channel of element k of a thread's vectors.
template <int V, bool CH>
__device__ __forceinline__ int64_t channel_of(int64_t column, int k) {
  return CH ? column * V + k : column;
}

// ---- per-channel values, loaded once per thread ----

// y = (x - mean) * scale + shift of BatchNorm; weight, bias may be null (1, 0).
template <typename A>
struct BnArgs {
  const A *mean, *rstd, *weight, *bias;  // [C]
};

// A thread's per-channel values: element k of its vectors belongs to channel
// channel_of(column, k); in the rows mapping that is one channel for all k.
template <typename A, int V, bool CH>
struct Affine {
  A mean[V], scale[V], shift[V];

  __device__ __forceinline__ Affine(const BnArgs<A>& bn, int64_t column) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (CH || k == 0) {
        const int64_t c = channel_of<V, CH>(column, k);
        const A rstd = bn.rstd[c];
        mean[k] = bn.mean[c];
        scale[k] = bn.weight ? rstd * bn.weight[c] : rstd;
        shift[k] = bn.bias ? bn.bias[c] : A(0);
      } else {
        mean[k] = mean[0];
        scale[k] = scale[0];
        shift[k] = shift[0];
      }
    }
  }
};

// ---- reduction states and the block's merge ----

template <typename A>
struct Welford {
  A count, mean, m2;  // mean relative to the channel's shift K
};

// Chan et al.: the (count, mean, M2) of the union of two sets.
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
struct GradSums {
  A g, gx;  // sum(g), sum(g * (x - mean))
};

template <typename A>
__device__ __forceinline__ void merge(GradSums<A>& a, const GradSums<A>& b) {
  a.g += b.g;
  a.gx += b.gx;
}

struct Sums2 {
  double a, b;
};

__device__ __forceinline__ void merge(Sums2& x, const Sums2& y) {
  x.a += y.a;
  x.b += y.b;
}

// Merges the states of each column's lanes (thread t's lane + s sits at
// t + s * lane_stride) along a fixed tree; lane 0 of each column gets the
// result. Every thread of the block must call it.
template <class S, int KV>
__device__ __forceinline__ void block_reduce(S (&state)[KV], const Place& p, int lanes,
                                             int lanes_pow2, int lane_stride) {
  __shared__ S shared[kThreads][KV];
  const int t = threadIdx.x;
#pragma unroll
  for (int k = 0; k < KV; ++k) shared[t][k] = state[k];
  __syncthreads();
  for (int s = lanes_pow2 / 2; s > 0; s /= 2) {
    if (p.in_block && p.lane < s && p.lane + s < lanes) {
#pragma unroll
      for (int k = 0; k < KV; ++k) merge(shared[t][k], shared[t + s * lane_stride][k]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < KV; ++k) state[k] = shared[t][k];
}

// ---- batch statistics ----

// (count, mean relative to K, M2) from the sums of u = x - t0 over `count` values.
template <typename A>
__device__ __forceinline__ Welford<A> welford_of(A count, A t0_minus_k, A s1, A s2) {
  if (count == A(0)) return {A(0), A(0), A(0)};
  const A mean_u = s1 / count;
  const A m2 = s2 - s1 * mean_u;
  return {count, t0_minus_k + mean_u, m2 < A(0) ? A(0) : m2};  // NaN stays NaN
}

template <typename T, int V, bool CH>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    stats_partials_kernel(Launch g, const T* x, Walks<1> w, int64_t channels,
                          Welford<Acc<T>>* partials) {  // [chunks][C]
  using A = Acc<T>;
  constexpr int KV = CH ? V : 1;  // channels per thread
  const Place p = place_of<CH>(g);
  Welford<A> state[KV];
#pragma unroll
  for (int k = 0; k < KV; ++k) state[k] = {A(0), A(0), A(0)};
  const int64_t first = p.begin + p.lane;  // the thread's items: first, first + lanes, ...
  if (p.active && first < p.end) {
    Walker<1> it(g, w, p.column, first);
    A t0[V], s1[V], s2[V];
    {
      const Pack<T, V> v0 = load_pack<T, V>(x + it.off[0]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        t0[k] = finite_or_zero(widen(v0.v[CH ? k : 0]));
        s1[k] = s2[k] = A(0);
      }
    }
    const int count = items_from(first, p.end, g.lanes);  // < 2^24: the plan bounds a chunk
    for (int i = 0; i < count; ++i) {
      const Pack<T, V> v = load_pack<T, V>(x + it.off[0]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A u = widen(v.v[k]) - t0[k];
        s1[k] += u;
        s2[k] = fma(u, u, s2[k]);
      }
      it.next(g, w);
    }
    // K = x[0, c, 0] of each channel: column start, n = q = 0.
    const Pack<T, V> head = load_pack<T, V>(x + p.column * w.t[0].col_stride);
    if (CH) {
#pragma unroll
      for (int k = 0; k < KV; ++k)
        state[k] = welford_of(A(count), t0[k] - finite_or_zero(widen(head.v[k])), s1[k], s2[k]);
    } else {  // one channel, one shift: the V lanes add up
      A sum1 = A(0), sum2 = A(0);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sum1 += s1[k];
        sum2 += s2[k];
      }
      state[0] = welford_of(A(count * V), t0[0] - finite_or_zero(widen(head.v[0])), sum1, sum2);
    }
  }
  block_reduce(state, p, g.lanes, g.lanes_pow2, CH ? g.cols : 1);
  if (p.active && p.lane == 0) {
#pragma unroll
    for (int k = 0; k < KV; ++k)
      partials[int64_t(blockIdx.y) * channels + channel_of<V, CH>(p.column, k)] = state[k];
  }
}

// The block layout of both finalize kernels: `cols` channels (threads
// t % cols) by `lanes` chunk lanes (t / cols), so that a warp reads
// consecutive channels of a chunk's partials.
struct FinalizeLaunch {
  int cols, lanes, lanes_pow2;
};

__device__ __forceinline__ Place finalize_place(const FinalizeLaunch& f, int64_t channels) {
  const int t = threadIdx.x;
  Place p;
  p.lane = t / f.cols;
  p.in_block = p.lane < f.lanes;
  p.column = int(blockIdx.x) * f.cols + t % f.cols;
  p.active = p.in_block && p.column < channels;
  p.begin = p.end = 0;
  return p;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    stats_finalize_kernel(FinalizeLaunch f, int64_t channels, int chunks,
                          const Welford<Acc<T>>* partials, const T* x, int64_t x_stride_c,
                          double momentum, double eps, Acc<T>* mean_out, Acc<T>* rstd_out,
                          Acc<T>* running_mean, Acc<T>* running_var) {
  using A = Acc<T>;
  const Place p = finalize_place(f, channels);
  const int64_t c = p.column;
  // Pass 1: count and count-weighted mean (relative to K).
  Sums2 first[1] = {{0.0, 0.0}};
  if (p.active) {
    for (int j = p.lane; j < chunks; j += f.lanes) {
      const Welford<A> part = partials[int64_t(j) * channels + c];
      first[0].a += double(part.count);
      first[0].b += double(part.count) * double(part.mean);
    }
  }
  block_reduce(first, p, f.lanes, f.lanes_pow2, f.cols);
  __shared__ double channel_mean[kFinalizeChannels];  // per column of the block
  if (p.in_block && p.lane == 0) channel_mean[threadIdx.x] = first[0].b / first[0].a;
  __syncthreads();
  const double count = first[0].a;  // meaningful in lane 0
  const double mean_k = p.in_block ? channel_mean[threadIdx.x % f.cols] : 0.0;
  // Pass 2: M2 = sum(M2_j + n_j * (mean_j - mean)^2).
  Sums2 second[1] = {{0.0, 0.0}};
  if (p.active) {
    for (int j = p.lane; j < chunks; j += f.lanes) {
      const Welford<A> part = partials[int64_t(j) * channels + c];
      const double d = double(part.mean) - mean_k;
      second[0].a += double(part.m2) + double(part.count) * d * d;
    }
  }
  block_reduce(second, p, f.lanes, f.lanes_pow2, f.cols);
  if (!p.active || p.lane != 0) return;
  const double nan = __longlong_as_double(0x7ff8000000000000LL);
  double mean = nan, var = nan, unbiased = nan;
  if (count > 0) {  // else no elements: NaN, like the mean of an empty tensor
    const double m2 = second[0].a;
    mean = double(finite_or_zero(widen(x[c * x_stride_c]))) + mean_k;
    var = m2 / count;
    unbiased = m2 / (count - 1.0);
  }
  mean_out[c] = A(mean);
  rstd_out[c] = A(1.0 / sqrt(var + eps));
  if (running_mean != nullptr) {
    running_mean[c] = A(momentum * mean + (1.0 - momentum) * double(running_mean[c]));
    running_var[c] = A(momentum * unbiased + (1.0 - momentum) * double(running_var[c]));
  }
}

// ---- bn_relu_backward_reduce ----

template <typename T, int V, bool CH>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    grad_partials_kernel(Launch g, const T* grad_out, const T* x, Walks<2> w,  // [grad_out, x]
                         BnArgs<Acc<T>> bn, int64_t channels,
                         GradSums<Acc<T>>* partials) {  // [chunks][C]
  using A = Acc<T>;
  constexpr int KV = CH ? V : 1;
  const Place p = place_of<CH>(g);
  GradSums<A> state[KV];
#pragma unroll
  for (int k = 0; k < KV; ++k) state[k] = {A(0), A(0)};
  const int64_t first = p.begin + p.lane;
  if (p.active && first < p.end) {
    const Affine<A, V, CH> bn_c(bn, p.column);
    A sg[V], sgx[V];
#pragma unroll
    for (int k = 0; k < V; ++k) sg[k] = sgx[k] = A(0);
    Walker<2> it(g, w, p.column, first);
    for (int i = 0, count = items_from(first, p.end, g.lanes); i < count; ++i) {
      const Pack<T, V> gv = load_pack<T, V>(grad_out + it.off[0]);
      const Pack<T, V> xv = load_pack<T, V>(x + it.off[1]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xmu = widen(xv.v[k]) - bn_c.mean[k];
        const A gk = relu_grad(xmu * bn_c.scale[k] + bn_c.shift[k], widen(gv.v[k]));
        sg[k] += gk;
        sgx[k] = fma(gk, xmu, sgx[k]);
      }
      it.next(g, w);
    }
    if (CH) {
#pragma unroll
      for (int k = 0; k < KV; ++k) state[k] = {sg[k], sgx[k]};
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        state[0].g += sg[k];
        state[0].gx += sgx[k];
      }
    }
  }
  block_reduce(state, p, g.lanes, g.lanes_pow2, CH ? g.cols : 1);
  if (p.active && p.lane == 0) {
#pragma unroll
    for (int k = 0; k < KV; ++k)
      partials[int64_t(blockIdx.y) * channels + channel_of<V, CH>(p.column, k)] = state[k];
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    grad_finalize_kernel(FinalizeLaunch f, int64_t channels, int chunks,
                         const GradSums<A>* partials, A* sum_g, A* sum_gx) {
  const Place p = finalize_place(f, channels);
  const int64_t c = p.column;
  Sums2 sums[1] = {{0.0, 0.0}};
  if (p.active) {
    for (int j = p.lane; j < chunks; j += f.lanes) {
      const GradSums<A> part = partials[int64_t(j) * channels + c];
      sums[0].a += double(part.g);
      sums[0].b += double(part.gx);
    }
  }
  block_reduce(sums, p, f.lanes, f.lanes_pow2, f.cols);
  if (!p.active || p.lane != 0) return;
  sum_g[c] = A(sums[0].a);
  sum_gx[c] = A(sums[0].b);
}

// ---- elementwise: forward and backward_input ----

template <typename T, int V, bool CH>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_kernel(Launch g, const T* x, T* out, Walks<2> w,  // [x, out]
                   BnArgs<Acc<T>> bn) {
  using A = Acc<T>;
  const Place p = place_of<CH>(g);
  const int64_t first = p.begin + p.lane;
  if (!p.active || first >= p.end) return;
  const Affine<A, V, CH> bn_c(bn, p.column);
  Walker<2> it(g, w, p.column, first);
  for (int i = 0, count = items_from(first, p.end, g.lanes); i < count; ++i) {
    const Pack<T, V> xv = load_pack<T, V>(x + it.off[0]);
    Pack<T, V> y;
#pragma unroll
    for (int k = 0; k < V; ++k)
      y.v[k] = Narrow<T>::of(relu((widen(xv.v[k]) - bn_c.mean[k]) * bn_c.scale[k] + bn_c.shift[k]));
    store_pack<T, V>(out + it.off[1], y);
    it.next(g, w);
  }
}

// grad_in += dx. Eval takes dx = g * scale alone: 0 * (x - mean) would turn an
// infinite x into NaN.
template <typename T, int V, bool CH, bool TRAINING>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_input_kernel(Launch g, const T* grad_out, const T* x, T* grad_in,
                          Walks<3> w,  // [grad_out, x, grad_in]
                          BnArgs<Acc<T>> bn, const Acc<T>* sum_g, const Acc<T>* sum_gx,
                          Acc<T> inv_m) {  // 1 / (N * H * W)
  using A = Acc<T>;
  const Place p = place_of<CH>(g);
  const int64_t first = p.begin + p.lane;
  if (!p.active || first >= p.end) return;
  const Affine<A, V, CH> bn_c(bn, p.column);
  A mean_g[V], proj[V];  // sum_g / m and rstd^2 * sum_gx / m
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (!TRAINING) {
      mean_g[k] = proj[k] = A(0);
    } else if (CH || k == 0) {
      const int64_t c = channel_of<V, CH>(p.column, k);
      const A rstd = bn.rstd[c];
      mean_g[k] = sum_g[c] * inv_m;
      proj[k] = rstd * rstd * sum_gx[c] * inv_m;
    } else {
      mean_g[k] = mean_g[0];
      proj[k] = proj[0];
    }
  }
  Walker<3> it(g, w, p.column, first);
  for (int i = 0, count = items_from(first, p.end, g.lanes); i < count; ++i) {
    const Pack<T, V> gv = load_pack<T, V>(grad_out + it.off[0]);
    const Pack<T, V> xv = load_pack<T, V>(x + it.off[1]);
    Pack<T, V> acc = load_pack<T, V>(grad_in + it.off[2]);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A scale = bn_c.scale[k];
      const A xmu = widen(xv.v[k]) - bn_c.mean[k];
      const A gk = relu_grad(xmu * scale + bn_c.shift[k], widen(gv.v[k]));
      const A dx = TRAINING ? (gk - mean_g[k] - xmu * proj[k]) * scale : gk * scale;
      acc.v[k] = Narrow<T>::of(widen(acc.v[k]) + dx);
    }
    store_pack<T, V>(grad_in + it.off[2], acc);
    it.next(g, w);
  }
}

// ---- host: plans ----

// Channels are the innermost axis of t (channels_last): the channels mapping.
bool channels_innermost(FastresShape d, FastresStrides s) {
  const int64_t position_stride = d.hw > 1 ? s.hw : s.n;
  return d.c > 1 && s.c < position_stride;
}

// Whether the shape allows vectors of `vec` elements in a mapping.
bool shape_allows(FastresShape d, bool ch, int vec) {
  return vec == 1 || (ch ? d.c % vec == 0 : d.hw % vec == 0);
}

// Whether a tensor allows them: stride 1 along the vector, the other strides
// multiples of it (where the extent exceeds 1), 16-byte aligned data.
bool tensor_allows(FastresShape d, bool ch, int vec, const void* data, FastresStrides s) {
  if (vec == 1) return true;
  if (!shape_allows(d, ch, vec) || reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  const int64_t inner = ch ? s.c : s.hw, inner_extent = ch ? d.c : d.hw;
  const int64_t other = ch ? s.hw : s.c, other_extent = ch ? d.hw : d.c;
  return (inner_extent <= 1 || inner == 1) && (other_extent <= 1 || other % vec == 0) &&
         (d.n <= 1 || s.n % vec == 0);
}

struct Plan {
  bool ch;  // the channels mapping
  int vec;  // V
  Launch g;
  int64_t groups, chunks;  // grid.x, grid.y
  int64_t step_n;          // lanes / Q
};

Plan make_plan(FastresShape d, bool ch, int vec, bool reduction) {
  Plan p{};
  p.ch = ch;
  p.vec = vec;
  Launch& g = p.g;
  g.columns = ch ? d.c / vec : d.c;
  g.q_extent = ch ? d.hw : d.hw / vec;
  g.items = d.n * g.q_extent;
  if (ch) {  // columns side by side, lanes down the positions
    g.cols = int(clamp64(g.columns, 1, reduction ? kReduceColumns : kThreads));
    g.lanes = kThreads / g.cols;
  } else {  // a column's lanes along its rows, several short channels per block
    g.lanes = int(clamp64(g.items, 1, kThreads));
    g.cols = kThreads / g.lanes;
  }
  g.lanes_pow2 = pow2_at_least(g.lanes);
  p.groups = max64(1, ceil_div(g.columns, g.cols));
  int64_t chunks;
  if (reduction) {
    const int64_t channel_elements_per_item = ch ? 1 : vec;
    chunks = ceil_div(kTargetReduceBlocks, p.groups);
    chunks = min64(chunks, ceil_div(g.items * g.cols * vec, kMinBlockElements));
    chunks = max64(chunks, ceil_div(g.items * channel_elements_per_item, kMaxChunkElements));
  } else {
    chunks = ceil_div(kTargetElementwiseBlocks, p.groups);
    chunks = min64(chunks, ceil_div(g.items, int64_t(g.lanes) * kMinItemsPerThread));
  }
  chunks = max64(chunks, ceil_div(g.items, kMaxChunkItems));
  chunks = clamp64(chunks, 1, kMaxGridY);  // beyond, chunk_len > kMaxChunkItems: fits() says no
  g.chunk_len = max64(1, ceil_div(g.items, chunks));
  p.chunks = max64(1, ceil_div(g.items, g.chunk_len));
  p.step_n = g.q_extent > 0 ? g.lanes / g.q_extent : 0;
  g.step_q = g.q_extent > 0 ? g.lanes % g.q_extent : 0;
  g.inv_q = g.q_extent > 0 ? 1.0 / static_cast<double>(g.q_extent) : 0.0;
  return p;
}

// Whether the kernels can take the plan: a chunk under 2^31 items (more than
// 65535 * 2^30 items per channel, which no memory holds, cannot be) and
// column indices under 2^31.
bool fits(const Plan& p) {
  return p.g.chunk_len <= kMaxChunkItems && p.groups * p.g.cols < (int64_t(1) << 31);
}

TensorWalk walk_of(const Plan& p, FastresStrides s) {
  TensorWalk w;
  w.col_stride = p.ch ? s.c * p.vec : s.c;
  w.n_stride = s.n;
  w.q_stride = p.ch ? s.hw : s.hw * p.vec;
  w.step = p.step_n * w.n_stride + p.g.step_q * w.q_stride;
  w.wrap = w.n_stride - p.g.q_extent * w.q_stride;
  return w;
}

dim3 grid_of(const Plan& p) {
  return dim3(static_cast<unsigned>(p.groups), static_cast<unsigned>(p.chunks));
}

FinalizeLaunch finalize_launch(int64_t channels) {
  FinalizeLaunch f;
  f.cols = int(clamp64(channels, 1, kFinalizeChannels));
  f.lanes = kThreads / f.cols;
  f.lanes_pow2 = pow2_at_least(f.lanes);
  return f;
}

unsigned finalize_blocks(const FinalizeLaunch& f, int64_t channels) {
  return static_cast<unsigned>(ceil_div(channels, f.cols));
}

template <int V> using IntTag = std::integral_constant<int, V>;
template <bool B> using BoolTag = std::integral_constant<bool, B>;

// Calls f(IntTag<V>, BoolTag<CH>) for the plan's vector width and mapping.
template <typename T, class F>
cudaError_t with_variant(const Plan& p, F&& f) {
  constexpr int V = kVecOf<T>;
  if (p.vec == V) return p.ch ? f(IntTag<V>{}, BoolTag<true>{}) : f(IntTag<V>{}, BoolTag<false>{});
  return p.ch ? f(IntTag<1>{}, BoolTag<true>{}) : f(IntTag<1>{}, BoolTag<false>{});
}

// The plan of an op over tensors of shape d: the mapping of `layout` (x for
// reductions, the written tensor for elementwise ops), vectors when every
// tensor allows them.
template <typename T, int NT>
Plan plan_for(FastresShape d, FastresStrides layout, const void* const (&data)[NT],
              const FastresStrides (&strides)[NT], bool reduction) {
  const bool ch = channels_innermost(d, layout);
  int vec = kVecOf<T>;
  for (int t = 0; t < NT; ++t)
    if (!tensor_allows(d, ch, vec, data[t], strides[t])) vec = 1;
  return make_plan(d, ch, vec, reduction);
}

template <int NT>
Walks<NT> walks_of(const Plan& p, const FastresStrides (&strides)[NT]) {
  Walks<NT> w;
  for (int t = 0; t < NT; ++t) w.t[t] = walk_of(p, strides[t]);
  return w;
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

template <typename A>
BnArgs<A> bn_args(const void* mean, const void* rstd, const void* weight, const void* bias) {
  return {static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<const A*>(weight),
          static_cast<const A*>(bias)};
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
  // Welford partials are the larger state; the gradient sums fit in the same
  // space. Which vector width a call takes depends on its pointers: room for both.
  const int64_t acc_bytes = dtype == FASTRES_FLOAT64 ? 8 : 4;
  const int vec = dtype == FASTRES_FLOAT64 ? 2 : (dtype == FASTRES_FLOAT32 ? 4 : 8);
  const bool ch = channels_innermost(shape, x_strides);
  int64_t chunks = make_plan(shape, ch, 1, true).chunks;
  if (shape_allows(shape, ch, vec)) chunks = max64(chunks, make_plan(shape, ch, vec, true).chunks);
  return chunks * shape.c * 3 * acc_bytes;
}

extern "C" int fastres_cuda_batch_stats(int device, cudaStream_t stream, int dtype,
                                        FastresShape d, const void* x, FastresStrides x_strides,
                                        void* running_mean, void* running_var, double momentum,
                                        double eps, void* mean, void* rstd, void* workspace) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (d.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* xt = static_cast<const T*>(x);
    auto* partials = static_cast<Welford<A>*>(workspace);
    const bool any_elements = d.n * d.hw > 0;
    const void* const data[1] = {x};
    const FastresStrides strides[1] = {x_strides};
    const Plan plan = plan_for<T>(d, x_strides, data, strides, /*reduction=*/true);
    if (!fits(plan)) return cudaErrorInvalidValue;
    if (any_elements) {
      const cudaError_t error = with_variant<T>(plan, [&](auto v, auto ch) -> cudaError_t {
        stats_partials_kernel<T, decltype(v)::value, decltype(ch)::value>
            <<<grid_of(plan), kThreads, 0, stream>>>(plan.g, xt, walks_of(plan, strides), d.c,
                                                     partials);
        return cudaGetLastError();
      });
      if (error != cudaSuccess) return error;
    }
    const FinalizeLaunch f = finalize_launch(d.c);
    stats_finalize_kernel<T><<<finalize_blocks(f, d.c), kThreads, 0, stream>>>(
        f, d.c, any_elements ? int(plan.chunks) : 0, partials, xt, x_strides.c, momentum, eps,
        static_cast<A*>(mean), static_cast<A*>(rstd), static_cast<A*>(running_mean),
        static_cast<A*>(running_var));
    return cudaGetLastError();
  });
}

extern "C" int fastres_cuda_bn_relu_forward(int device, cudaStream_t stream, int dtype,
                                            FastresShape d, const void* x,
                                            FastresStrides x_strides, const void* mean,
                                            const void* rstd, const void* weight,
                                            const void* bias, void* out,
                                            FastresStrides out_strides) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (d.n * d.c * d.hw == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    const void* const data[2] = {x, out};
    const FastresStrides strides[2] = {x_strides, out_strides};
    const Plan plan = plan_for<T>(d, out_strides, data, strides, /*reduction=*/false);
    if (!fits(plan)) return cudaErrorInvalidValue;
    return with_variant<T>(plan, [&](auto v, auto ch) -> cudaError_t {
      forward_kernel<T, decltype(v)::value, decltype(ch)::value>
          <<<grid_of(plan), kThreads, 0, stream>>>(plan.g, static_cast<const T*>(x),
                                                   static_cast<T*>(out), walks_of(plan, strides),
                                                   bn_args<A>(mean, rstd, weight, bias));
      return cudaGetLastError();
    });
  });
}

extern "C" int fastres_cuda_bn_relu_backward_reduce(
    int device, cudaStream_t stream, int dtype, FastresShape d, const void* grad_out,
    FastresStrides grad_out_strides, const void* x, FastresStrides x_strides, const void* mean,
    const void* rstd, const void* weight, const void* bias, void* sum_g, void* sum_gx,
    void* workspace) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (d.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    auto* partials = static_cast<GradSums<A>*>(workspace);
    const bool any_elements = d.n * d.hw > 0;
    const void* const data[2] = {grad_out, x};
    const FastresStrides strides[2] = {grad_out_strides, x_strides};
    const Plan plan = plan_for<T>(d, x_strides, data, strides, /*reduction=*/true);
    if (!fits(plan)) return cudaErrorInvalidValue;
    if (any_elements) {
      const cudaError_t error = with_variant<T>(plan, [&](auto v, auto ch) -> cudaError_t {
        grad_partials_kernel<T, decltype(v)::value, decltype(ch)::value>
            <<<grid_of(plan), kThreads, 0, stream>>>(
                plan.g, static_cast<const T*>(grad_out), static_cast<const T*>(x),
                walks_of(plan, strides), bn_args<A>(mean, rstd, weight, bias), d.c, partials);
        return cudaGetLastError();
      });
      if (error != cudaSuccess) return error;
    }
    const FinalizeLaunch f = finalize_launch(d.c);
    grad_finalize_kernel<A><<<finalize_blocks(f, d.c), kThreads, 0, stream>>>(
        f, d.c, any_elements ? int(plan.chunks) : 0, partials, static_cast<A*>(sum_g),
        static_cast<A*>(sum_gx));
    return cudaGetLastError();
  });
}

extern "C" int fastres_cuda_bn_relu_backward_input(
    int device, cudaStream_t stream, int dtype, FastresShape d, const void* grad_out,
    FastresStrides grad_out_strides, const void* x, FastresStrides x_strides, const void* mean,
    const void* rstd, const void* weight, const void* bias, const void* sum_g,
    const void* sum_gx, void* grad_in, FastresStrides grad_in_strides, int training) {
  const DeviceScope scope(device);
  if (scope.error() != cudaSuccess) return scope.error();
  if (d.n * d.c * d.hw == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = Acc<T>;
    const void* const data[3] = {grad_out, x, grad_in};
    const FastresStrides strides[3] = {grad_out_strides, x_strides, grad_in_strides};
    const Plan plan = plan_for<T>(d, grad_in_strides, data, strides, /*reduction=*/false);
    if (!fits(plan)) return cudaErrorInvalidValue;
    const BnArgs<A> bn = bn_args<A>(mean, rstd, weight, bias);
    const auto* g_sums = static_cast<const A*>(sum_g);
    const auto* gx_sums = static_cast<const A*>(sum_gx);
    const A inv_m = A(1) / A(d.n * d.hw);
    return with_variant<T>(plan, [&](auto v, auto ch) -> cudaError_t {
      constexpr int V = decltype(v)::value;
      constexpr bool CH = decltype(ch)::value;
      const Walks<3> w = walks_of(plan, strides);
      const auto* go = static_cast<const T*>(grad_out);
      const auto* xt = static_cast<const T*>(x);
      auto* gi = static_cast<T*>(grad_in);
      if (training) {
        backward_input_kernel<T, V, CH, true><<<grid_of(plan), kThreads, 0, stream>>>(
            plan.g, go, xt, gi, w, bn, g_sums, gx_sums, inv_m);
      } else {
        backward_input_kernel<T, V, CH, false><<<grid_of(plan), kThreads, 0, stream>>>(
            plan.g, go, xt, gi, w, bn, g_sums, gx_sums, inv_m);
      }
      return cudaGetLastError();
    });
  });
}
