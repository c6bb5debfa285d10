// ADOPT (Taniguchi et al. 2024, decoupled decay, clip s**0.25): per-element updates and Ops.
//
// s = the step count before increment (0 on the first call), per tensor:
//   s == 0:  v = g*g                                          (AdoptInitOp; no parameter update)
//   s >= 1:  p += (-lr*wd*wd_mult) * p
//            n = clamp(g / max(sqrt(v), eps*eps_mult), -s**0.25, s**0.25)
//            m = lerp(m, n, 1-b1) ;  p += (-lr*lr_mult) * m
//            v = b2*v + (1-b2)*g*g                             (after v normalised g)
//
// Operation order of mupopt.optim.adopt.adopt_reference (torch-adopt): the decay is ATen's
// add(p, p, alpha) = fma(p, alpha, p), the update add(p, m, alpha) = fma(m, alpha, p).
// The caller splits a list into the tensors at s == 0 and the others (one launch each), so
// the loops never branch on the step. Bytes per element (fp32): 28; the first step 12.
#pragma once

#include "common.h"

namespace mupopt {

struct AdoptScalars {
  // kFirst: 1 when s == 0 (read by the caller to split the list, not by the kernels).
  enum : int { kFirst = 0, kDecayAlpha = 1, kStepAlpha = 2, kEps = 3, kClip = 4, kCount = 5 };
};

template <class T>
struct AdoptCoefs {
  Lerp<T> m_lerp;  // weight 1 - beta1
  T beta2;
  T one_minus_beta2;
};
using AdoptHyper = PerCompute<AdoptCoefs>;

template <class T>
MUPOPT_HD inline AdoptCoefs<T> adopt_coefs(double beta1, double beta2) {
  AdoptCoefs<T> h;
  h.m_lerp = Lerp<T>::make(static_cast<T>(1.0 - beta1));
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  return h;
}

MUPOPT_HD inline AdoptHyper make_adopt_hyper(double beta1, double beta2) {
  return AdoptHyper{adopt_coefs<float>(beta1, beta2), adopt_coefs<double>(beta1, beta2)};
}

// s == 0: the reference's v.addcmul_(g, g) (value 1), i.e. fma(g, g, v).
template <bool kFma, class T>
MUPOPT_HDI void adopt_first(T g, T& v) {
  v = madd<kFma>(g, g, v);
}

template <bool kFma, class T>
MUPOPT_HDI void adopt_update(T& p, T g, T& m, T& v, const AdoptCoefs<T>& h, T decay_alpha, T step_alpha, T eps,
                             T clip) {
  p = madd<kFma>(p, decay_alpha, p);
  const T root = sqrt_of(v);
  const T denom = root < eps ? eps : root;  // clamp(min=eps): a NaN passes through
  T n = g / denom;
  // clamp(-clip, clip) as ATen writes it, min(max(n, -clip), clip); a NaN passes through. Two
  // selects of this form are one vmaxps and one vminps each; the nested select took 7 vector
  // operations per 16 elements (compares, mask logic, blends).
  n = n < -clip ? -clip : n;
  n = n > clip ? clip : n;
  m = h.m_lerp.template apply<kFma>(m, n);
  p = madd<kFma>(m, step_alpha, p);
  v = madd<kFma>(h.one_minus_beta2 * g, g, v * h.beta2);
}

// Streams: 0 param (unused), 1 grad, 2 exp_avg (unused), 3 exp_avg_sq.
struct AdoptInitOp {
  static constexpr int kStreams = 4;
  static constexpr unsigned kLoad = 0x0Au;
  static constexpr unsigned kStore = 0x08u;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  AdoptHyper h;

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T*, T*) const {
    adopt_first<kFma>(x[1], x[3]);
  }
};

// Streams: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq.
struct AdoptOp {
  static constexpr int kStreams = 4;
  static constexpr unsigned kLoad = 0x0Fu;
  static constexpr unsigned kStore = 0x0Du;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  AdoptHyper h;

  template <bool kFma, class T>
  MUPOPT_HDI void apply(T* x, const T* s, T*) const {
    using S = AdoptScalars;
    adopt_update<kFma>(x[0], x[1], x[2], x[3], h.template get<T>(), s[S::kDecayAlpha], s[S::kStepAlpha], s[S::kEps],
                       s[S::kClip]);
  }
};

}  // namespace mupopt
