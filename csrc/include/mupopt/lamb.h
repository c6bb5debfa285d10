// LAMB (You et al. 2019, Algorithm 2 with bias correction, trust ratio on every tensor).
//
//   m = lerp(m, g, 1-b1) ;  v = b2*v + (1-b2)*g*g
//   u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps*eps_mult) + wd*p
//   trust = phi(||p||) / ||u||  if both norms > 0, else 1       (phi(x) = min(x, clamp_value))
//   p += (-lr*lr_mult) * (u*trust)
//
// Two passes, pass 1 giving the per-tensor norms that pass 2 needs, in one of three forms:
//  float32 or float64 states, a block of tensors of at most kLambBlock elements (CPU: the passes
//  of each block run back to back, so pass 2 reads what pass 1 left in the cache):
//   LambNormOp<kMomentsAndDirection>: reads p g m v, writes m v and u (a scratch of the states'
//                                     dtype, stream 4), sums p*p and u*u per tensor (float64)
//   (host or a small kernel: trust per tensor, written into the row's kTrust scalar)
//   LambUpdateOp<kFromDirection>:     reads p u, writes p
//  float32 or float64 states otherwise (the best known byte count from memory, performance.md:
//  40 B per element, and no scratch as large as the tensor):
//   LambNormOp<kMoments>:             reads p g m v, writes m v, sums
//   LambUpdateOp<kFromMoments>:       reads p m v, recomputes u from the stored m v, writes p
//  bfloat16 or float16 states, and the states of formats 16 and 8 (state_bits): the second pass
//  must not see m and v rounded to 16 bits or quantized (the reference forms u from their float32
//  values; reading the rounded ones moved a few parameters by up to 8 bf16 ulps in 10 steps), so
//  the first pass only sums and the second recomputes m, v and u, and stores them, once, from
//  the same old values (format 8: the same decoded blocks):
//   LambNormOp<kNothing>:             reads p g m v, sums
//   LambUpdateOp<kRecompute>:         reads p g m v, writes p m v (all 16-bit: 22 B per element)
// Recomputed values are bit-identical to the first pass's (same inputs, same operations).
//
// Split form (ops lamb_partials_ / lamb_apply_, for sharded tensors whose norms are reduced
// across ranks between the passes): the same Ops over the whole list, no blocks, so two
// passes over memory. lamb_partials_ runs LambNormOp<kMoments> (float32 or float64 states) or
// <kNothing> (16-bit states) and returns each tensor's two sums (float64, chunk partials added in
// chunk order, as above); lamb_apply_ takes the reduced sums, forms the trust ratios with
// lamb_trust and runs LambUpdateOp<kFromMoments> or <kRecompute>. With the sums unchanged the
// result is bit for bit the one-call form's.
#pragma once

#include "common.h"
#include "storage.h"

