// The elementwise parts of Muon and Shampoo on the CPU (csrc/include/mupopt/muon.h,
// shampoo.h). Exposed as ops and unit-checked; no backend uses them yet.
#include "ops.h"

namespace mupopt {
namespace cpu {

void muon_momentum(const Launch& l, const MuonHyper& h, const Args& a) {
  if (skipped(a)) return;
  run(MuonMomentumOp{h}, l, a, nullptr);
}

void muon_update(const Launch& l, const Args& a) {
  if (skipped(a)) return;
  run(MuonUpdateOp{}, l, a, nullptr);
}

void shampoo_graft(const Launch& l, const ShampooHyper& h, const Args& a) {
  if (skipped(a)) return;
  run(ShampooGraftOp{h}, l, a, nullptr);
}

void shampoo_update(const Launch& l, const ShampooHyper& h, const Args& a) {
  if (skipped(a)) return;
  run(ShampooUpdateOp{h}, l, a, nullptr);
}

}  // namespace cpu
}  // namespace mupopt
