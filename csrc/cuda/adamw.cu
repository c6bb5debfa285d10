// AdamW on CUDA: one launch of the multi-tensor kernel per dtype pair
// (csrc/include/mupopt/adamw.h, multi_tensor.h).
#include "ops.h"

namespace mupopt {
namespace cuda {

cudaError_t adamw(const Launch& l, const AdamWHyper& h, bool amsgrad, const GradArgs& ga, cudaStream_t stream) {
  if (amsgrad) {
    return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, AdamWOp<true>{h}, ga, nullptr, stream);
  }
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, AdamWOp<false>{h}, ga, nullptr, stream);
}

}  // namespace cuda
}  // namespace mupopt
