// The dense-block ops' arithmetic, written once: per element (BN-ReLU, its
// gradient, the input gradient) and per channel (scale and shift, the
// backward's constants, Chan et al.'s merge of moments, the statistics and
// the running-statistics update). Plain scalar functions callable from host
// and device code (FASTRES_HD), the pattern of ATen's shared CPU/CUDA math:
// dense_cpu.cpp's loops call them, and a CUDA kernel over the same data
// calls the same functions; only the iteration differs. No torch headers, so
// nvcc can compile a .cu that includes this without torch's CUDA headers.
//
// Types: T is the element type of the math (float or double); statistics are
// finished in double and rounded once, as eager CPU batch norm does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define FASTRES_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTRES_HD inline __attribute__((always_inline))
#else
#define FASTRES_HD inline
#endif

#if defined(__CUDACC__)
#define FASTRES_UNROLL _Pragma("unroll")
#else
#define FASTRES_UNROLL _Pragma("GCC unroll 16")
#endif

namespace fastres::math {

// ---- per element ----

template <typename T>
FASTRES_HD T relu(T y) {  // NaN stays NaN, like torch.relu
  return y <= T(0) ? T(0) : y;
}

template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};

// threshold_backward(g, y, 0): the gradient passes where not (y <= 0), NaN y
// included. Without a branch (so that loops vectorize): g's bits, masked.
template <typename T>
FASTRES_HD T relu_grad(T y, T g) {
  using U = typename BitsOf<T>::type;
  U bits;
  memcpy(&bits, &g, sizeof bits);
  bits &= y <= T(0) ? U(0) : ~U(0);
  T dy;
  memcpy(&dy, &bits, sizeof dy);
  return dy;
}

// The batch norm's affine output before the ReLU: y = (x - mean) * scale + shift.
template <typename T>
FASTRES_HD T affine(T x, T mean, T scale, T shift) {
  return (x - mean) * scale + shift;
}

template <typename T>
FASTRES_HD T bn_relu(T x, T mean, T scale, T shift) {
  return relu(affine(x, mean, scale, shift));
}

// One element's input gradient dx, for grad_in += dx. Eval takes dx = dy * scale
// alone: 0 * (x - mean) would turn an infinite x into NaN.
template <typename T, bool kTraining>
FASTRES_HD T grad_input(T xv, T gv, T mean, T scale, T shift, T mean_g, T proj) {
  const T xmu = xv - mean;
  const T dy = relu_grad(xmu * scale + shift, gv);
  return kTraining ? (dy - mean_g - xmu * proj) * scale : dy * scale;
}

// ---- per channel ----

// scale = rstd * weight and shift = bias (an absent weight or bias: 1 or 0).
template <typename T>
FASTRES_HD T channel_scale(T rstd, const T* weight, int64_t c) {
  return weight != nullptr ? rstd * weight[c] : rstd;
}

template <typename T>
FASTRES_HD T channel_shift(const T* bias, int64_t c) {
  return bias != nullptr ? bias[c] : T(0);
}

// The training backward's per-channel constants over m elements:
// mean_g = sum_g / m and proj = rstd^2 * sum_gx / m.
template <typename T>
FASTRES_HD void backward_consts(T rstd, T sum_g, T sum_gx, T inv_m, T& mean_g, T& proj) {
  mean_g = sum_g * inv_m;
  proj = rstd * rstd * sum_gx * inv_m;
}

// Moments of one channel's elements (or a part of them): their count, sum and
// M2 (the sum of their squared deviations from their mean).
struct Moments {
  double count, sum, m2;
};

// Chan et al.'s merge: part p's share of the total M2, given the total mean:
// M2_p + n_p * (mean_p - mean)^2. An empty part adds nothing (its mean is NaN).
FASTRES_HD double chan_term(const Moments& p, double mean) {
  if (p.count == 0) return 0.0;
  const double shift = p.sum / p.count - mean;
  return p.m2 + p.count * shift * shift;
}

// A stream's moments in the math type A (float for half types: fp32
// accumulation, as eager CUDA batch norm): count, mean and M2. A CUDA thread
// folds in a chunk of elements at a time (the chunk's own moments, from
// registers) and threads fold into each other, both by Chan et al.'s pairwise
// update: one reciprocal per merge, no division per element.
template <typename A>
struct Welford {
  A count, mean, m2;
};

template <typename A>
FASTRES_HD Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.count == A(0)) return a;
  if (a.count == A(0)) return b;
  const A count = a.count + b.count;
  const A wb = b.count * (A(1) / count);
  const A delta = b.mean - a.mean;
  return {count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// The Welford state of the first n (1 <= n <= kMax) of a chunk's values,
// from registers: their mean, then their squared deviations from it.
template <typename A, int kMax>
FASTRES_HD Welford<A> chunk_moments(const A (&x)[kMax], int n) {
  A sum = A(0);
FASTRES_UNROLL
  for (int i = 0; i < kMax; ++i) sum += i < n ? x[i] : A(0);
  const A mean = sum * (n == kMax ? A(1) / A(kMax) : A(1) / A(n));  // a constant unless a tail
  A m2 = A(0);
FASTRES_UNROLL
  for (int i = 0; i < kMax; ++i) {
    const A d = x[i] - mean;
    m2 += i < n ? d * d : A(0);
  }
  return {A(n), mean, m2};
}

// A statistics shift: v, or 0 if v is infinite or NaN (x - shift must stay
// finite wherever x is: a non-finite shift would make every value non-finite).
template <typename A>
FASTRES_HD A finite_or_zero(A v) {
  return v - v == A(0) ? v : A(0);
}

// A part's Moments (double) from its Welford state over values x - shift.
template <typename A>
FASTRES_HD Moments to_moments(const Welford<A>& w, double shift) {
  const double count = static_cast<double>(w.count);
  return {count, count * (static_cast<double>(w.mean) + shift), static_cast<double>(w.m2)};
}

FASTRES_HD double quiet_nan() {
#if defined(__CUDA_ARCH__)
  return nan("");
#else
  return std::numeric_limits<double>::quiet_NaN();
#endif
}

FASTRES_HD double rstd_of(double var, double eps) { return 1.0 / sqrt(var + eps); }

// A channel's statistics from its moments: mean, rstd of the biased variance,
// and the running statistics after the update with the unbiased variance.
struct Finished {
  double mean, rstd, running_mean, running_var;
};

FASTRES_HD Finished finish(const Moments& m, double eps, double momentum, double running_mean,
                           double running_var) {
  const double m2 = m.m2 < 0 ? 0.0 : m.m2;  // not max: NaN must stay NaN
  const double mu = m.sum / m.count;         // no elements: NaN, like an empty mean
  const double unbiased = m.count > 0 ? m2 / (m.count - 1) : quiet_nan();
  return {mu, rstd_of(m2 / m.count, eps), momentum * mu + (1 - momentum) * running_mean,
          momentum * unbiased + (1 - momentum) * running_var};
}

}  // namespace fastres::math
