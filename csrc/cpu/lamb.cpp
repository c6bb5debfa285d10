// LAMB on the CPU (csrc/include/mupopt/lamb.h): the norm pass, the trust ratios, the update
// pass (in the form the states' dtype calls for, see lamb.h). Per-chunk float64 partial sums are added per tensor in chunk order, so the result is
// the same for any thread count.
#include <vector>

#include "ops.h"

namespace mupopt {
namespace cpu {

namespace {

template <bool kFloatStates>
void lamb_passes(const Launch& l, const LambHyper& h, const Args& a) {
  std::vector<double> partials(static_cast<size_t>(l.n_chunks) * kMaxReduce, 0.0);
  run(LambNormOp<kFloatStates>{h}, l, a, partials.data());
  for (int r = 0; r < l.n_rows; ++r) {
    TensorRow& row = l.rows[r];
    const int64_t first = row.first_chunk, n = chunks_of(row.numel, kCpuChunk);
    double p_sq = 0.0, u_sq = 0.0;
    for (int64_t c = first; c < first + n; ++c) {
      p_sq += partials[c * kMaxReduce];
      u_sq += partials[c * kMaxReduce + 1];
    }
    row.scalar[LambScalars::kTrust] = lamb_trust(p_sq, u_sq, h);
  }
  run(LambUpdateOp<!kFloatStates>{h}, l, a, nullptr);
}

}  // namespace

void lamb(const Launch& l, const LambHyper& h, const Args& a) {
  if (skipped(a) || l.n_chunks == 0) return;
  if (l.param == DType::kFloat32) {
    lamb_passes<true>(l, h, a);
  } else {
    lamb_passes<false>(l, h, a);
  }
}

}  // namespace cpu
}  // namespace mupopt
