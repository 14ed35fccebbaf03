// CUDA kernels of the dense-block ops (interface: dense_cuda.h).
//
// The arithmetic is dense_math.h's, the CPU engine's; only the iteration is
// here. A [N, C, P] problem (P = H * W) is cut one of two ways, by x's layout:
//
//   rows      (NCHW slices: P contiguous) grid (parts, C); block b of channel
//             c takes every parts-th run of kThreads * kUnroll vectors of
//             that channel's N * P elements. Its channel's constants are
//             loaded once, into registers.
//   channels  (channels_last slices: C contiguous) grid (tiles, parts); a
//             block holds kTx * V channels (V per thread, in registers) and
//             kTy rows of positions; block b of a tile takes every parts-th
//             group of positions.
//
// V is the elements per 16-byte access (4 float, 2 double, 8 half): taken
// when every tensor of the call is aligned for it, else 1 (still coalesced).
// Each thread has kUnroll accesses in flight per iteration. The grid is sized
// from the SM count; reductions write [parts, k, C] doubles that a second
// kernel (a warp per channel) merges, so results are deterministic for a
// given device: no atomics, no host synchronization.
//
// Statistics: each thread folds a chunk of up to kUnroll * V elements at a
// time (less the channel's first element, a shift) into a Welford state in
// the math type (float for half types), the chunk's moments computed from
// registers; threads and blocks merge by Chan et al.'s formula, the parts in
// double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dense_cuda.h"
#include "dense_math.h"

// kernel<<<grid, block, 0, stream>>>, spelled so that a host compiler can also
// build this file against tests/cuda_emulator, which defines it first.
#ifndef FASTRES_LAUNCH
#define FASTRES_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