namespace mupopt {

struct LambScalars {
  enum : int { kBc1 = 0, kBc2 = 1, kEps = 2, kAlpha = 3, kTrust = 4, kCount = 5 };
};

template <class T>
struct LambCoefs {
  Lerp<T> m_lerp;  // weight 1 - beta1
  T beta2;
  T one_minus_beta2;
  T weight_decay;
  T clamp_value;  // used when has_clamp
  int32_t has_clamp;
};
using LambHyper = PerCompute<LambCoefs>;

template <class T>
MUPOPT_HD inline LambCoefs<T> lamb_coefs(double beta1, double beta2, double weight_decay, bool has_clamp,
                                         double clamp_value) {
  LambCoefs<T> h;
  h.m_lerp = Lerp<T>::make(static_cast<T>(1.0 - beta1));
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  h.weight_decay = static_cast<T>(weight_decay);
  h.has_clamp = has_clamp ? 1 : 0;
  h.clamp_value = has_clamp ? static_cast<T>(clamp_value) : T(0);
  return h;
}

MUPOPT_HD inline LambHyper make_lamb_hyper(double beta1, double beta2, double weight_decay, bool has_clamp,
                                           double clamp_value) {
  return LambHyper{lamb_coefs<float>(beta1, beta2, weight_decay, has_clamp, clamp_value),
                   lamb_coefs<double>(beta1, beta2, weight_decay, has_clamp, clamp_value)};
}

// The trust-ratio-free direction u from the new m, v.
template <bool kFma, class T>
MUPOPT_HDI T lamb_direction(T p, T m, T v, const LambCoefs<T>& h, T bc1, T bc2, T eps) {
  const T denom = sqrt_of(v / bc2) + eps;
  return madd<kFma>(p, h.weight_decay, (m / bc1) / denom);
}

// From the per-tensor sums of squares. Norms rounded to the compute type (float32: as torch's
// fp32 vector_norm returns them); phi / ||u|| in the compute type.
template <class T>
MUPOPT_HDI T lamb_trust(double p_sq, double u_sq, const LambCoefs<T>& h) {
  const T w_norm = static_cast<T>(sqrt(p_sq));
  const T u_norm = static_cast<T>(sqrt(u_sq));
  const T phi = h.has_clamp ? min_nan(w_norm, h.clamp_value) : w_norm;
  return (w_norm > T(0) && u_norm > T(0)) ? phi / u_norm : T(1);
}

template <bool kFma, class T>
MUPOPT_HDI T lamb_moments(T p, T g, T& m, T& v, const LambCoefs<T>& h, T bc1, T bc2, T eps) {
  m = h.m_lerp.template apply<kFma>(m, g);
  v = madd<kFma>(h.one_minus_beta2 * g, g, v * h.beta2);
  return lamb_direction<kFma>(p, m, v, h, bc1, bc2, eps);
}

// What pass 1 stores besides the sums, and where pass 2 gets u from (see the header comment).
enum class LambKeep { kNothing, kMoments, kMomentsAndDirection };
enum class LambSource { kRecompute, kFromMoments, kFromDirection };

// Pass 1. Streams: 0 param (read), 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 u (scratch of the states'
// dtype, written with kMomentsAndDirection). red = (p*p, u*u).
template <LambKeep kKeep>
struct LambNormOp {
  static constexpr int kStreams = kKeep == LambKeep::kMomentsAndDirection ? 5 : 4;
  static constexpr unsigned kLoad = 0x0Fu;
  static constexpr unsigned kStore =
      kKeep == LambKeep::kNothing ? 0x00u : (kKeep == LambKeep::kMoments ? 0x0Cu : 0x1Cu);
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 2;
  // States of formats 16 and 8: pass 1 only sums (see the header comment).
  static constexpr unsigned kStateFormats =
      kKeep == LambKeep::kNothing ? kOptimizerFormats : format_bit(StateFormat::kParam);
  // Keeping the moments (or the direction) is for float32 / float64 params with format-32 states
  // only (the CPU driver instantiates nothing else for it: csrc/cpu/driver.h).
  static constexpr bool kWideParamsOnly = kKeep != LambKeep::kNothing;
  LambHyper h;

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T* s, T* red) const {
    using S = LambScalars;
    const LambCoefs<T>& c = h.template get<T>();
    const T u = lamb_moments<kFma>(x[0], x[1], x[2], x[3], c, s[S::kBc1], s[S::kBc2], s[S::kEps]);
    if constexpr (kKeep == LambKeep::kMomentsAndDirection) x[4] = u;
    red[0] = x[0] * x[0];
    red[1] = u * u;
  }
};

// Pass 2. Streams as pass 1. kRecompute: the moments are formed again from the old ones and g
// (and written); kFromMoments: u from m, v as pass 1 stored them; kFromDirection: u as stored.
template <LambSource kSource>
struct LambUpdateOp {
  static constexpr int kStreams = kSource == LambSource::kFromDirection ? 5 : 4;
  static constexpr unsigned kLoad =
      kSource == LambSource::kRecompute ? 0x0Fu : (kSource == LambSource::kFromMoments ? 0x0Du : 0x11u);
  static constexpr unsigned kStore = kSource == LambSource::kRecompute ? 0x0Du : 0x01u;
  static constexpr bool kGradStream = kSource == LambSource::kRecompute;
  static constexpr int kReduce = 0;
  static constexpr unsigned kStateFormats =
      kSource == LambSource::kRecompute ? kOptimizerFormats : format_bit(StateFormat::kParam);
  static constexpr bool kWideParamsOnly = kSource != LambSource::kRecompute;  // as LambNormOp's
  LambHyper h;

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T* s, T*) const {
    using S = LambScalars;
    const LambCoefs<T>& c = h.template get<T>();
    T u;
    if constexpr (kSource == LambSource::kRecompute) {
      u = lamb_moments<kFma>(x[0], x[1], x[2], x[3], c, s[S::kBc1], s[S::kBc2], s[S::kEps]);
    } else if constexpr (kSource == LambSource::kFromMoments) {
      u = lamb_direction<kFma>(x[0], x[2], x[3], c, s[S::kBc1], s[S::kBc2], s[S::kEps]);
    } else {
      u = x[4];
    }
    x[0] = madd<kFma>(u * s[S::kTrust], s[S::kAlpha], x[0]);
  }
};

}  // namespace mupopt
