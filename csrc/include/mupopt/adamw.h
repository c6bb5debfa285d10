// AdamW (with amsgrad and maximize): the per-element update and its multi-tensor Op.
//
//   p *= 1 - lr*wd*wd_mult
//   m = lerp(m, g, 1-b1) ;  v = b2*v + (1-b2)*g*g          (amsgrad: vmax = max(vmax, v))
//   p += (-lr*lr_mult/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps*eps_mult)
//
// Operation order of mupopt.optim.adamw.adamw_reference (torch.optim.AdamW's single-tensor
// path): the last line is ATen's addcdiv, p + (value*m)/denom, and v's update is ATen's
// mul_ then addcmul_, fma((1-b2)*g, g, v*b2) under FMA. One rounding differs on the CPU: torch's
// float32 sqrt there is MKL's vmsSqrt (VML_HA, not correctly rounded), sqrtf here is IEEE; so the
// cpu backend equals torch.optim.AdamW run with a correctly rounded sqrt (tests/test_bitwise.py).
// Bytes per element (fp32): reads p g m v, writes p m v = 28 (amsgrad: 36); fp64 twice that.
#pragma once

#include "common.h"

namespace mupopt {

// Per-tensor scalars (row.scalar), formed in float64 by the caller exactly as the reference
// forms them; the loops round them once to their compute type.
struct AdamWScalars {
  enum : int { kDecay = 0, kStepSize = 1, kBc2Sqrt = 2, kEps = 3, kCount = 4 };
};

template <class T>
struct AdamWCoefs {
  Lerp<T> m_lerp;     // weight 1 - beta1
  T beta2;
  T one_minus_beta2;  // 1 - beta2 formed in float64, as torch's Python scalar
};
using AdamWHyper = PerCompute<AdamWCoefs>;

template <class T>
MUPOPT_HD inline AdamWCoefs<T> adamw_coefs(double beta1, double beta2) {
  AdamWCoefs<T> h;
  h.m_lerp = Lerp<T>::make(static_cast<T>(1.0 - beta1));
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  return h;
}

MUPOPT_HD inline AdamWHyper make_adamw_hyper(double beta1, double beta2) {
  return AdamWHyper{adamw_coefs<float>(beta1, beta2), adamw_coefs<double>(beta1, beta2)};
}

template <bool kFma, bool kAmsgrad, class T>
MUPOPT_HDI void adamw_update(T& p, T g, T& m, T& v, T& vmax, const AdamWCoefs<T>& h, T decay, T step_size,
                             T bc2_sqrt, T eps) {
  p = p * decay;
  m = h.m_lerp.template apply<kFma>(m, g);
  v = madd<kFma>(h.one_minus_beta2 * g, g, v * h.beta2);
  T second = v;
  if constexpr (kAmsgrad) {
    vmax = max_nan(vmax, v);
    second = vmax;
  }
  const T denom = sqrt_of(second) / bc2_sqrt + eps;
  p = p + (step_size * m) / denom;
}

// Streams: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq (amsgrad).
template <bool kAmsgrad>
struct AdamWOp {
  static constexpr int kStreams = kAmsgrad ? 5 : 4;
  static constexpr unsigned kLoad = kAmsgrad ? 0x1Fu : 0x0Fu;
  static constexpr unsigned kStore = kAmsgrad ? 0x1Du : 0x0Du;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  AdamWHyper h;

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T* s, T*) const {
    using S = AdamWScalars;
    adamw_update<kFma, kAmsgrad>(x[0], x[1], x[2], x[3], x[4], h.template get<T>(), s[S::kDecay], s[S::kStepSize],
                                 s[S::kBc2Sqrt], s[S::kEps]);
  }
};

}  // namespace mupopt
