// LAMB on CUDA (csrc/include/mupopt/lamb.h): three launches per dtype pair.
//   1. the multi-tensor kernel with LambNormOp: new m, v; per-chunk sums of p*p and u*u;
//   2. lamb_row_sums_kernel: one warp per tensor adds its chunks' sums in a fixed order and writes
//      the trust ratio into the row's kTrust scalar (device table);
//   3. the multi-tensor kernel with LambUpdateOp.
// (Which Op variants: by the states' dtype, see lamb.h.)
// Deterministic: no atomics, every sum in a fixed order. The split form (lamb_partials_ /
// lamb_apply_) runs 1 with the sums written per tensor instead of 2, and 3 after a kernel that
// forms the trust ratios from the caller's reduced sums.
#include "ops.h"

namespace mupopt {
namespace cuda {
namespace {

constexpr int kTrustThreads = 256;

// One warp per row: the row's chunk partials added in a fixed order; then either its trust ratio
// (kTrust scalar of the device row) or, for lamb_partials_, its sums (sums[2*row.source]).
template <bool kTrust>
__global__ void __launch_bounds__(kTrustThreads)
    lamb_row_sums_kernel(TensorRow* rows, int n_rows, const double* partials, LambHyper h, const float* found_inf,
                         double* sums) {
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
  if (lane != 0) return;
  if constexpr (kTrust) {
    row.scalar[LambScalars::kTrust] = lamb_trust(p_sq, u_sq, h.f32);  // float32 math only on CUDA
  } else {
    sums[2 * static_cast<int64_t>(row.source)] = p_sq;
    sums[2 * static_cast<int64_t>(row.source) + 1] = u_sq;
  }
}

// lamb_apply_: one thread per row, the trust ratio from the (reduced) sums of its tensor.
__global__ void __launch_bounds__(kTrustThreads)
    lamb_trust_from_sums_kernel(TensorRow* rows, int n_rows, const double* sums, LambHyper h, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= n_rows) return;
  const int64_t i = rows[r].source;
  rows[r].scalar[LambScalars::kTrust] = lamb_trust(sums[2 * i], sums[2 * i + 1], h.f32);
}

int row_sum_blocks(int n_rows) {
  return static_cast<int>((static_cast<int64_t>(n_rows) * 32 + kTrustThreads - 1) / kTrustThreads);
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
      launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, LambNormOp<kKeep>{h}, ga, partials, stream);
  if (err != cudaSuccess) return err;
  lamb_row_sums_kernel<true>
      <<<row_sum_blocks(l.n_rows), kTrustThreads, 0, stream>>>(l.rows, l.n_rows, partials, h, ga.found_inf, nullptr);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, LambUpdateOp<kSource>{h}, ga, nullptr,
                             stream);
}

cudaError_t lamb(const Launch& l, const LambHyper& h, const GradArgs& ga, double* partials, cudaStream_t stream) {
  if (l.n_chunks == 0) return cudaSuccess;
  return (l.param == DType::kFloat32 && l.state == StateFormat::kParam) ? lamb_passes<true>(l, h, ga, partials, stream)
                                    : lamb_passes<false>(l, h, ga, partials, stream);
}

// The split form (lamb.h): pass 1 and the per-row sums; then the trust ratios from the reduced
// sums and pass 2. Both passes over the whole launch.
cudaError_t lamb_partials(const Launch& l, const LambHyper& h, const GradArgs& ga, double* partials, double* sums,
                          cudaStream_t stream) {
  if (l.n_chunks == 0) return cudaSuccess;
  const cudaError_t err =
      (l.param == DType::kFloat32 && l.state == StateFormat::kParam)
          ? launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, LambNormOp<LambKeep::kMoments>{h}, ga,
                                partials, stream)
          : launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps, LambNormOp<LambKeep::kNothing>{h}, ga,
                                partials, stream);
  if (err != cudaSuccess) return err;
  lamb_row_sums_kernel<false>
      <<<row_sum_blocks(l.n_rows), kTrustThreads, 0, stream>>>(l.rows, l.n_rows, partials, h, ga.found_inf, sums);
  return cudaGetLastError();
}

cudaError_t lamb_apply(const Launch& l, const LambHyper& h, const GradArgs& ga, const double* sums,
                       cudaStream_t stream) {
  if (l.n_chunks == 0) return cudaSuccess;
  const int blocks = static_cast<int>((static_cast<int64_t>(l.n_rows) + kTrustThreads - 1) / kTrustThreads);
  lamb_trust_from_sums_kernel<<<blocks, kTrustThreads, 0, stream>>>(l.rows, l.n_rows, sums, h, ga.found_inf);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return (l.param == DType::kFloat32 && l.state == StateFormat::kParam)
             ? launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps,
                                   LambUpdateOp<LambSource::kFromMoments>{h}, ga, nullptr, stream)
             : launch_multi_tensor(l.rows, l.n_rows, l.n_chunks, l.param, l.grad, l.state, l.maps,
                                   LambUpdateOp<LambSource::kRecompute>{h}, ga, nullptr, stream);
}

}  // namespace cuda
}  // namespace mupopt
