// The memory bound of an optimizer step on this CPU, for the benchmarks: the step's traffic with
// no math. One pass reads the streams of its load mask and writes those of its store mask, over
// the same launch table, chunks, threads and loops (cpu::run, cpu_span) as the optimizers, each
// stored value being the sum of the loaded ones (an add per loaded stream, so no load is dead
// code; no division, square root or constant). An optimizer whose passes move these bytes cannot
// take less time than this loop takes for them, whatever its arithmetic; the benchmarks report
// each step as a percentage of it (benchmarks/bench_cpu_fused.py, mupopt bench).
//
// The patterns are the byte model of mupopt/bench/model.py (PASSES), streams numbered as the
// optimizers' (0 param, 1 gradient: read only, 2 and 3 states): AdamW and ADOPT read p g m v and
// write p m v (28 B per fp32 element; the states in bfloat16 or as uint8 bytes: the bounds of
// state_bits=16 and 8); SophiaG reads p g m h and writes p m (24 B); its Hessian
// EMA reads g h and writes h (12 B); LAMB's best known two passes read p g m v and write m v,
// then read p m v and write p (40 B).
#include "ops.h"

namespace mupopt {
namespace cpu {

namespace {

template <unsigned kL, unsigned kS>
struct TrafficOp {
  static constexpr int kStreams = 4;
  static constexpr unsigned kLoad = kL;
  static constexpr unsigned kStore = kS;
  static constexpr bool kGradStream = false;
  static constexpr int kReduce = 0;
  // States as stored, decoded by nothing: the param's dtype, bfloat16, or state_bits=8's codes
  // as bytes (their block scales, 8 B per 256 elements, left out).
  static constexpr unsigned kStateFormats =
      format_bit(StateFormat::kParam) | format_bit(StateFormat::kBFloat16) | format_bit(StateFormat::kBytes);
  // Params as plain tensors (bindings.cpp's traffic_ takes no seeds or compensations): no
  // stochastic or compensated loops (driver.h).
  static constexpr bool kNearestParamsOnly = true;

  template <bool kFma, class T>
  MUPOPT_FORCE_INLINE void apply(T* x, const T*, T*) const {
    T sum = T(0);
    for (int s = 0; s < kStreams; ++s) {
      if ((kL >> s) & 1u) sum += x[s];
    }
    for (int s = 0; s < kStreams; ++s) {
      if ((kS >> s) & 1u) x[s] = sum;
    }
  }
};

// The supported patterns: runs the one matching (load, store) when ``l`` is given; whether one
// matches.
template <unsigned kL, unsigned kS>
bool match(unsigned load, unsigned store, const Launch* l, const Args* a) {
  if (load != kL || store != kS) return false;
  if (l != nullptr) run(TrafficOp<kL, kS>{}, *l, *a, nullptr);
  return true;
}

bool dispatch(unsigned load, unsigned store, const Launch* l, const Args* a) {
  return match<0xF, 0xD>(load, store, l, a)      // AdamW, ADOPT
         || match<0xF, 0x5>(load, store, l, a)   // SophiaG
         || match<0x6, 0x4>(load, store, l, a)   // SophiaG's Hessian EMA (streams g, h)
         || match<0xF, 0xC>(load, store, l, a)   // LAMB, pass 1
         || match<0xD, 0x1>(load, store, l, a);  // LAMB, pass 2
}

}  // namespace

bool traffic_supported(unsigned load, unsigned store) { return dispatch(load, store, nullptr, nullptr); }

void traffic(const Launch& l, unsigned load, unsigned store, const Args& a) { dispatch(load, store, &l, &a); }

}  // namespace cpu
}  // namespace mupopt
