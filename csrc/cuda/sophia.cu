// SophiaG on CUDA (csrc/include/mupopt/sophia.h): the step and the Hessian EMA.
#include "ops.h"

namespace mupopt {
namespace cuda {

cudaError_t sophia(const Launch& l, const SophiaHyper& h, const GradArgs& ga, cudaStream_t stream) {
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, SophiaOp{h}, ga, nullptr, stream);
}

cudaError_t sophia_hessian(const Launch& l, const SophiaHyper& h, const GradArgs& ga, cudaStream_t stream) {
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, SophiaHessianOp{h}, ga, nullptr, stream);
}

}  // namespace cuda
}  // namespace mupopt
