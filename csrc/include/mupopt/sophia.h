// SophiaG (Liu et al. 2023): the step and the Hessian EMA, per element, and their Ops.
//
//   step:     p *= 1 - lr*wd*wd_mult
//             m = b1*m + (1-b1)*g
//             p += (-lr*lr_mult) * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1)
//   hessian:  h = b2*h + (1-b2)*g*g                 (g from a GNB backward)
//
// Operation order of mupopt.optim.sophia.sophia_reference (sophia-opt): m is ATen's mul_ then
// add(alpha), fma(g, 1-b1, m*b1); rho*bs is one float64 product rounded once; the update is
// addcmul(p, sign(m), ratio, value) = fma(value*sign(m), ratio, p).
// Bytes per element (fp32): step reads p g m h, writes p m = 24; Hessian EMA 12.
#pragma once

#include "common.h"

namespace mupopt {

// The official code's guard against h == 0: with no Hessian estimate the ratio saturates at 1.
constexpr float kSophiaHessianFloor = 1e-15f;

struct SophiaScalars {
  enum : int { kDecay = 0, kAlpha = 1, kCount = 2 };
};

struct SophiaHyper {
  float beta1;
  float one_minus_beta1;
  float rho_bs;  // rho * bs, the float64 product rounded once
  float beta2;   // Hessian EMA
  float one_minus_beta2;
};

MUPOPT_HD inline SophiaHyper make_sophia_hyper(double beta1, double beta2, double rho_bs) {
  SophiaHyper h;
  h.beta1 = static_cast<float>(beta1);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.rho_bs = static_cast<float>(rho_bs);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  return h;
}

template <bool kFma>
MUPOPT_HDI void sophia_update(float& p, float g, float& m, float hess, const SophiaHyper& h, float decay,
                              float alpha) {
  p = p * decay;
  m = madd<kFma>(g, h.one_minus_beta1, m * h.beta1);
  const float ratio = min_nan(fabsf(m) / (hess * h.rho_bs + kSophiaHessianFloor), 1.0f);
  p = madd<kFma>(alpha * sign_of(m), ratio, p);
}

template <bool kFma>
MUPOPT_HDI void sophia_hessian_update(float g, float& hess, const SophiaHyper& h) {
  hess = madd<kFma>(h.one_minus_beta2 * g, g, hess * h.beta2);
}

// Streams: 0 param, 1 grad, 2 exp_avg, 3 hessian (read only).
struct SophiaOp {
  static constexpr int kStreams = 4;
  static constexpr unsigned kLoad = 0x0Fu;
  static constexpr unsigned kStore = 0x05u;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  SophiaHyper h;

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float* s, float*) const {
    using S = SophiaScalars;
    sophia_update<kFma>(x[0], x[1], x[2], x[3], h, s[S::kDecay], s[S::kAlpha]);
  }
};

// Streams: 0 unused, 1 grad, 2 hessian. (The reference does not negate g for maximize; the
// square makes the sign irrelevant, so the shared gradient handling may.)
struct SophiaHessianOp {
  static constexpr int kStreams = 3;
  static constexpr unsigned kLoad = 0x06u;
  static constexpr unsigned kStore = 0x04u;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  SophiaHyper h;

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float*, float*) const {
    sophia_hessian_update<kFma>(x[1], x[2], h);
  }
};

}  // namespace mupopt
