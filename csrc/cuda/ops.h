// Launchers of the CUDA kernels: raw device pointers and a stream, no torch headers, so nvcc
// can compile csrc/cuda/ on a machine without a CUDA build of torch (tests/test_csrc_compiles.py).
// Each returns the launch's cudaError_t and does nothing when the call's found_inf is set (the
// kernels read it on the device: no host synchronisation).
#pragma once

#include <cuda_runtime_api.h>

#include "mupopt/adamw.h"
#include "mupopt/adopt.h"
#include "mupopt/lamb.h"
#include "mupopt/multi_tensor.h"
#include "mupopt/sophia.h"

namespace mupopt {
namespace cuda {

// One launch: `rows` is a device copy of n_rows table rows sharing one (param, grad, state
// format) triple, first_chunk counted from 0 in kCudaChunk units.
struct Launch {
  TensorRow* rows;
  int n_rows;
  int64_t n_chunks;
  DType param;
  DType grad;
  StateFormat state;  // kParam, kBFloat16 or kBlock8 (storage.h)
  DeviceMaps maps;    // kBlock8: the device copy of the map tables (multi_tensor.h)
};

cudaError_t adamw(const Launch& l, const AdamWHyper& h, bool amsgrad, const GradArgs& ga, cudaStream_t stream);
cudaError_t adopt(const Launch& l, const AdoptHyper& h, bool first_step, const GradArgs& ga, cudaStream_t stream);
// Norm pass, per-tensor trust ratios (written into the device rows' kTrust), update pass.
// partials: device buffer of 2 * l.n_chunks doubles.
cudaError_t lamb(const Launch& l, const LambHyper& h, const GradArgs& ga, double* partials, cudaStream_t stream);
// The split form (lamb.h): pass 1 and each row's sums written to sums[2*row.source] (device,
// float64); then, from the reduced sums read the same way, the trust ratios and pass 2.
cudaError_t lamb_partials(const Launch& l, const LambHyper& h, const GradArgs& ga, double* partials, double* sums,
                          cudaStream_t stream);
cudaError_t lamb_apply(const Launch& l, const LambHyper& h, const GradArgs& ga, const double* sums,
                       cudaStream_t stream);
cudaError_t sophia(const Launch& l, const SophiaHyper& h, const GradArgs& ga, cudaStream_t stream);
cudaError_t sophia_hessian(const Launch& l, const SophiaHyper& h, const GradArgs& ga, cudaStream_t stream);

}  // namespace cuda
}  // namespace mupopt
