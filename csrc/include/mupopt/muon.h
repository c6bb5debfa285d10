// Muon's elementwise parts (Newton-Schulz itself stays in torch: it is matmul-bound).
//
//   momentum:  B = lerp(B, g, 1-mu) ;  u = lerp(g, B, mu) if nesterov else B
//   update:    p *= 1 - lr*wd*wd_mult ;  p += (-lr*lr_mult*shape_factor) * O      (O = NS(u))
//
// Operation order of mupopt.optim.muon.muon_reference (torch.optim.Muon): two lerps, then
// mul_ and add(alpha) = fma(O, alpha, p). Bytes per element (fp32): momentum reads g B, writes
// B u = 16; update reads p O, writes p = 12.
#pragma once

#include "common.h"

namespace mupopt {

struct MuonScalars {
  enum : int { kDecay = 0, kAlpha = 1, kCount = 2 };
};

struct MuonHyper {
  Lerp buf_lerp;       // weight 1 - mu
  Lerp nesterov_lerp;  // weight mu
  uint32_t nesterov_mask;  // all ones: nesterov
};

MUPOPT_HD inline MuonHyper make_muon_hyper(double momentum, bool nesterov) {
  MuonHyper h;
  h.buf_lerp = Lerp::make(static_cast<float>(1.0 - momentum));
  h.nesterov_lerp = Lerp::make(static_cast<float>(momentum));
  h.nesterov_mask = mask_of(nesterov);
  return h;
}

// Returns the direction handed to Newton-Schulz.
template <bool kFma>
MUPOPT_HDI float muon_momentum(float g, float& buf, const MuonHyper& h) {
  buf = h.buf_lerp.template apply<kFma>(buf, g);
  const float nest = h.nesterov_lerp.template apply<kFma>(g, buf);
  return select_bits(h.nesterov_mask, nest, buf);
}

template <bool kFma>
MUPOPT_HDI void muon_update(float& p, float o, float decay, float alpha) {
  p = p * decay;
  p = madd<kFma>(o, alpha, p);
}

// Streams: 0 update u (written), 1 grad, 2 momentum_buffer.
struct MuonMomentumOp {
  static constexpr int kStreams = 3;
  static constexpr unsigned kLoad = 0x06u;
  static constexpr unsigned kStore = 0x05u;
  static constexpr bool kGradStream = true;
  static constexpr int kReduce = 0;
  MuonHyper h;

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float*, float*) const {
    x[0] = muon_momentum<kFma>(x[1], x[2], h);
  }
};

// Streams: 0 param, 1 the orthogonalised update O.
struct MuonUpdateOp {
  static constexpr int kStreams = 2;
  static constexpr unsigned kLoad = 0x03u;
  static constexpr unsigned kStore = 0x01u;
  static constexpr bool kGradStream = false;
  static constexpr int kReduce = 0;

  template <bool kFma>
  MUPOPT_HDI void apply(float* x, const float* s, float*) const {
    muon_update<kFma>(x[0], x[1], s[MuonScalars::kDecay], s[MuonScalars::kAlpha]);
  }
};

}  // namespace mupopt
