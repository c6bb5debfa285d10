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
// (A Python float: rounded to float32 for float32 tensors, kept for float64 ones.)
constexpr double kSophiaHessianFloor = 1e-15;

struct SophiaScalars {
  enum : int { kDecay = 0, kAlpha = 1, kCount = 2 };
};

template <class T>
struct SophiaCoefs {
  T beta1;
  T one_minus_beta1;
  T rho_bs;  // rho * bs, the float64 product rounded once
  T beta2;   // Hessian EMA
  T one_minus_beta2;
  T floor;   // kSophiaHessianFloor
};
using SophiaHyper = PerCompute<SophiaCoefs>;

template <class T>
MUPOPT_HD inline SophiaCoefs<T> sophia_coefs(double beta1, double beta2, double rho_bs) {
  SophiaCoefs<T> h;
  h.beta1 = static_cast<T>(beta1);
  h.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  h.rho_bs = static_cast<T>(rho_bs);
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  h.floor = static_cast<T>(kSophiaHessianFloor);
  return h;
}

MUPOPT_HD inline SophiaHyper make_sophia_hyper(double beta1, double beta2, double rho_bs) {
  return SophiaHyper{sophia_coefs<float>(beta1, beta2, rho_bs), sophia_coefs<double>(beta1, beta2, rho_bs)};
}

template <bool kFma, class T>
MUPOPT_HDI void sophia_update(T& p, T g, T& m, T hess, const SophiaCoefs<T>& h, T decay, T alpha) {
  p = p * decay;
  m = madd<kFma>(g, h.one_minus_beta1, m * h.beta1);
  const T ratio = min_nan(abs_of(m) / (hess * h.rho_bs + h.floor), T(1));
  p = madd<kFma>(alpha * sign_of(m), ratio, p);
}

template <bool kFma, class T>
MUPOPT_HDI void sophia_hessian_update(T g, T& hess, const SophiaCoefs<T>& h) {
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

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T* s, T*) const {
    using S = SophiaScalars;
    sophia_update<kFma>(x[0], x[1], x[2], x[3], h.template get<T>(), s[S::kDecay], s[S::kAlpha]);
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

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T*, T*) const {
    sophia_hessian_update<kFma>(x[1], x[2], h.template get<T>());
  }
};

}  // namespace mupopt
