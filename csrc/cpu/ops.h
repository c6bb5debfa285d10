// Entry points of the CPU kernels (free of torch headers): one call per launch, i.e. per
// dtype pair (and, for ADOPT, per first-step / later-step split). Each returns at once when
// args.grad.found_inf is set.
#pragma once

#include "driver.h"
#include "mupopt/adamw.h"
#include "mupopt/adopt.h"
#include "mupopt/lamb.h"
#include "mupopt/sophia.h"

namespace mupopt {
namespace cpu {

void adamw(const Launch& l, const AdamWHyper& h, bool amsgrad, const Args& a);
void adopt(const Launch& l, const AdoptHyper& h, bool first_step, const Args& a);
// Both passes and the trust ratios; writes each row's LambScalars::kTrust.
void lamb(const Launch& l, const LambHyper& h, const Args& a);
// The split form (lamb.h): pass 1 (moments of float32 states, sums of each row written to
// sums[2*row.source], sums[2*row.source + 1]), then pass 2 with the trust ratios formed from the
// (reduced) sums read the same way.
void lamb_partials(const Launch& l, const LambHyper& h, const Args& a, double* sums);
void lamb_apply(const Launch& l, const LambHyper& h, const Args& a, const double* sums);
void sophia(const Launch& l, const SophiaHyper& h, const Args& a);
void sophia_hessian(const Launch& l, const SophiaHyper& h, const Args& a);
// Benchmarks: a step's traffic with no math (traffic.cpp), one pass of (load, store) stream masks.
bool traffic_supported(unsigned load, unsigned store);
void traffic(const Launch& l, unsigned load, unsigned store, const Args& a);
// Tests only (q8_codec.cpp): format 8's block codec on n float32 values x, block by block: the
// codes and block scales, and the decoded values. vbmi: the AVX-512 VBMI codec (false where this
// CPU lacks it), else the plain one.
bool q8_codec(const float* x, int64_t n, const QuantTable& t, bool vbmi, uint8_t* codes, float* absmax,
              float* decoded);

}  // namespace cpu
}  // namespace mupopt
