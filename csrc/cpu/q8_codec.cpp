// Test only (tests/test_lean_states_cpu.py): format 8's block codec alone, so that its codes can
// be compared with the spec's quantize on chosen values (every midpoint and its neighbours),
// which the optimizers' loops cannot be made to store exactly. Not used by any optimizer.
#include "ops.h"

namespace mupopt {
namespace cpu {

bool q8_codec(const float* x, int64_t n, const QuantTable& t, bool vbmi, uint8_t* codes, float* absmax,
              float* decoded) {
#if MUPOPT_CPU_X86_DISPATCH
  __builtin_cpu_init();
  const bool has_vbmi = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vbmi");
#else
  const bool has_vbmi = false;
#endif
  if (vbmi && !has_vbmi) return false;
  float q[kQuantBlock];
  for (int64_t b0 = 0; b0 < n; b0 += kQuantBlock) {
    const int m = static_cast<int>(n - b0 < kQuantBlock ? n - b0 : kQuantBlock);
    for (int k = 0; k < m; ++k) q[k] = x[b0 + k];
    float* scale = absmax + b0 / kQuantBlock;
#if MUPOPT_CPU_X86_DISPATCH
    if (vbmi) {
      Q8Vbmi::encode(q, codes + b0, scale, t, m);
      Q8Vbmi::decode(codes + b0, *scale, t, q, m);
    } else
#endif
    {
      Q8Scalar::encode(q, codes + b0, scale, t, m);
      Q8Scalar::decode(codes + b0, *scale, t, q, m);
    }
    for (int k = 0; k < m; ++k) decoded[b0 + k] = q[k];
  }
  return true;
}

}  // namespace cpu
}  // namespace mupopt
