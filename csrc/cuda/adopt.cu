// ADOPT on CUDA (csrc/include/mupopt/adopt.h). The first step (v = g*g) and later steps are
// separate launches: the caller splits the list by step count.
#include "ops.h"

namespace mupopt {
namespace cuda {

cudaError_t adopt(const Launch& l, const AdoptHyper& h, bool first_step, const GradArgs& ga, cudaStream_t stream) {
  if (first_step) {
    return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, AdoptInitOp{h}, ga, nullptr, stream);
  }
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, AdoptOp{h}, ga, nullptr, stream);
}

}  // namespace cuda
}  // namespace mupopt
