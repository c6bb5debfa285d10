// ADOPT on the CPU (csrc/include/mupopt/adopt.h). The caller puts the tensors at their first
// step (v = g*g only) and the others in separate launches.
#include "ops.h"

namespace mupopt {
namespace cpu {

void adopt(const Launch& l, const AdoptHyper& h, bool first_step, const Args& a) {
  if (skipped(a)) return;
  if (first_step) {
    run(AdoptInitOp{h}, l, a, nullptr);
  } else {
    run(AdoptOp{h}, l, a, nullptr);
  }
}

}  // namespace cpu
}  // namespace mupopt
