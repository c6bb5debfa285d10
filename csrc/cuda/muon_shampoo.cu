// The elementwise parts of Muon and Shampoo on CUDA (csrc/include/mupopt/muon.h, shampoo.h).
#include "ops.h"

namespace mupopt {
namespace cuda {

cudaError_t muon_momentum(const Launch& l, const MuonHyper& h, const GradArgs& ga, cudaStream_t stream) {
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, MuonMomentumOp{h}, ga, nullptr, stream);
}

cudaError_t muon_update(const Launch& l, const GradArgs& ga, cudaStream_t stream) {
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, MuonUpdateOp{}, ga, nullptr, stream);
}

cudaError_t shampoo_graft(const Launch& l, const ShampooHyper& h, const GradArgs& ga, cudaStream_t stream) {
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, ShampooGraftOp{h}, ga, nullptr, stream);
}

cudaError_t shampoo_update(const Launch& l, const ShampooHyper& h, const GradArgs& ga, cudaStream_t stream) {
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, ShampooUpdateOp{h}, ga, nullptr, stream);
}

}  // namespace cuda
}  // namespace mupopt
