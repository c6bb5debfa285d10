// Shampoo's elementwise parts: the Adam grafting direction and the momentum/decay/update.
// (Statistics, roots and the preconditioned product stay in torch: they are matmul-bound.)
//
//   graft:   v = b2*v + (1-b2)*g*g ;  A = g / (sqrt(v/(1-b2^t)) + eps)
//   scale:   s = ||A||_F / ||D||_F if ||D||_F > 0 else 0          (per block, Adam grafting)
//   update:  D = D*s ;  M = b1*M + (1-b1)*D ;  p *= 1 - lr*wd*wd_mult ;  p += alpha*M
//            (alpha = -lr*lr_mult/(1-b1^t), or -lr*lr_mult when b1 == 0)
//
// Operation order of mupopt.optim.shampoo.shampoo_reference: v is mul then addcmul_,
// M is mul_ then add(alpha) = fma(D, 1-b1, M*b1), the update add(alpha) = fma(M, alpha, p).
// Without grafting the caller passes norms (1, 1), so s = 1.
#pragma once

#include "common.h"

namespace mupopt {

struct ShampooGraftScalars {
  enum : int { kBc2 = 0, kEps = 1, kCount = 2 };
};

struct ShampooUpdateScalars {
  enum : int { kAdamNorm = 0, kDirectionNorm = 1, kDecay = 2, kAlpha = 3, kCount = 4 };
};

struct ShampooHyper {
  float beta1;
  float one_minus_beta1;
  float beta2;  // grafting_beta2
  float one_minus_beta2;
};

MUPOPT_HD inline ShampooHyper make_shampoo_hyper(double beta1, double grafting_beta2) {
  ShampooHyper h;
  h.beta1 = static_cast<float>(beta1);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(grafting_beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - grafting_beta2);
  return h;
}

// Updates v and returns the Adam direction A.
template <bool kFma>
MUPOPT_HDI float shampoo_graft_direction(float g, float& v, const ShampooHyper& h, float bc2, float eps) {
  v = madd<kFma>(h.one_minus_beta2 * g, g, v * h.beta2);
  return g / (sqrtf(v / bc2) + eps);
}

// torch.where(d_norm > 0, a_norm / d_norm, 0) in float32.
MUPOPT_HDI float shampoo_graft_scale(float adam_norm, float direction_norm) {
  return direction_norm > 0.0f ? adam_norm / direction_norm : 0.0f;
}

template <bool kFma>
MUPOPT_HDI void shampoo_update(float& p, float d, float& mom, const ShampooHyper& h, float graft, float decay,
                               float alpha) {
  d = d * graft;
  mom = madd<kFma>(d, h.one_minus_beta1, mom * h.beta1);
  p = p * decay;
  p = madd<kFma>(mom, alpha, p);
}

// Streams: 0 Adam direction A (written), 1 grad, 2 exp_avg_sq.
struct ShampooGraftOp {
  static constexpr int kStreams = 3;
  static constexpr unsigned kLoad = 0x06u;
  static constexpr unsigned kStore = 0x05u;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  ShampooHyper h;

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float* s, float*) const {
    using S = ShampooGraftScalars;
    x[0] = shampoo_graft_direction<kFma>(x[1], x[2], h, s[S::kBc2], s[S::kEps]);
  }
};

// Streams: 0 param, 1 direction D (before grafting), 2 momentum_buffer.
struct ShampooUpdateOp {
  static constexpr int kStreams = 3;
  static constexpr unsigned kLoad = 0x07u;
  static constexpr unsigned kStore = 0x05u;
  static constexpr bool kGradStream = false;
  static constexpr int kReduce = 0;
  ShampooHyper h;

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float* s, float*) const {
    using S = ShampooUpdateScalars;
    const float graft = shampoo_graft_scale(s[S::kAdamNorm], s[S::kDirectionNorm]);
    shampoo_update<kFma>(x[0], x[1], x[2], h, graft, s[S::kDecay], s[S::kAlpha]);
  }
};

}  // namespace mupopt
