// The CPU driver of the multi-tensor traversal: OpenMP over the chunks of a launch table,
// each chunk a vectorised loop (mupopt::cpu_span) compiled twice.
//
// ISA: the build uses no -march flag, so the library runs on any x86-64 machine that shares
// the build cache (an NFS home, a CI cache, an ahead-of-time build). The loops are compiled
// a second time with target("avx2,fma") and that copy is chosen at run time when the CPU has
// AVX2 and FMA and ATen does too (ATEN_CPU_CAPABILITY != default). Two reasons:
//  - rounding: ATen's AVX2/AVX512 kernels fuse lerp, add(alpha) and addcmul into one FMA, its
//    DEFAULT kernels do not; following ATen's choice keeps this backend bit for bit with the
//    reference on the same machine;
//  - speed: without -mfma every fmaf is a libm call and nothing vectorises.
// 256-bit AVX2 code is enough for the float32 loops: an AVX-512 copy (zmm, tried on the 2-core
// AMD EPYC Zen 4 of the CI-like machine) ran at the same speed, one thread, 32768 L2-resident
// elements: AdamW 0.59 vs 0.61 ns per element, LAMB 1.39 vs 1.41 (the dividers, not the vector
// width, set the pace); on the 2-core AVX-512 Xeon (issue 22 item 11) between 5% slower and 9%
// faster in five side-by-side runs on a loaded machine, 16M elements, 2 threads. The loops of
// 16-bit params and of lean states are compute-bound there, and get a third, 512-bit copy
// (kHasWideCopy below) where ATen runs its AVX512 kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "mupopt/multi_tensor.h"

namespace mupopt {
namespace cpu {

// One launch: a contiguous range of table rows sharing one (param format, grad dtype, state
// format) triple, first_chunk counted from 0 in kCpuChunk units.
struct Launch {
  TensorRow* rows;
  int n_rows;
  int64_t n_chunks;
  DType param;
  DType grad;
  StateFormat state = StateFormat::kParam;
  const QuantTable* maps = nullptr;  // format 8: kMaxStreams tables, one per state stream
};

// Which copy of the loops runs: bindings.cpp picks it once per process, as ATen picks its kernels
// (plain where ATen runs its DEFAULT kernels; 512-bit where it runs its AVX512 ones; 512-bit with
// format 8's VBMI codec, q8_vbmi.h, where the CPU also has AVX-512 VBMI: the same bits).
enum class Isa : int { kPlain = 0, kAvx2Fma = 1, kAvx512Fma = 2, kAvx512Vbmi = 3 };

struct Args {
  GradArgs grad;
  int num_threads;  // at::get_num_threads() of the caller
  Isa isa;          // x86; elsewhere every choice runs the fma copy
};

// Below this many elements (in all tensors of a launch) it runs on the calling thread. An
// OpenMP fork/join costs a few microseconds on an idle machine, but on a busy one the region
// waits until the OS schedules every worker: measured 8 ms for 16 tensors of 16 elements on
// this 2-core machine with other processes running, against 31 us when it was idle. 65536
// elements are about 60 us of AdamW on one core.
constexpr int64_t kParallelMin = 65536;

inline bool skipped(const Args& a) { return a.grad.found_inf != nullptr && *a.grad.found_inf != 0.0f; }

template <class Op>
using SpanFn = void (*)(const Op&, const TensorRow&, int64_t, int64_t, float, double*, const QuantTable*);

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MUPOPT_CPU_X86_DISPATCH 1
#define MUPOPT_TARGET_FMA __attribute__((target("avx2,fma")))
#define MUPOPT_TARGET_AVX512 \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")))
#else
#define MUPOPT_CPU_X86_DISPATCH 0
#define MUPOPT_TARGET_FMA
#define MUPOPT_TARGET_AVX512
#endif
}  // namespace cpu
}  // namespace mupopt

#if MUPOPT_CPU_X86_DISPATCH
#include "q8_vbmi.h"
#endif

