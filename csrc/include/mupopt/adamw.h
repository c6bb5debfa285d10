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
// Bytes per element (fp32): reads p g m v, writes p m v = 28 (amsgrad: 36).
#pragma once

#include "common.h"

namespace mupopt {

// Per-tensor scalars (row.scalar), formed in float64 by the caller exactly as the reference
// forms them and rounded once to float32.
struct AdamWScalars {
  enum : int { kDecay = 0, kStepSize = 1, kBc2Sqrt = 2, kEps = 3, kCount = 4 };
};

struct AdamWHyper {
  Lerp m_lerp;            // weight 1 - beta1
  float beta2;
  float one_minus_beta2;  // 1 - beta2 rounded from float64, as torch's Python scalar
};

MUPOPT_HD inline AdamWHyper make_adamw_hyper(double beta1, double beta2) {
  AdamWHyper h;
  h.m_lerp = Lerp::make(static_cast<float>(1.0 - beta1));
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  return h;
}

template <bool kFma, bool kAmsgrad>
MUPOPT_HDI void adamw_update(float& p, float g, float& m, float& v, float& vmax, const AdamWHyper& h, float decay,
                             float step_size, float bc2_sqrt, float eps) {
  p = p * decay;
  m = h.m_lerp.template apply<kFma>(m, g);
  v = madd<kFma>(h.one_minus_beta2 * g, g, v * h.beta2);
  float second = v;
  if constexpr (kAmsgrad) {
    vmax = max_nan(vmax, v);
    second = vmax;
  }
  const float denom = sqrtf(second) / bc2_sqrt + eps;
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

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float* s, float*) const {
    using S = AdamWScalars;
    adamw_update<kFma, kAmsgrad>(x[0], x[1], x[2], x[3], x[4], h, s[S::kDecay], s[S::kStepSize], s[S::kBc2Sqrt],
                                 s[S::kEps]);
  }
};

}  // namespace mupopt