namespace {

namespace math = fastres::math;

constexpr int kThreads = 256;   // per block, both layouts
constexpr int kTx = 16;         // channels layout: threads across channels ...
constexpr int kTy = 16;         // ... and across positions
// Accesses in flight per thread and iteration: 64 bytes of x (32 for half
// types, whose fp32 math would otherwise need too many registers).
template <typename T>
__host__ __device__ constexpr int unroll_of() {
  return sizeof(T) == 2 ? 2 : 4;
}
constexpr int kBlocksPerSm = 8;  // grid target: enough resident threads to cover memory latency
constexpr int64_t kMaxPartCount = int64_t(1) << 23;  // float Welford counts stay exact

// ---- element types ----

template <typename T>
struct MathOf {
  using type = float;  // half types: fp32 math and accumulation
};
template <>
struct MathOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_math(typename MathOf<T>::type v);
template <>
__device__ __forceinline__ float from_math<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_math<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V elements in one access (16 bytes when V * sizeof(T) == 16), moved as a
// CUDA vector type of that size: one 128-bit LDG/STG (the store through the
// st.global.wb intrinsic, which NVVM does not split into scalar stores).
template <int kBytes>
struct Raw;
template <>
struct Raw<16> {
  using type = uint4;
};
template <>
struct Raw<8> {
  using type = uint2;
};
template <>
struct Raw<4> {
  using type = uint32_t;
};
template <>
struct Raw<2> {
  using type = uint16_t;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, typename MathOf<T>::type (&out)[V]) {
  using R = typename Raw<sizeof(T) * V>::type;
  const R raw = *reinterpret_cast<const R*>(p);
  Pack<T, V> pack;
  memcpy(&pack, &raw, sizeof raw);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_math(pack.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const typename MathOf<T>::type (&in)[V]) {
  using R = typename Raw<sizeof(T) * V>::type;
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = from_math<T>(in[i]);
  R raw;
  memcpy(&raw, &pack, sizeof raw);
  __stwb(reinterpret_cast<R*>(p), raw);  // an intrinsic: a plain store of this may be split
}

// ---- indexing ----

// q / d and q % d for 0 <= q < 2^31 by a multiply (Granlund and Montgomery;
// ATen's IntDivider): no integer division in the loops.
struct Divider {
  uint32_t divisor, magic, shift;

  static Divider of(uint32_t d) {
    uint32_t shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    const uint64_t magic = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
    return {d, static_cast<uint32_t>(magic), shift};
  }

  __device__ __forceinline__ void divmod(uint32_t q, uint32_t& quot, uint32_t& rem) const {
    quot = (__umulhi(q, magic) + q) >> shift;
    rem = q - quot * divisor;
  }
};

template <typename T>
struct View {
  T* data;
  int64_t sn, sc, sp;

  __device__ __forceinline__ T* at(int64_t n, int64_t c, int64_t p) const {
    return data + n * sn + c * sc + p * sp;
  }
};

template <typename T>
View<T> view_of(const fastres_view* v) {
  return {static_cast<T*>(v->data), v->sn, v->sc, v->sp};
}

// ---- per-channel constants ----

template <typename A>
struct Channels {
  const A *mean, *rstd, *weight, *bias, *sum_g, *sum_gx;
  A inv_m;  // 1 / (N * P)
};

// A channel's constants, hoisted out of the element loops.
template <typename A>
struct Consts {
  A mean, scale, shift, mean_g, proj;
};

template <typename A, bool kBackward>
__device__ __forceinline__ Consts<A> consts_of(const Channels<A>& ch, int64_t c) {
  Consts<A> k;
  k.mean = ch.mean[c];
  const A rstd = ch.rstd[c];
  k.scale = math::channel_scale(rstd, ch.weight, c);
  k.shift = math::channel_shift(ch.bias, c);
  k.mean_g = A(0);
  k.proj = A(0);
  if (kBackward && ch.sum_g != nullptr)
    math::backward_consts(rstd, ch.sum_g[c], ch.sum_gx[c], ch.inv_m, k.mean_g, k.proj);
  return k;
}

// ---- what a kernel does per element (maps) or folds per channel (reductions) ----

// out = relu(bn(x)).
struct Forward {
  static constexpr bool kBackward = false;
  static constexpr bool kReadsGrad = false;
  template <typename A>
  __device__ __forceinline__ static A apply(A x, A /*g*/, A /*out*/, const Consts<A>& k) {
    return math::bn_relu(x, k.mean, k.scale, k.shift);
  }
};

// grad_in += dx.
template <bool kTraining>
struct BackwardInput {
  static constexpr bool kBackward = true;
  static constexpr bool kReadsGrad = true;
  template <typename A>
  __device__ __forceinline__ static A apply(A x, A g, A grad_in, const Consts<A>& k) {
    return grad_in + math::grad_input<A, kTraining>(x, g, k.mean, k.scale, k.shift, k.mean_g, k.proj);
  }
};

// Welford moments of x: rows sum, M2, count. Folded about a shift, the
// channel's first element if finite (Consts::mean here): x - shift is small where x's
// mean is large against its spread, so the float Welford states lose
// nothing to rounding the running mean; the sum gets count * shift back in
// double.
template <typename A>
struct MomentsFold {
  static constexpr bool kReadsGrad = false;
  static constexpr int kRows = 3;
  using State = math::Welford<A>;

  template <typename T>
  __device__ __forceinline__ static Consts<A> consts(const Channels<A>&, const View<const T>& x,
                                                     int64_t c, bool nonempty) {
    Consts<A> k{};
    k.mean = nonempty ? math::finite_or_zero(to_math(*x.at(0, c, 0))) : A(0);
    return k;
  }

  __device__ __forceinline__ static State zero() { return {A(0), A(0), A(0)}; }

  // The first n of a chunk's kMax values (x; g unused), as one part.
  template <int kMax>
  __device__ __forceinline__ static State chunk(const A (&x)[kMax], const A (&)[kMax], int n,
                                                const Consts<A>& k) {
    A shifted[kMax];
#pragma unroll
    for (int i = 0; i < kMax; ++i) shifted[i] = x[i] - k.mean;
    return math::chunk_moments<A, kMax>(shifted, n);
  }

  __device__ __forceinline__ static State merge(const State& a, const State& b) {
    return math::welford_merge(a, b);
  }

  __device__ __forceinline__ static State shfl_down(const State& s, int offset) {
    return {__shfl_down_sync(0xffffffffu, s.count, offset),
            __shfl_down_sync(0xffffffffu, s.mean, offset),
            __shfl_down_sync(0xffffffffu, s.m2, offset)};
  }

  __device__ __forceinline__ static void write(const State& s, const Consts<A>& k, double* partials,
                                               int64_t part, int64_t channels, int64_t c) {
    const math::Moments m = math::to_moments(s, static_cast<double>(k.mean));
    double* row = partials + part * kRows * channels + c;
    row[0] = m.sum;
    row[channels] = m.m2;
    row[2 * channels] = m.count;
  }
};

// The backward's sums of g and g * (x - mean).
template <typename A>
struct GradSums {
  A g, gx;
};

template <typename A>
struct GradSumsFold {
  static constexpr bool kReadsGrad = true;
  static constexpr int kRows = 2;
  using State = GradSums<A>;

  template <typename T>
  __device__ __forceinline__ static Consts<A> consts(const Channels<A>& ch, const View<const T>&,
                                                     int64_t c, bool) {
    return consts_of<A, false>(ch, c);
  }

  __device__ __forceinline__ static State zero() { return {A(0), A(0)}; }

  template <int kMax>
  __device__ __forceinline__ static State chunk(const A (&x)[kMax], const A (&g)[kMax], int n,
                                                const Consts<A>& k) {
    State s = zero();
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
      const A xmu = x[i] - k.mean;
      const A dy = math::relu_grad(xmu * k.scale + k.shift, g[i]);
      s.g += i < n ? dy : A(0);
      s.gx += i < n ? dy * xmu : A(0);
    }
    return s;
  }

  __device__ __forceinline__ static State merge(const State& a, const State& b) {
    return {a.g + b.g, a.gx + b.gx};
  }

  __device__ __forceinline__ static State shfl_down(const State& s, int offset) {
    return {__shfl_down_sync(0xffffffffu, s.g, offset), __shfl_down_sync(0xffffffffu, s.gx, offset)};
  }

  __device__ __forceinline__ static void write(const State& s, const Consts<A>&, double* partials,
                                               int64_t part, int64_t channels, int64_t c) {
    double* row = partials + part * kRows * channels + c;
    row[0] = static_cast<double>(s.g);
    row[channels] = static_cast<double>(s.gx);
  }
};

// ---- the maps' per-access work, shared by both layouts ----

// One access's operands: x, and g and out where the op reads them.
template <typename T, int V, class Op>
__device__ __forceinline__ void load_operands(const View<const T>& x, const View<const T>& g,
                                              const View<T>& out, int64_t n, int64_t c, int64_t p,
                                              typename MathOf<T>::type (&xv)[V],
                                              typename MathOf<T>::type (&gv)[V],
                                              typename MathOf<T>::type (&ov)[V]) {
  load<T, V>(x.at(n, c, p), xv);
  if (Op::kReadsGrad) load<T, V>(g.at(n, c, p), gv);
  if (Op::kBackward) load<T, V>(out.at(n, c, p), ov);
}

// The constants of element e of an access: one channel's (rows) or channel e's (channels).
template <typename A>
__device__ __forceinline__ const Consts<A>& consts_at(const Consts<A>& k, int) {
  return k;
}
template <typename A, int V>
__device__ __forceinline__ const Consts<A>& consts_at(const Consts<A> (&k)[V], int e) {
  return k[e];
}

// out = the op of one access's operands.
template <typename T, int V, class Op, class K>
__device__ __forceinline__ void apply_store(const View<T>& out, int64_t n, int64_t c, int64_t p,
                                            const typename MathOf<T>::type (&xv)[V],
                                            const typename MathOf<T>::type (&gv)[V],
                                            typename MathOf<T>::type (&ov)[V], const K& k) {
#pragma unroll
  for (int e = 0; e < V; ++e) ov[e] = Op::apply(xv[e], gv[e], ov[e], consts_at(k, e));
  store<T, V>(out.at(n, c, p), ov);
}

// ---- rows layout: grid (parts, C) ----

template <typename T, int V, class Op>
__global__ void __launch_bounds__(kThreads, 1)
    rows_map(View<const T> x, View<const T> g, View<T> out, Channels<typename MathOf<T>::type> ch,
             int64_t vectors, Divider per_row) {
  using A = typename MathOf<T>::type;
  constexpr int kUnroll = unroll_of<T>();
  const int64_t c = blockIdx.y;
  const Consts<A> k = consts_of<A, Op::kBackward>(ch, c);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t base = int64_t(blockIdx.x) * kThreads + threadIdx.x; base < vectors;
       base += kUnroll * stride) {
    A xv[kUnroll][V], gv[kUnroll][V], ov[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < vectors) {
        uint32_t n, pv;
        per_row.divmod(static_cast<uint32_t>(i), n, pv);
        load_operands<T, V, Op>(x, g, out, n, c, int64_t(pv) * V, xv[u], gv[u], ov[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < vectors) {
        uint32_t n, pv;  // recomputed (a multiply): fewer live registers than keeping it
        per_row.divmod(static_cast<uint32_t>(i), n, pv);
        apply_store<T, V, Op>(out, n, c, int64_t(pv) * V, xv[u], gv[u], ov[u], k);
      }
    }
  }
}

template <class Fold, typename State>
__device__ __forceinline__ State warp_fold(State s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s = Fold::merge(s, Fold::shfl_down(s, offset));
  return s;
}

template <typename T, int V, class Fold>
__global__ void __launch_bounds__(kThreads, 1)
    rows_reduce(View<const T> x, View<const T> g, Channels<typename MathOf<T>::type> ch,
                int64_t vectors, Divider per_row, double* partials, int64_t channels) {
  using A = typename MathOf<T>::type;
  using State = typename Fold::State;
  constexpr int kUnroll = unroll_of<T>();
  const int64_t c = blockIdx.y;
  const Consts<A> k = Fold::consts(ch, x, c, vectors > 0);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  State s = Fold::zero();
  for (int64_t base = int64_t(blockIdx.x) * kThreads + threadIdx.x; base < vectors;
       base += kUnroll * stride) {
    A xv[kUnroll * V], gv[kUnroll * V];
    int valid = 0;  // the valid accesses are a prefix
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < vectors) {
        uint32_t n, pv;
        per_row.divmod(static_cast<uint32_t>(i), n, pv);
        const int64_t p = int64_t(pv) * V;
        A tmp[V];
        load<T, V>(x.at(n, c, p), tmp);
#pragma unroll
        for (int e = 0; e < V; ++e) xv[u * V + e] = tmp[e];
        if (Fold::kReadsGrad) {
          load<T, V>(g.at(n, c, p), tmp);
#pragma unroll
          for (int e = 0; e < V; ++e) gv[u * V + e] = tmp[e];
        }
        valid = u + 1;
      }
    }
    s = Fold::merge(s, Fold::template chunk<kUnroll * V>(xv, gv, valid * V, k));
  }
  // The block's threads, in a fixed order: each warp, then the warps.
  __shared__ State warps[kThreads / 32];
  s = warp_fold<Fold>(s);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < kThreads / 32 ? warps[threadIdx.x] : Fold::zero();
    s = warp_fold<Fold>(s);
    if (threadIdx.x == 0) Fold::write(s, k, partials, blockIdx.x, channels, c);
  }
}

