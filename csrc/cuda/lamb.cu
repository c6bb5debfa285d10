// LAMB on CUDA (csrc/include/mupopt/lamb.h): three launches per dtype pair.
//   1. the multi-tensor kernel with LambNormOp: new m, v; per-chunk sums of p*p and u*u;
//   2. lamb_trust_kernel: one warp per tensor adds its chunks' sums in a fixed order and writes
//      the trust ratio into the row's kTrust scalar (device table);
//   3. the multi-tensor kernel with LambUpdateOp.
// (Which Op variants: by the states' dtype, see lamb.h.)
// Deterministic: no atomics, every sum in a fixed order.
#include "ops.h"

namespace mupopt {
namespace cuda {
namespace {

constexpr int kTrustThreads = 256;

__global__ void __launch_bounds__(kTrustThreads)
    lamb_trust_kernel(TensorRow* rows, int n_rows, const double* partials, LambHyper h, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int warp = static_cast<int>((blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (warp >= n_rows) return;  // whole warps leave together: n_rows is uniform per warp
  TensorRow& row = rows[warp];
  const int64_t first = row.first_chunk, n = chunks_of(row.numel, kCudaChunk);
  double p_sq = 0.0, u_sq = 0.0;
  for (int64_t c = lane; c < n; c += 32) {
    p_sq += partials[(first + c) * kMaxReduce];
    u_sq += partials[(first + c) * kMaxReduce + 1];
  }
  for (int off = 16; off > 0; off >>= 1) {
    p_sq += __shfl_down_sync(0xFFFFFFFFu, p_sq, off);
    u_sq += __shfl_down_sync(0xFFFFFFFFu, u_sq, off);
  }
  if (lane == 0) row.scalar[LambScalars::kTrust] = lamb_trust(p_sq, u_sq, h);
}

}  // namespace

// Each pass is one launch over the whole list, so u is recomputed rather than kept (the CPU
// driver's blocks, which keep u in the cache, would mean two launches per block here; untried).
template <bool kFloatStates>
cudaError_t lamb_passes(const Launch& l, const LambHyper& h, const GradArgs& ga, double* partials,
                        cudaStream_t stream) {
  constexpr LambKeep kKeep = kFloatStates ? LambKeep::kMoments : LambKeep::kNothing;
  constexpr LambSource kSource = kFloatStates ? LambSource::kFromMoments : LambSource::kRecompute;
  cudaError_t err =
      launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, LambNormOp<kKeep>{h}, ga, partials, stream);
  if (err != cudaSuccess) return err;
  const int blocks = static_cast<int>((static_cast<int64_t>(l.n_rows) * 32 + kTrustThreads - 1) / kTrustThreads);
  lamb_trust_kernel<<<blocks, kTrustThreads, 0, stream>>>(l.rows, l.n_rows, partials, h, ga.found_inf);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, LambUpdateOp<kSource>{h}, ga, nullptr,
                             stream);
}

cudaError_t lamb(const Launch& l, const LambHyper& h, const GradArgs& ga, double* partials, cudaStream_t stream) {
  if (l.n_chunks == 0) return cudaSuccess;
  return l.param == DType::kFloat32 ? lamb_passes<true>(l, h, ga, partials, stream)
                                    : lamb_passes<false>(l, h, ga, partials, stream);
}

}  // namespace cuda
}  // namespace mupopt
