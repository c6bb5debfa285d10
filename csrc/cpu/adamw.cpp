// AdamW on the CPU: one traversal of the launch table (csrc/include/mupopt/adamw.h).
#include "ops.h"

namespace mupopt {
namespace cpu {

void adamw(const Launch& l, const AdamWHyper& h, bool amsgrad, const Args& a) {
  if (skipped(a)) return;
  if (amsgrad) {
    run(AdamWOp<true>{h}, l, a, nullptr);
  } else {
    run(AdamWOp<false>{h}, l, a, nullptr);
  }
}

}  // namespace cpu
}  // namespace mupopt