// ---- channels layout: grid (tiles, parts), block (kTx, kTy) ----

template <typename T, int V, class Op>
__global__ void __launch_bounds__(kThreads, 1)
    channels_map(View<const T> x, View<const T> g, View<T> out,
                 Channels<typename MathOf<T>::type> ch, int64_t channels, int64_t positions,
                 Divider per_image) {
  using A = typename MathOf<T>::type;
  constexpr int kUnroll = unroll_of<T>();
  const int64_t c0 = (int64_t(blockIdx.x) * kTx + threadIdx.x) * V;
  if (c0 >= channels) return;  // V divides channels when V > 1: whole vectors only
  Consts<A> k[V];
#pragma unroll
  for (int e = 0; e < V; ++e) k[e] = consts_of<A, Op::kBackward>(ch, c0 + e);
  const int64_t stride = int64_t(gridDim.y) * kTy;
  for (int64_t base = int64_t(blockIdx.y) * kTy + threadIdx.y; base < positions;
       base += kUnroll * stride) {
    A xv[kUnroll][V], gv[kUnroll][V], ov[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t q = base + u * stride;
      if (q < positions) {
        uint32_t n, p;
        per_image.divmod(static_cast<uint32_t>(q), n, p);
        load_operands<T, V, Op>(x, g, out, n, c0, p, xv[u], gv[u], ov[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t q = base + u * stride;
      if (q < positions) {
        uint32_t n, p;
        per_image.divmod(static_cast<uint32_t>(q), n, p);
        apply_store<T, V, Op>(out, n, c0, p, xv[u], gv[u], ov[u], k);
      }
    }
  }
}

template <typename T, int V, class Fold>
__global__ void __launch_bounds__(kThreads, 1)
    channels_reduce(View<const T> x, View<const T> g, Channels<typename MathOf<T>::type> ch,
                    int64_t channels, int64_t positions, Divider per_image, double* partials) {
  using A = typename MathOf<T>::type;
  using State = typename Fold::State;
  constexpr int kUnroll = unroll_of<T>();
  const int64_t c0 = (int64_t(blockIdx.x) * kTx + threadIdx.x) * V;
  const bool active = c0 < channels;
  Consts<A> k[V];
  State s[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    k[e] = active ? Fold::consts(ch, x, c0 + e, positions > 0) : Consts<A>{};
    s[e] = Fold::zero();
  }
  const int64_t stride = int64_t(gridDim.y) * kTy;
  for (int64_t base = int64_t(blockIdx.y) * kTy + threadIdx.y; active && base < positions;
       base += kUnroll * stride) {
    A xv[kUnroll][V], gv[kUnroll][V];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t q = base + u * stride;
      if (q < positions) {
        uint32_t n, p;
        per_image.divmod(static_cast<uint32_t>(q), n, p);
        load<T, V>(x.at(n, c0, p), xv[u]);
        if (Fold::kReadsGrad) load<T, V>(g.at(n, c0, p), gv[u]);
        valid = u + 1;
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {  // channel e's chunk: its kUnroll positions
      A xc[kUnroll], gc[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        xc[u] = xv[u][e];
        gc[u] = gv[u][e];
      }
      s[e] = Fold::merge(s[e], Fold::template chunk<kUnroll>(xc, gc, valid, k[e]));
    }
  }
  // Fold the kTy rows of positions: a tree over threadIdx.y in shared memory.
  __shared__ State rows[kTy][kTx * V];
#pragma unroll
  for (int e = 0; e < V; ++e) rows[threadIdx.y][threadIdx.x * V + e] = s[e];
  __syncthreads();
#pragma unroll
  for (int half = kTy / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int col = threadIdx.x * V + e;
        rows[threadIdx.y][col] = Fold::merge(rows[threadIdx.y][col], rows[threadIdx.y + half][col]);
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int e = 0; e < V; ++e)
      Fold::write(rows[0][threadIdx.x * V + e], k[e], partials, blockIdx.y, channels, c0 + e);
  }
}

// ---- merging the parts: a warp per channel ----

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// [parts, 3, C] moments -> the merged [3, C] moments, or the statistics
// (mean, rstd and the running update, in P).
template <typename P>
__global__ void __launch_bounds__(kThreads, 1)
    finish_moments(const double* moments, int64_t parts, int64_t channels, double momentum,
                   double eps, P* running_mean, P* running_var, P* mean, P* rstd,
                   double* moments_out) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;
  auto part = [&](int64_t k) {
    const double* row = moments + k * 3 * channels + c;
    return math::Moments{row[2 * channels], row[0], row[channels]};
  };
  double count = 0.0, sum = 0.0;
  for (int64_t k = lane; k < parts; k += 32) {
    const math::Moments m = part(k);
    count += m.count;
    sum += m.sum;
  }
  count = warp_sum(count);
  sum = warp_sum(sum);
  const double mu = sum / count;
  double m2 = 0.0;
  for (int64_t k = lane; k < parts; k += 32) m2 += math::chan_term(part(k), mu);
  m2 = warp_sum(m2);
  if (lane != 0) return;
  const math::Moments total{count, sum, m2};
  if (moments_out != nullptr) {
    moments_out[c] = total.sum;
    moments_out[channels + c] = total.m2;
    moments_out[2 * channels + c] = total.count;
    return;
  }
  const bool running = running_mean != nullptr;
  const math::Finished f =
      math::finish(total, eps, momentum, running ? static_cast<double>(running_mean[c]) : 0.0,
                   running ? static_cast<double>(running_var[c]) : 0.0);
  mean[c] = static_cast<P>(f.mean);
  rstd[c] = static_cast<P>(f.rstd);
  if (running) {
    running_mean[c] = static_cast<P>(f.running_mean);
    running_var[c] = static_cast<P>(f.running_var);
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads, 1)
    finish_sums(const double* partials, int64_t parts, int64_t channels, P* sum_g, P* sum_gx) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;
  double g = 0.0, gx = 0.0;
  for (int64_t k = lane; k < parts; k += 32) {
    g += partials[k * 2 * channels + c];
    gx += partials[(k * 2 + 1) * channels + c];
  }
  g = warp_sum(g);
  gx = warp_sum(gx);
  if (lane == 0) {
    sum_g[c] = static_cast<P>(g);
    sum_gx[c] = static_cast<P>(gx);
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads, 1)
    running_stats(const P* running_mean, const P* running_var, double eps, int64_t channels,
                  P* mean, P* rstd) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  mean[c] = running_mean[c];
  rstd[c] = static_cast<P>(math::rstd_of(static_cast<double>(running_var[c]), eps));
}

// ---- host side: plans and launches ----

int element_size(int dtype) {
  return dtype == FASTRES_FLOAT64 ? 8 : dtype == FASTRES_FLOAT32 ? 4 : 2;
}

int sm_count(int device) {
  static int cached[64] = {};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    sms = 1;
  if (device >= 0 && device < 64) cached[device] = sms;
  return sms;
}

// How a call over [N, C, P] tensors runs: which layout, the access width V,
// the grid, and for reductions the parts per channel.
struct Plan {
  bool channels_layout;
  int vec;
  dim3 grid, block;
  int64_t parts;
  int64_t work;  // rows: vectors per channel; channels: positions
  Divider divider;
};

// Whether v can be read and written V = wide elements at a time in this
// layout: 16-byte aligned, contiguous along the vectorized axis (P in rows,
// C in channels), every other step a multiple of V, and V dividing that axis.
bool vectorizable(const fastres_view* v, bool channels_layout, int64_t c, int64_t p, int wide) {
  if (reinterpret_cast<uintptr_t>(v->data) % 16 != 0 || v->sn % wide != 0) return false;
  return channels_layout ? v->sc == 1 && v->sp % wide == 0 && c % wide == 0
                         : v->sp == 1 && v->sc % wide == 0 && p % wide == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

int make_plan(const fastres_problem* pr, const fastres_view* const* views, int count, Plan* plan) {
  const fastres_view* x = views[0];
  // channels_last slices have the channels innermost; anything else iterates by rows.
  plan->channels_layout = pr->c > 1 && x->sc == 1 && x->sp != 1;
  const int size = element_size(pr->dtype), wide = 16 / size, unroll = size == 2 ? 2 : 4;
  bool vectorize = true;
  for (int i = 0; i < count; ++i)
    if (views[i] != nullptr)
      vectorize = vectorize && vectorizable(views[i], plan->channels_layout, pr->c, pr->p, wide);
  plan->vec = vectorize ? wide : 1;
  const int64_t target = int64_t(sm_count(pr->device)) * kBlocksPerSm;
  const int64_t positions = pr->n * pr->p;
  if (pr->c > 65535 || positions >= (int64_t(1) << 31)) return FASTRES_TOO_LARGE;
  const int64_t min_parts = ceil_div(positions, kMaxPartCount);
  if (plan->channels_layout) {
    const int64_t tiles = ceil_div(pr->c, int64_t(kTx) * plan->vec);
    plan->parts = clamp(ceil_div(positions, int64_t(kTy) * unroll), 1,
                        std::max<int64_t>(min_parts, ceil_div(target, std::max<int64_t>(tiles, 1))));
    if (plan->parts > 65535) return FASTRES_TOO_LARGE;
    plan->grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(plan->parts));
    plan->block = dim3(kTx, kTy);
    plan->work = positions;
    plan->divider = Divider::of(static_cast<uint32_t>(std::max<int64_t>(pr->p, 1)));
  } else {
    plan->work = positions / plan->vec;
    plan->parts = clamp(ceil_div(plan->work, int64_t(kThreads) * unroll), 1,
                        std::max<int64_t>(min_parts, ceil_div(target, std::max<int64_t>(pr->c, 1))));
    plan->grid = dim3(static_cast<unsigned>(plan->parts), static_cast<unsigned>(pr->c));
    plan->block = dim3(kThreads);
    plan->divider = Divider::of(static_cast<uint32_t>(std::max<int64_t>(pr->p / plan->vec, 1)));
  }
  return 0;
}

// Runs f on the problem's device (restoring the caller's), returning the launch's error.
template <class F>
int on_device(const fastres_problem* pr, F&& f) {
  if (pr->c == 0) return 0;  // nothing to do (and no empty grid to launch)
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (previous != pr->device && (err = cudaSetDevice(pr->device)) != cudaSuccess) return err;
  f();
  err = cudaGetLastError();
  if (previous != pr->device) cudaSetDevice(previous);
  return err;
}

template <typename T>
Channels<typename MathOf<T>::type> channels_of(const fastres_problem* pr, const fastres_channels* ch) {
  using A = typename MathOf<T>::type;
  Channels<A> out{};
  if (ch != nullptr) {
    out.mean = static_cast<const A*>(ch->mean);
    out.rstd = static_cast<const A*>(ch->rstd);
    out.weight = static_cast<const A*>(ch->weight);
    out.bias = static_cast<const A*>(ch->bias);
    out.sum_g = static_cast<const A*>(ch->sum_g);
    out.sum_gx = static_cast<const A*>(ch->sum_gx);
  }
  out.inv_m = A(1) / A(pr->n * pr->p);
  return out;
}

template <typename T, class Op>
int launch_map(const fastres_problem* pr, const fastres_view* x, const fastres_view* g,
               const fastres_channels* ch, const fastres_view* out) {
  const fastres_view* views[] = {x, g, out};
  Plan plan;
  if (const int err = make_plan(pr, views, 3, &plan)) return err;
  const View<const T> xv = view_of<const T>(x), gv = g ? view_of<const T>(g) : View<const T>{};
  const View<T> ov = view_of<T>(out);
  const auto chs = channels_of<T>(pr, ch);
  auto stream = static_cast<cudaStream_t>(pr->stream);
  constexpr int kWide = 16 / sizeof(T);
  return on_device(pr, [&] {
    if (plan.channels_layout) {
      auto kernel = plan.vec == kWide ? channels_map<T, kWide, Op> : channels_map<T, 1, Op>;
      FASTRES_LAUNCH(kernel, plan.grid, plan.block, stream)(xv, gv, ov, chs, pr->c, plan.work,
                                                            plan.divider);
    } else {
      auto kernel = plan.vec == kWide ? rows_map<T, kWide, Op> : rows_map<T, 1, Op>;
      FASTRES_LAUNCH(kernel, plan.grid, plan.block, stream)(xv, gv, ov, chs, plan.work, plan.divider);
    }
  });
}

template <typename T, template <typename> class FoldOf>
int launch_reduce(const fastres_problem* pr, const fastres_view* x, const fastres_view* g,
                  const fastres_channels* ch, double* partials, int64_t parts) {
  using Fold = FoldOf<typename MathOf<T>::type>;
  const fastres_view* views[] = {x, g};
  Plan plan;
  if (const int err = make_plan(pr, views, 2, &plan)) return err;
  if (plan.parts != parts) return cudaErrorInvalidValue;  // the workspace was sized for another plan
  const View<const T> xv = view_of<const T>(x), gv = g ? view_of<const T>(g) : View<const T>{};
  const auto chs = channels_of<T>(pr, ch);
  auto stream = static_cast<cudaStream_t>(pr->stream);
  constexpr int kWide = 16 / sizeof(T);
  return on_device(pr, [&] {
    if (plan.channels_layout) {
      auto kernel = plan.vec == kWide ? channels_reduce<T, kWide, Fold> : channels_reduce<T, 1, Fold>;
      FASTRES_LAUNCH(kernel, plan.grid, plan.block, stream)(xv, gv, chs, pr->c, plan.work,
                                                            plan.divider, partials);
    } else {
      auto kernel = plan.vec == kWide ? rows_reduce<T, kWide, Fold> : rows_reduce<T, 1, Fold>;
      FASTRES_LAUNCH(kernel, plan.grid, plan.block, stream)(xv, gv, chs, plan.work, plan.divider,
                                                            partials, pr->c);
    }
  });
}

// Calls f<T>() for the problem's element type.
template <template <typename> class F, typename... Args>
int dispatch(int dtype, Args&&... args) {
  switch (dtype) {
    case FASTRES_FLOAT32: return F<float>::run(args...);
    case FASTRES_FLOAT64: return F<double>::run(args...);
    case FASTRES_FLOAT16: return F<__half>::run(args...);
    case FASTRES_BFLOAT16: return F<__nv_bfloat16>::run(args...);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
struct ForwardCall {
  static int run(const fastres_problem* pr, const fastres_view* x, const fastres_channels* ch,
                 const fastres_view* out) {
    return launch_map<T, Forward>(pr, x, nullptr, ch, out);
  }
};

template <typename T>
struct InputCall {
  static int run(const fastres_problem* pr, const fastres_view* g, const fastres_view* x,
                 const fastres_channels* ch, const fastres_view* grad_in, int training) {
    return training ? launch_map<T, BackwardInput<true>>(pr, x, g, ch, grad_in)
                    : launch_map<T, BackwardInput<false>>(pr, x, g, ch, grad_in);
  }
};

template <typename T>
struct MomentsCall {
  static int run(const fastres_problem* pr, const fastres_view* x, double* partials, int64_t parts) {
    return launch_reduce<T, MomentsFold>(pr, x, nullptr, nullptr, partials, parts);
  }
};

template <typename T>
struct SumsCall {
  static int run(const fastres_problem* pr, const fastres_view* g, const fastres_view* x,
                 const fastres_channels* ch, double* partials, int64_t parts) {
    return launch_reduce<T, GradSumsFold>(pr, x, g, ch, partials, parts);
  }
};

unsigned warp_blocks(int64_t channels) { return static_cast<unsigned>(ceil_div(channels * 32, kThreads)); }

}  // namespace

extern "C" {

const char* fastres_cuda_error_string(int code) {
  if (code == FASTRES_NOT_BUILT) return "fastres._C was built without its CUDA kernels";
  if (code == FASTRES_TOO_LARGE)
    return "the tensor is too large for these kernels (at most 65535 channels and 2^31 positions "
           "per channel)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int fastres_cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // not sticky: clear it
  }
  return err;
}

int fastres_cuda_reduce_parts(const fastres_problem* pr, const fastres_view* x,
                              const fastres_view* grad_out, int64_t* parts) {
  return fastres_cuda_plan(pr, x, grad_out, nullptr, nullptr, nullptr, parts);
}

int fastres_cuda_plan(const fastres_problem* pr, const fastres_view* x, const fastres_view* second,
                      const fastres_view* third, int* channels_layout, int* vec, int64_t* parts) {
  const fastres_view* views[] = {x, second, third};
  Plan plan;
  if (const int err = make_plan(pr, views, 3, &plan)) return err;
  if (channels_layout != nullptr) *channels_layout = plan.channels_layout ? 1 : 0;
  if (vec != nullptr) *vec = plan.vec;
  if (parts != nullptr) *parts = plan.parts;
  return 0;
}

int fastres_cuda_moments(const fastres_problem* pr, const fastres_view* x, double* partials,
                         int64_t parts) {
  return dispatch<MomentsCall>(pr->dtype, pr, x, partials, parts);
}

int fastres_cuda_finish_moments(const fastres_problem* pr, const double* moments, int64_t parts,
                                double momentum, double eps, void* running_mean,
                                void* running_var, void* mean, void* rstd, double* moments_out) {
  auto stream = static_cast<cudaStream_t>(pr->stream);
  const unsigned blocks = warp_blocks(pr->c);
  return on_device(pr, [&] {
    if (pr->dtype == FASTRES_FLOAT64)
      FASTRES_LAUNCH(finish_moments<double>, blocks, kThreads, stream)(
          moments, parts, pr->c, momentum, eps, static_cast<double*>(running_mean),
          static_cast<double*>(running_var), static_cast<double*>(mean), static_cast<double*>(rstd),
          moments_out);
    else
      FASTRES_LAUNCH(finish_moments<float>, blocks, kThreads, stream)(
          moments, parts, pr->c, momentum, eps, static_cast<float*>(running_mean),
          static_cast<float*>(running_var), static_cast<float*>(mean), static_cast<float*>(rstd),
          moments_out);
  });
}

int fastres_cuda_running_stats(const fastres_problem* pr, const void* running_mean,
                               const void* running_var, double eps, void* mean, void* rstd) {
  auto stream = static_cast<cudaStream_t>(pr->stream);
  const unsigned blocks = static_cast<unsigned>(ceil_div(pr->c, kThreads));
  return on_device(pr, [&] {
    if (pr->dtype == FASTRES_FLOAT64)
      FASTRES_LAUNCH(running_stats<double>, blocks, kThreads, stream)(
          static_cast<const double*>(running_mean), static_cast<const double*>(running_var), eps,
          pr->c, static_cast<double*>(mean), static_cast<double*>(rstd));
    else
      FASTRES_LAUNCH(running_stats<float>, blocks, kThreads, stream)(
          static_cast<const float*>(running_mean), static_cast<const float*>(running_var), eps,
          pr->c, static_cast<float*>(mean), static_cast<float*>(rstd));
  });
}

int fastres_cuda_bn_relu_forward(const fastres_problem* pr, const fastres_view* x,
                                 const fastres_channels* ch, const fastres_view* out) {
  return dispatch<ForwardCall>(pr->dtype, pr, x, ch, out);
}

int fastres_cuda_grad_sums(const fastres_problem* pr, const fastres_view* grad_out,
                           const fastres_view* x, const fastres_channels* ch, double* partials,
                           int64_t parts) {
  return dispatch<SumsCall>(pr->dtype, pr, grad_out, x, ch, partials, parts);
}

int fastres_cuda_finish_sums(const fastres_problem* pr, const double* partials, int64_t parts,
                             void* sum_g, void* sum_gx) {
  auto stream = static_cast<cudaStream_t>(pr->stream);
  const unsigned blocks = warp_blocks(pr->c);
  return on_device(pr, [&] {
    if (pr->dtype == FASTRES_FLOAT64)
      FASTRES_LAUNCH(finish_sums<double>, blocks, kThreads, stream)(
          partials, parts, pr->c, static_cast<double*>(sum_g), static_cast<double*>(sum_gx));
    else
      FASTRES_LAUNCH(finish_sums<float>, blocks, kThreads, stream)(
          partials, parts, pr->c, static_cast<float*>(sum_g), static_cast<float*>(sum_gx));
  });
}

int fastres_cuda_bn_relu_backward_input(const fastres_problem* pr, const fastres_view* grad_out,
                                        const fastres_view* x, const fastres_channels* ch,
                                        const fastres_view* grad_in, int training) {
  return dispatch<InputCall>(pr->dtype, pr, grad_out, x, ch, grad_in, training);
}

}  // extern "C"