namespace mupopt {
namespace cpu {

// The loops with a 512-bit copy: 16-bit params and states of another storage than the param's
// (bf16, 8-bit blocks). On the 2-core AVX-512 Xeon these are compute-bound (conversions,
// roundings, random bits, block decode): bench_cpu_lean.py, AdamW at 16M, bf16 params with
// stochastic rounding and bf16 states at 35-53% of their byte bound with the 256-bit copy,
// 57-63% with 512-bit vectors (two runs each, under load). float32 / float64 loops on states of
// their own dtype move their bytes as fast with 256-bit vectors (AdamW 0.59 vs 0.61 ns per
// element, above): no third copy of them to compile.
template <class TP, class TS>
constexpr bool kHasWideCopy =
    !(std::is_same<TP, TS>::value && (std::is_same<TP, float>::value || std::is_same<TP, double>::value));

template <class Op, class TP, class TG, class TS, Rounding R>
MUPOPT_TARGET_FMA void span_fma(const Op& op, const TensorRow& row, int64_t b, int64_t e, float gmul, double* red,
                                const QuantTable* maps) {
  cpu_span<Op, true, TP, TG, TS, R>(op, row, b, e, gmul, red, maps);
}

template <class Op, class TP, class TG, class TS, Rounding R>
MUPOPT_TARGET_AVX512 void span_avx512(const Op& op, const TensorRow& row, int64_t b, int64_t e, float gmul, double* red,
                                      const QuantTable* maps) {
  cpu_span<Op, true, TP, TG, TS, R>(op, row, b, e, gmul, red, maps);
}

#if MUPOPT_CPU_X86_DISPATCH
// The 512-bit copy of the format-8 loops with the VBMI codec (q8_vbmi.h).
template <class Op, class TP, class TG, class TS, Rounding R>
MUPOPT_TARGET_VBMI void span_avx512vbmi(const Op& op, const TensorRow& row, int64_t b, int64_t e, float gmul,
                                        double* red, const QuantTable* maps) {
  cpu_span<Op, true, TP, TG, TS, R, Q8Vbmi>(op, row, b, e, gmul, red, maps);
}
#endif

template <class Op, class TP, class TG, class TS, Rounding R>
void span_plain(const Op& op, const TensorRow& row, int64_t b, int64_t e, float gmul, double* red,
                const QuantTable* maps) {
  cpu_span<Op, false, TP, TG, TS, R>(op, row, b, e, gmul, red, maps);
}

template <class Op, class TP, class TG, class TS, Rounding R>
SpanFn<Op> pick_isa(Isa isa) {
#if MUPOPT_CPU_X86_DISPATCH
  if constexpr (kHasWideCopy<TP, TS>) {
    if constexpr (std::is_same<TS, q8_t>::value) {
      if (isa == Isa::kAvx512Vbmi) return &span_avx512vbmi<Op, TP, TG, TS, R>;
    }
    if (isa == Isa::kAvx512Fma || isa == Isa::kAvx512Vbmi) return &span_avx512<Op, TP, TG, TS, R>;
  }
  return isa != Isa::kPlain ? &span_fma<Op, TP, TG, TS, R> : &span_plain<Op, TP, TG, TS, R>;
#else
  // aarch64, ppc64le, s390x: fused multiply-add is baseline, and ATen's vector kernels use it.
  (void)isa;
  return &span_fma<Op, TP, TG, TS, R>;
#endif
}

// The state format's storage type (storage.h), the one switch for formats: TP itself (format
// 32), bf16_t (16), q8_t (8), uint8_t (bytes).
template <class Op, class TP, class TG, Rounding R>
SpanFn<Op> span_for_state(StateFormat s, Isa isa) {
  constexpr unsigned kFormats = StateFormatsOf<Op>::value;
  switch (s) {
    case StateFormat::kParam:
      if constexpr ((kFormats & format_bit(StateFormat::kParam)) != 0) return pick_isa<Op, TP, TG, TP, R>(isa);
      break;
    case StateFormat::kBFloat16:
      if constexpr ((kFormats & format_bit(StateFormat::kBFloat16)) != 0) {
        return pick_isa<Op, TP, TG, bf16_t, R>(isa);
      }
      break;
    case StateFormat::kBlock8:
      if constexpr ((kFormats & format_bit(StateFormat::kBlock8)) != 0) return pick_isa<Op, TP, TG, q8_t, R>(isa);
      break;
    case StateFormat::kBytes:
      if constexpr ((kFormats & format_bit(StateFormat::kBytes)) != 0) {
        return pick_isa<Op, TP, TG, uint8_t, R>(isa);
      }
      break;
  }
  return nullptr;
}

template <class Op, class TP, Rounding R>
SpanFn<Op> span_for_grad(DType g, StateFormat s, Isa isa) {
  switch (g) {
    case DType::kBFloat16:
      return span_for_state<Op, TP, bf16_t, R>(s, isa);
    case DType::kFloat16:
      return span_for_state<Op, TP, f16_t, R>(s, isa);
    default:
      return span_for_state<Op, TP, float, R>(s, isa);
  }
}

// Stochastic rounding instantiates only the loops of Ops that store a param (stream 0); for
// the others (the Hessian EMA, LAMB's norm pass) the stochastic codes take the nearest loops,
// which do the same.
template <class Op, class TP>
SpanFn<Op> span_for_stochastic(DType g, StateFormat s, Isa isa) {
  if constexpr ((Op::kStore & 1u) != 0 && !NearestParamsOnly<Op>::value) {
    return span_for_grad<Op, TP, Rounding::kStochastic>(g, s, isa);
  } else {
    return span_for_grad<Op, TP, Rounding::kNearest>(g, s, isa);
  }
}

// kahan_summation: the compensated loops for Ops that read or write the param (LAMB's norm pass
// sums p*p of p + c), the nearest ones for the others.
template <class Op, class TP>
SpanFn<Op> span_for_compensated(DType g, StateFormat s, Isa isa) {
  if constexpr (((Op::kLoad | Op::kStore) & 1u) != 0 && !NearestParamsOnly<Op>::value) {
    return span_for_grad<Op, TP, Rounding::kCompensated>(g, s, isa);
  } else {
    return span_for_grad<Op, TP, Rounding::kNearest>(g, s, isa);
  }
}

// The loop for one (param format, grad, state format) triple: float32, bfloat16 or float16
// param and grad (the param's bfloat16 / float16 also rounded stochastically or compensated:
// storage.h), or
// float64 both (the bindings refuse float64 paired with another dtype: table.h); the states in
// one of the StateFormats. nullptr: an Op that does not step that state format.
template <class Op>
SpanFn<Op> span_for(DType p, DType g, StateFormat s, Isa isa) {
  if constexpr (WideParamsOnly<Op>::value) {
    if (p == DType::kFloat64) return span_for_state<Op, double, double, Rounding::kNearest>(s, isa);
    if (p == DType::kFloat32) return span_for_grad<Op, float, Rounding::kNearest>(g, s, isa);
    return nullptr;  // not reached (lamb.cpp's wide_states)
  }
  switch (p) {
    case DType::kFloat64:
      return span_for_state<Op, double, double, Rounding::kNearest>(s, isa);
    case DType::kBFloat16:
      return span_for_grad<Op, bf16_t, Rounding::kNearest>(g, s, isa);
    case DType::kFloat16:
      return span_for_grad<Op, f16_t, Rounding::kNearest>(g, s, isa);
    case DType::kBFloat16Stochastic:
      return span_for_stochastic<Op, bf16_t>(g, s, isa);
    case DType::kFloat16Stochastic:
      return span_for_stochastic<Op, f16_t>(g, s, isa);
    case DType::kBFloat16Compensated:
      return span_for_compensated<Op, bf16_t>(g, s, isa);
    case DType::kFloat16Compensated:
      return span_for_compensated<Op, f16_t>(g, s, isa);
    default:
      return span_for_grad<Op, float, Rounding::kNearest>(g, s, isa);
  }
}

// Runs op over every chunk of the launch. partials: 2 doubles per chunk when Op::kReduce.
// The static schedule gives each thread one contiguous range of chunks (friendly to the
// hardware prefetchers); chunk results never depend on the thread count.
template <class Op>
void run(const Op& op, const Launch& l, const Args& a, double* partials) {
  if (l.n_chunks == 0) return;
  const float gmul = grad_multiplier(a.grad);
  const SpanFn<Op> fn = span_for<Op>(l.param, l.grad, l.state, a.isa);
  if (fn == nullptr) return;  // not reached: the callers pick Ops of the launch's state format
  const TensorRow* rows = l.rows;
  const int n_rows = l.n_rows;
  int64_t total = 0;
  for (int r = 0; r < n_rows; ++r) total += rows[r].numel;
  const bool parallel = a.num_threads > 1 && l.n_chunks > 1 && total >= kParallelMin;
  if (!parallel) {
    // The same chunks in the same order, found by walking the rows: no binary search per chunk
    // (it cost about a fifth of a step over 1000 tensors of 64 elements).
    for (int r = 0; r < n_rows; ++r) {
      const TensorRow& row = rows[r];
      for (int64_t b = 0, c = row.first_chunk; b < row.numel; b += kCpuChunk, ++c) {
        fn(op, row, b, std::min(b + kCpuChunk, row.numel), gmul,
           partials != nullptr ? partials + c * kMaxReduce : nullptr, l.maps);
      }
    }
    return;
  }
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (parallel)
  for (int64_t c = 0; c < l.n_chunks; ++c) {
    const TensorRow& row = rows[find_row(rows, n_rows, c)];
    const int64_t b = (c - row.first_chunk) * kCpuChunk;
    const int64_t e = std::min(b + kCpuChunk, row.numel);
    fn(op, row, b, e, gmul, partials != nullptr ? partials + c * kMaxReduce : nullptr, l.maps);
  }
}

}  // namespace cpu
}  // namespace mupopt
