// SophiaG on the CPU (csrc/include/mupopt/sophia.h): the step and the Hessian EMA.
#include "ops.h"

namespace mupopt {
namespace cpu {

void sophia(const Launch& l, const SophiaHyper& h, const Args& a) {
  if (skipped(a)) return;
  run(SophiaOp{h}, l, a, nullptr);
}

void sophia_hessian(const Launch& l, const SophiaHyper& h, const Args& a) {
  if (skipped(a)) return;
  run(SophiaHessianOp{h}, l, a, nullptr);
}

}  // namespace cpu
}  // namespace mupopt
