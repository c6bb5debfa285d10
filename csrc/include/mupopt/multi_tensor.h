// The one multi-tensor traversal of the C++ backends: a table with one row per tensor (its
// stream addresses, size and per-tensor scalars), cut into fixed-size chunks; the CPU loops
// (csrc/cpu/driver.h) and the CUDA kernel below both walk it. One call steps a whole parameter
// list, whatever the number of tensors and however many different muP multipliers they carry:
// a tensor's lr*lr_mult, decay factor 1 - lr*wd*wd_mult, eps*eps_mult and bias corrections
// are the scalars of its row.
//
// An optimizer plugs in as an "Op" (csrc/include/mupopt/<optimizer>.h):
//
//   struct SomeOp {
//     static constexpr int kStreams;        // tensors per row: 0 param-like, 1 grad-like, 2.. states
//     static constexpr unsigned kLoad;      // bit s: stream s is read
//     static constexpr unsigned kStore;     // bit s: stream s is written
//     static constexpr bool kGradStream;    // stream 1 is a gradient: unscaled and negated
//                                           // (maximize) before the Op sees it
//     static constexpr int kReduce;         // 0, or 2 per-element contributions summed per tensor
//     template <bool kFma, class T> MUPOPT_HDI void apply(T* x, const T* s, T* red) const;
//   };
//
// Storage: stream 0 has dtype TP, stream 1 dtype TG, the states (streams >= 2) the format TS:
// TP itself, bfloat16 or format 8's blocks (storage.h's StateFormat; in the CPU loops and the
// CUDA kernel alike, each with its own block loop for format 8). TP and TG are each float32, bfloat16 or float16 (nine pairs,
// float32 math), or both are float64 (float64 math, TS = TP; CPU loops only): the compute type
// T = compute_t<TP> (common.h).
#pragma once

#include "common.h"
#include "storage.h"

namespace mupopt {

constexpr int kMaxStreams = 5;
constexpr int kMaxScalars = 6;
constexpr int kMaxReduce = 2;

// Elements per chunk. CPU: 32768 fp32 elements = 128 KiB per stream; 16M parameters give 512
// chunks, so a static schedule splits them evenly over a few threads, while one chunk is long
// enough that the per-chunk call (a row lookup and an indirect call) is invisible.
constexpr int64_t kCpuChunk = 32768;
// CUDA: one thread block per chunk, 256 threads x 4-wide vectors x 16 iterations. Untuned (no
// GPU was available when this was written): 16384 gives 1024 blocks for 16M parameters, about
// 8 per SM on an H100, and 61k blocks for 1B.
constexpr int64_t kCudaChunk = 16384;

// One row of the launch table. Plain data, identical for the host compiler and nvcc: the
// bindings build it, the CPU loops read it in place, the CUDA path copies it to the device.
struct TensorRow {
  void* ptr[kMaxStreams];     // stream addresses (unused streams: nullptr)
  int64_t numel;              // > 0: empty tensors get no row
  int64_t first_chunk;        // index of this tensor's first chunk within its launch
  double scalar[kMaxScalars];  // per-tensor scalars (meaning given by the Op's header), formed in
                               // float64 and rounded once to the compute type by the loops
  int32_t aligned;            // CUDA: every used stream allows 4-element vector accesses
  int32_t source;             // the tensor's index in the op's lists (LAMB's per-tensor sums)
  uint32_t sr_key;            // stochastic rounding of the param stream: sr_step_key (storage.h)
  float* absmax[kMaxStreams];  // format 8 (StateFormat::kBlock8): each state stream's block scales
  void* compensation;         // kahan_summation: the param's compensation (its dtype), else nullptr
};

// Format 8 on CUDA: where a launch's map tables lie in device memory. bindings_cuda.cpp copies
// the op's host tables (storage.h's QuantTable layout: 256 values, lo, count, 2*count bucket
// entries) to the device with the launch table, each distinct table once (AdamW's exp_avg_sq
// and max_exp_avg_sq share the unsigned map), and the kernel copies what its Op reads into
// shared memory. Plain data, built by the host compiler, read by the launchers.
struct DeviceMaps {
  const uint32_t* words = nullptr;   // device address of the tables, back to back
  int32_t offset[kMaxStreams] = {};  // stream s's table begins at words + offset[s]
  uint32_t lo[kMaxStreams] = {};     // its header, as checked on the host (table.h's check_map)
  uint32_t count[kMaxStreams] = {};  // 0: stream s has no table
};

// The state formats an Op steps (storage.h): its kStateFormats mask, else kOptimizerFormats
// (LAMB's passes that keep float32 moments or the direction between them are for format 32
// only; the CPU traffic bound moves bfloat16 and raw bytes). Both drivers instantiate an Op
// for these formats only.
template <class Op, class = void>
struct StateFormatsOf : std::integral_constant<unsigned, kOptimizerFormats> {};
template <class Op>
struct StateFormatsOf<Op, std::void_t<decltype(Op::kStateFormats)>>
    : std::integral_constant<unsigned, Op::kStateFormats> {};

// Whether an Op has loops for stochastically rounded and compensated params: every Op but one
// that says kNearestParamsOnly (the traffic bound, cpu/traffic.cpp: its callers pass plain
// tensors, whose codes are the nearest ones, and its bytes are the same; its rounding loops were
// half of that file's 79 s of compile time).
template <class Op, class = void>
struct NearestParamsOnly : std::false_type {};
template <class Op>
struct NearestParamsOnly<Op, std::void_t<decltype(Op::kNearestParamsOnly)>> : std::bool_constant<Op::kNearestParamsOnly> {};

// Whether an Op runs for float32 and float64 params only (Op::kWideParamsOnly: LAMB's passes
// that keep the moments or the direction between them, which lamb.cpp and lamb.cu pick for
// format-32 states of float32 / float64 params only): no loops for 16-bit params (on the CPU a
// third of lamb.cpp's compile time went to loops no call could reach).
template <class Op, class = void>
struct WideParamsOnly : std::false_type {};
template <class Op>
struct WideParamsOnly<Op, std::void_t<decltype(Op::kWideParamsOnly)>> : std::bool_constant<Op::kWideParamsOnly> {};

// Per-call gradient handling, shared by every Op with kGradStream.
struct GradArgs {
  const float* grad_scale;  // nullptr, or the loss scale: g is multiplied by 1/scale
  const float* found_inf;   // nullptr, or nonzero: the whole call is skipped (params and states)
  float sign;               // -1 for maximize, else 1
};

// 1/scale formed in float64 and rounded once, as GradScaler.unscale_ does
// (scale.double().reciprocal().float()), so g * inv_scale here equals torch's unscaled g.
MUPOPT_HDI float grad_multiplier(const GradArgs& ga) {
  float gmul = ga.sign;
  if (ga.grad_scale != nullptr) {
    gmul *= static_cast<float>(1.0 / static_cast<double>(*ga.grad_scale));
  }
  return gmul;
}

MUPOPT_HDI int64_t chunks_of(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

// The row holding chunk c: the last row whose first_chunk <= c (rows are in chunk order).
MUPOPT_HDI int find_row(const TensorRow* rows, int n_rows, int64_t c) {
  int lo = 0, hi = n_rows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (rows[mid].first_chunk <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// Host: one chunk of one tensor, as a contiguous loop the compiler vectorises (restrict
// pointers, no branch on data, uniform choices resolved by templates or loop-invariant selects).
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC__)

// Plain loops: "GCC ivdep" (no loop-carried dependence; the streams never alias). Not "omp
// simd": GCC 12 turns the per-element array x[] into per-lane "simd arrays" under it and then
// gives up on the loop (checked with -fopt-info-vec). Sums: "omp simd reduction", the one way
// to let the compiler reorder a float64 sum without -ffast-math.
#if defined(__clang__)
#define MUPOPT_SIMD _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define MUPOPT_SIMD _Pragma("GCC ivdep")
#else
#define MUPOPT_SIMD
#endif
#if defined(_OPENMP)
#define MUPOPT_SIMD_SUM_R0_R1 _Pragma("omp simd reduction(+ : r0, r1)")
#else
#define MUPOPT_SIMD_SUM_R0_R1
#endif

// The 16 random bits (storage.h) of elements b0 .. b0+n-1 of one span (b0 even: blocks start at
// multiples of 256) into bits[0 .. n), from one hash per pair of elements: on a little-endian
// machine the pair's word, stored whole, puts its low half on the even element and its high
// half on the odd one, which is the rule; so the hash loop is a plain vectorised loop over
// words. (Written as two 16-bit stores per word, GCC 12 saved nothing over one hash per element.)
MUPOPT_FORCE_INLINE void sr_fill(uint16_t* __restrict__ bits, uint32_t span_key, int64_t b0, int n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  typedef uint32_t __attribute__((may_alias)) word_t;
  word_t* words = reinterpret_cast<word_t*>(bits);
  const uint32_t pair0 = static_cast<uint32_t>(static_cast<uint64_t>(b0) >> 1);
  MUPOPT_SIMD
  for (int k = 0; k < (n + 1) / 2; ++k) words[k] = sr_word(span_key, pair0 + static_cast<uint32_t>(k));
#else
  for (int k = 0; k < n; ++k) bits[k] = static_cast<uint16_t>(sr_bits(span_key, b0 + k));
#endif
}

// 16-bit storage (bf16_t, f16_t) read and written as 32-bit words of two elements (little-endian:
// the element of even index in the low half), for the pair loop of cpu_span. aligned(2): a 16-bit
// tensor may start at any even address.
template <class S>
constexpr bool kPairStorage = std::is_same<S, bf16_t>::value || std::is_same<S, f16_t>::value;
typedef uint32_t __attribute__((may_alias, aligned(2))) pair_word_t;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kLittleEndian = true;
#else
constexpr bool kLittleEndian = false;
#endif

// The two elements of word k of stream p, as float32. bf16 widens by a shift and a mask (one
// integer operation each, where per-element loads widen with a zero-extension and a shift and
// must keep element order: two more per 16 elements).
template <class S>
MUPOPT_FORCE_INLINE void load_pair(const S* p, int k, float& lo, float& hi) {
  const uint32_t w = reinterpret_cast<const pair_word_t*>(p)[k];
  if constexpr (std::is_same<S, bf16_t>::value) {
    lo = bits_float(w << 16);
    hi = bits_float(w & 0xFFFF0000u);
  } else {
    lo = to_float(S{static_cast<uint16_t>(w)});
    hi = to_float(S{static_cast<uint16_t>(w >> 16)});
  }
}

// Word k of stream p from the values of its two elements, stored with rounding R (``word``: the
// pair's random word, read by stochastic rounding). bf16 through storage.h's 32-bit forms: built
// from 16-bit results, GCC 12 vectorised the stochastic AdamW loop over 32 pairs with 16-bit
// lanes in the mix and spilled registers.
template <class S, Rounding R>
MUPOPT_FORCE_INLINE void store_pair(S* p, int k, float lo, float hi, uint32_t word) {
  uint32_t w;
  if constexpr (std::is_same<S, bf16_t>::value) {
    w = (bf16_store_high<R>(lo, word & 0xFFFFu) >> 16) | (bf16_store_high<R>(hi, word >> 16) & 0xFFFF0000u);
  } else {
    w = static_cast<uint32_t>(store_value<S, R>(lo, word & 0xFFFFu).bits) |
        (static_cast<uint32_t>(store_value<S, R>(hi, word >> 16).bits) << 16);
  }
  reinterpret_cast<pair_word_t*>(p)[k] = w;
}

// The param stream's word k in its format (storage.h's load_param / store_param for a pair):
// load_pair / store_pair, or with the compensation's word k of ``c`` (kahan_summation).
template <class S, Rounding R>
MUPOPT_FORCE_INLINE void load_param_pair(const S* p, const S* c, int k, float& lo, float& hi) {
  load_pair(p, k, lo, hi);
  if constexpr (kCompensates<S, R>) {
    float clo, chi;
    load_pair(c, k, clo, chi);
    lo += clo;
    hi += chi;
  } else {
    (void)c;
  }
}

template <class S, Rounding R>
MUPOPT_FORCE_INLINE void store_param_pair(S* p, S* c, int k, float lo, float hi, uint32_t word) {
  if constexpr (kCompensates<S, R>) {
    uint32_t wp, wc;
    if constexpr (std::is_same<S, bf16_t>::value) {
      uint32_t clo, chi;
      wp = (bf16_compensated_high(lo, clo) >> 16) | (bf16_compensated_high(hi, chi) & 0xFFFF0000u);
      wc = (clo >> 16) | (chi & 0xFFFF0000u);
    } else {
      S clo, chi;
      wp = static_cast<uint32_t>(compensated_split<S>(lo, clo).bits) |
           (static_cast<uint32_t>(compensated_split<S>(hi, chi).bits) << 16);
      wc = static_cast<uint32_t>(clo.bits) | (static_cast<uint32_t>(chi.bits) << 16);
    }
    reinterpret_cast<pair_word_t*>(p)[k] = wp;
    reinterpret_cast<pair_word_t*>(c)[k] = wc;
  } else {
    (void)c;
    store_pair<S, R>(p, k, lo, hi, word);
  }
}

#if defined(_OPENMP)
#define MUPOPT_SIMD_MAX_M _Pragma("omp simd reduction(max : m)")
#else
#define MUPOPT_SIMD_MAX_M
#endif

// Table lookups of format 8's plain codec stay scalar: vectorised, GCC makes them AVX2 gathers,
// which ran the whole 8-bit AdamW step at 18 ns per element on the 2-core Xeon (L2-resident, one
// thread; 3.3 ns for float32 states): gathers are microcoded where the Gather Data Sampling
// mitigation is on. An empty asm on the looked-up value keeps the compiler from vectorising the
// loop. (CPUs with AVX-512 VBMI take csrc/cpu/q8_vbmi.h's permutes instead: no lookups.)
#if defined(__GNUC__) || defined(__clang__)
#define MUPOPT_SCALAR(v) asm("" : "+r"(v))
#else
#define MUPOPT_SCALAR(v)
#endif

// Format 8, one block of n <= kQuantBlock elements, in plain C++ (every copy of the loops; the
// 512-bit copy on CPUs with AVX-512 VBMI takes csrc/cpu/q8_vbmi.h's codec instead, same bits):
// decode (value = MAP[code] * absmax, the float32 product of _lean_states.dequantize) into the
// L1 array q ...
struct Q8Scalar {
  template <class T>
  static MUPOPT_FORCE_INLINE void decode(const uint8_t* __restrict__ codes, float amax, const QuantTable& table,
                                         T* __restrict__ q, int n) {
    const uint32_t* __restrict__ bits = reinterpret_cast<const uint32_t*>(table.value);
    for (int k = 0; k < n; ++k) {
      uint32_t v = bits[codes[k]];
      MUPOPT_SCALAR(v);
      q[k] = static_cast<T>(bits_float(v) * amax);
    }
  }

  // ... and encode the new values q: absmax = the max of the patterns of |x| (integer order is
  // float order there, and a NaN pattern exceeds every other, so a NaN propagates as in torch's
  // amax), then the codes (storage.h's q8_bucket, vectorised, and q8_code). float64 values
  // (float64 params) are rounded to float32 first, as the reference stores them into its float32
  // decoded copy before quantizing.
  template <class T>
  static MUPOPT_FORCE_INLINE void encode(const T* __restrict__ q, uint8_t* __restrict__ codes, float* absmax,
                                         const QuantTable& table, int n) {
    uint32_t m = 0;
    MUPOPT_SIMD_MAX_M
    for (int k = 0; k < n; ++k) {
      const uint32_t a = float_bits(static_cast<float>(q[k])) & 0x7FFFFFFFu;
      m = a > m ? a : m;
    }
    const float amax = bits_float(m);
    *absmax = amax;
    const bool pos = amax > 0.0f;
    const float div = pos ? amax : 1.0f;
    const QuantTable t = table;
    uint32_t index[kQuantBlock], key[kQuantBlock];
    MUPOPT_SIMD
    for (int k = 0; k < n; ++k) q8_bucket(static_cast<float>(q[k]), div, pos, t, index[k], key[k]);
    for (int k = 0; k < n; ++k) {
      uint32_t e = t.entry[index[k]];
      MUPOPT_SCALAR(e);
      codes[k] = q8_code(e, key[k]);
    }
  }
};

// TS: the states' storage type (streams >= 2): TP (format 32), bf16_t (format 16) or q8_t
// (format 8, blocks decoded into and encoded from L1 arrays by the codec Q8; ``maps`` holds each
// state stream's tables).
template <class Op, bool kFma, class TP, class TG, class TS, Rounding R = Rounding::kNearest, class Q8 = Q8Scalar>
MUPOPT_FORCE_INLINE void cpu_span(const Op& op_ref, const TensorRow& row, int64_t begin, int64_t end, float gmul_f,
                                  double* red, const QuantTable* maps) {
  using T = compute_t<TP>;
  static_assert(std::is_same<T, compute_t<TG>>::value, "float64 gradients go with float64 params and states");
  constexpr bool kQ8 = std::is_same<TS, q8_t>::value;
  // Local copies: the compiler cannot prove that stores through the stream pointers leave a
  // referenced Op alone, and would reload its fields every element (GCC 12 then refuses to
  // vectorise the bf16 loops: "no vectype" for the reloaded bool).
  const Op op = op_ref;
  const T gmul = static_cast<T>(gmul_f);
  constexpr unsigned L = Op::kLoad;
  constexpr unsigned W = Op::kStore;
  // Format 8: the state streams' storage is codes (uint8), read and written in the block loop.
  using SS = typename std::conditional<kQ8, uint8_t, TS>::type;
  TP* __restrict__ s0 = static_cast<TP*>(row.ptr[0]);
  const TG* __restrict__ s1 = static_cast<const TG*>(row.ptr[1]);
  SS* __restrict__ s2 = static_cast<SS*>(row.ptr[2]);
  SS* __restrict__ s3 = static_cast<SS*>(row.ptr[3]);
  SS* __restrict__ s4 = static_cast<SS*>(row.ptr[4]);
  // The compensated param format's second tensor (storage.h's load_param / store_param; read by
  // no other format).
  TP* __restrict__ c0 = static_cast<TP*>(row.compensation);
  T sc[kMaxScalars];
  for (int k = 0; k < kMaxScalars; ++k) sc[k] = static_cast<T>(row.scalar[k]);
  const uint32_t span_key = sr_span_key(row.sr_key, begin);

  // The body shared by the loops below: load, apply, store one element. Format 8 states come
  // from and go to the block arrays q2..q4 (index k), the others from and to memory (index i).
#define MUPOPT_LOAD_STATE(X, S, Q)                   \
  if constexpr (kQ8) {                               \
    X = Q[k];                                        \
  } else {                                           \
    X = to_compute(reinterpret_cast<const TS*>(S)[i]); \
  }
#define MUPOPT_CPU_ELEMENT(RED, RBITS)                                     \
  T x[kMaxStreams] = {T(0), T(0), T(0), T(0), T(0)};                       \
  if constexpr ((L & 1u) != 0) x[0] = load_param<TP, R>(s0, c0, i);       \
  if constexpr ((L & 2u) != 0) x[1] = to_compute(s1[i]);                   \
  if constexpr ((L & 4u) != 0) { MUPOPT_LOAD_STATE(x[2], s2, q2) }        \
  if constexpr ((L & 8u) != 0) { MUPOPT_LOAD_STATE(x[3], s3, q3) }        \
  if constexpr ((L & 16u) != 0) { MUPOPT_LOAD_STATE(x[4], s4, q4) }       \
  if constexpr (Op::kGradStream) x[1] *= gmul;                             \
  op.template apply<kFma, T>(x, sc, RED);                                  \
  if constexpr ((W & 1u) != 0) store_param<TP, R>(s0, c0, i, x[0], RBITS); \
  if constexpr ((W & 4u) != 0) {                                           \
    if constexpr (kQ8) q2[k] = x[2];                                       \
    else reinterpret_cast<TS*>(s2)[i] = from_compute<TS>(x[2]);            \
  }                                                                        \
  if constexpr ((W & 8u) != 0) {                                           \
    if constexpr (kQ8) q3[k] = x[3];                                       \
    else reinterpret_cast<TS*>(s3)[i] = from_compute<TS>(x[3]);            \
  }                                                                        \
  if constexpr ((W & 16u) != 0) {                                          \
    if constexpr (kQ8) q4[k] = x[4];                                       \
    else reinterpret_cast<TS*>(s4)[i] = from_compute<TS>(x[4]);            \
  }

  // The pair loop: 16-bit params, grads and states (no sums, no blocks), two elements per
  // iteration from 32-bit words, the pair's random word (storage.h: one per pair, low half to
  // the even element) hashed in the loop itself. Against the per-element loop below and the
  // block loop's separate hash (AdamW and ADOPT, bf16 everything, 512-bit copy, one thread,
  // L2-resident, 2-core Ice Lake Xeon, under load): nearest 0.65 -> 0.62 (AdamW) and
  // 0.65 -> 0.55 ns per element (ADOPT), stochastic 0.80 -> 0.63 and 0.80 -> 0.55. The loop was
  // at the divider's bound with the 512-bit ports nearly full (AdamW: a square root and two
  // divisions per element, 64 cycles per 32 elements); in-register widening and packing (a
  // shift or mask per element, no permutes) frees the ports the hash needs, and the hash then
  // runs in the divider's shadow instead of in a loop of its own.
  // Compensated params (kahan_summation) read and write their compensation's word beside the
  // param's (load_param_pair / store_param_pair).
  constexpr bool kPairs = kLittleEndian && Op::kReduce == 0 && kPairStorage<TP> && kPairStorage<TG> && kPairStorage<TS>;
  if constexpr (kPairs) {
    (void)red;
    (void)maps;
    // int: a chunk holds kCpuChunk / 2 pairs; a 64-bit counter made GCC 12 form the hash's pair
    // indices in 64-bit lanes and narrow them (vpaddq, vpermt2d), with spills.
    const int pairs = static_cast<int>((end - begin) >> 1);
    const uint32_t pair0 = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 1);
    TP* __restrict__ p0 = s0 + begin;
    TP* __restrict__ pc = c0 + begin;
    const TG* __restrict__ p1 = s1 + begin;
    TS* __restrict__ p2 = reinterpret_cast<TS*>(s2) + begin;
    TS* __restrict__ p3 = reinterpret_cast<TS*>(s3) + begin;
    TS* __restrict__ p4 = reinterpret_cast<TS*>(s4) + begin;
    MUPOPT_SIMD
    for (int k = 0; k < pairs; ++k) {
      T a[kMaxStreams] = {T(0), T(0), T(0), T(0), T(0)};
      T b[kMaxStreams] = {T(0), T(0), T(0), T(0), T(0)};
      if constexpr ((L & 1u) != 0) load_param_pair<TP, R>(p0, pc, k, a[0], b[0]);
      if constexpr ((L & 2u) != 0) load_pair(p1, k, a[1], b[1]);
      if constexpr ((L & 4u) != 0) load_pair(p2, k, a[2], b[2]);
      if constexpr ((L & 8u) != 0) load_pair(p3, k, a[3], b[3]);
      if constexpr ((L & 16u) != 0) load_pair(p4, k, a[4], b[4]);
      if constexpr (Op::kGradStream) {
        a[1] *= gmul;
        b[1] *= gmul;
      }
      op.template apply<kFma, T>(a, sc, nullptr);
      op.template apply<kFma, T>(b, sc, nullptr);
      const uint32_t word = kNeedsBits<TP, R> ? sr_word(span_key, pair0 + static_cast<uint32_t>(k)) : 0u;
      if constexpr ((W & 1u) != 0) store_param_pair<TP, R>(p0, pc, k, a[0], b[0], word);
      if constexpr ((W & 4u) != 0) store_pair<TS, Rounding::kNearest>(p2, k, a[2], b[2], 0u);
      if constexpr ((W & 8u) != 0) store_pair<TS, Rounding::kNearest>(p3, k, a[3], b[3], 0u);
      if constexpr ((W & 16u) != 0) store_pair<TS, Rounding::kNearest>(p4, k, a[4], b[4], 0u);
    }
    if (((end - begin) & 1) != 0) {
      const int64_t i = end - 1;
      constexpr int k = 0;
      T* q2 = nullptr;
      T* q3 = nullptr;
      T* q4 = nullptr;
      (void)q2, (void)q3, (void)q4, (void)k;
      MUPOPT_CPU_ELEMENT(nullptr, (kNeedsBits<TP, R> ? sr_bits(span_key, i) : 0u))
    }
  } else if constexpr (Op::kReduce > 0 || kNeedsBits<TP, R> || kQ8) {
    // Blocks of 256 (a chunk holds whole blocks: kCpuChunk is a multiple of kQuantBlock), each in
    // a few plain loops over L1-resident arrays, since one loop doing everything is not
    // vectorised by GCC 12 (its simd-lane arrays, see MUPOPT_SIMD):
    //  - stochastic rounding where the pair loop does not apply (sums, format 8, a float32
    //    stream): the block's random bits first (sr_fill: one hash per pair). Hashed per
    //    element inside this loop they ran the AdamW bf16 step at 1.25-1.30x the
    //    round-to-nearest loop, split 1.2x (L2-resident, AVX2, one thread; docs/dtypes.md);
    //  - format 8: each loaded state stream decoded (map value times the block's absmax);
    //  - the update, leaving format 8's new values and the reduction's contributions in arrays;
    //  - sums in float64, per chunk (then per tensor in chunk order, so the result does not
    //    depend on the thread count), with an "omp simd" reduction;
    //  - format 8: each stored stream's absmax (the max of the patterns of |x|: integer order is
    //    float order there, and a NaN pattern exceeds every other, so a NaN propagates as in
    //    torch's amax), then its codes.
    constexpr int kBlock = kQuantBlock;
    constexpr int kRed = Op::kReduce > 0 ? kBlock : 1;
    constexpr int kQ = kQ8 ? kBlock : 1;
    T t0[kRed], t1[kRed];
    T q2[kQ], q3[kQ], q4[kQ];
    alignas(64) uint16_t bits[kNeedsBits<TP, R> ? kBlock : 2];
    double r0 = 0.0, r1 = 0.0;
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int n = static_cast<int>(end - b0 < kBlock ? end - b0 : kBlock);
      if constexpr (kNeedsBits<TP, R>) sr_fill(bits, span_key, b0, n);
      const int64_t blk = b0 / kBlock;
      if constexpr (kQ8) {
        if constexpr ((L & 4u) != 0) Q8::decode(s2 + b0, row.absmax[2][blk], maps[2], q2, n);
        if constexpr ((L & 8u) != 0) Q8::decode(s3 + b0, row.absmax[3][blk], maps[3], q3, n);
        if constexpr ((L & 16u) != 0) Q8::decode(s4 + b0, row.absmax[4][blk], maps[4], q4, n);
      }
      if constexpr (Op::kReduce > 0) {
        MUPOPT_SIMD
        for (int k = 0; k < n; ++k) {
          const int64_t i = b0 + k;
          T c[kMaxReduce] = {T(0), T(0)};
          MUPOPT_CPU_ELEMENT(c, (static_cast<uint32_t>(bits[kNeedsBits<TP, R> ? k : 0])))
          t0[k] = c[0];
          t1[k] = c[1];
        }
        MUPOPT_SIMD_SUM_R0_R1
        for (int k = 0; k < n; ++k) {
          r0 += static_cast<double>(t0[k]);
          r1 += static_cast<double>(t1[k]);
        }
      } else {
        MUPOPT_SIMD
        for (int k = 0; k < n; ++k) {
          const int64_t i = b0 + k;
          MUPOPT_CPU_ELEMENT(nullptr, (static_cast<uint32_t>(bits[kNeedsBits<TP, R> ? k : 0])))
        }
      }
      if constexpr (kQ8) {
        if constexpr ((W & 4u) != 0) Q8::encode(q2, s2 + b0, row.absmax[2] + blk, maps[2], n);
        if constexpr ((W & 8u) != 0) Q8::encode(q3, s3 + b0, row.absmax[3] + blk, maps[3], n);
        if constexpr ((W & 16u) != 0) Q8::encode(q4, s4 + b0, row.absmax[4] + blk, maps[4], n);
      }
    }
    if constexpr (Op::kReduce > 0) {
      red[0] = r0;
      red[1] = r1;
    } else {
      (void)red;
    }
  } else {
    (void)red;
    (void)maps;
    MUPOPT_SIMD
    for (int64_t i = begin; i < end; ++i) {
      constexpr int k = 0;
      T* q2 = nullptr;
      T* q3 = nullptr;
      T* q4 = nullptr;
      (void)q2, (void)q3, (void)q4, (void)k;
      MUPOPT_CPU_ELEMENT(nullptr, 0u)
    }
  }
#undef MUPOPT_CPU_ELEMENT
#undef MUPOPT_LOAD_STATE
}

#endif  // !__CUDACC__

// ---------------------------------------------------------------------------------------------
// CUDA: one thread block per chunk; the block finds its row by binary search over first_chunk
// (no per-chunk table to upload), reads 4 elements per access when the host found every stream
// of the row aligned for it (16 bytes fp32, 8 bytes bf16), and skips everything when found_inf
// is set. Launch: one per (Op, dtype pair, state format), grid = number of chunks. States: TS =
// TP (format 32), bf16_t (format 16) or q8_t (format 8: q8_chunk below).
// ---------------------------------------------------------------------------------------------
#if defined(__CUDACC__)

namespace cuda_detail {

constexpr int kThreads = 256;
constexpr int kVec = 4;

__device__ MUPOPT_FORCE_INLINE void load4(const float* p, float* o) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x;
  o[1] = v.y;
  o[2] = v.z;
  o[3] = v.w;
}

__device__ MUPOPT_FORCE_INLINE void load4(const bf16_t* p, float* o) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  o[0] = bits_float(v.x << 16);
  o[1] = bits_float(v.x & 0xFFFF0000u);
  o[2] = bits_float(v.y << 16);
  o[3] = bits_float(v.y & 0xFFFF0000u);
}

__device__ MUPOPT_FORCE_INLINE void load4(const f16_t* p, float* o) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  f16_t h[4];
  h[0].bits = static_cast<uint16_t>(v.x & 0xFFFFu);
  h[1].bits = static_cast<uint16_t>(v.x >> 16);
  h[2].bits = static_cast<uint16_t>(v.y & 0xFFFFu);
  h[3].bits = static_cast<uint16_t>(v.y >> 16);
#pragma unroll
  for (int j = 0; j < 4; ++j) o[j] = to_float(h[j]);
}

__device__ MUPOPT_FORCE_INLINE void store4(float* p, const float* x) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}

__device__ MUPOPT_FORCE_INLINE void store4(bf16_t* p, const float* x) {
  uint2 v;
  v.x = static_cast<uint32_t>(from_float<bf16_t>(x[0]).bits) |
        (static_cast<uint32_t>(from_float<bf16_t>(x[1]).bits) << 16);
  v.y = static_cast<uint32_t>(from_float<bf16_t>(x[2]).bits) |
        (static_cast<uint32_t>(from_float<bf16_t>(x[3]).bits) << 16);
  *reinterpret_cast<uint2*>(p) = v;
}

__device__ MUPOPT_FORCE_INLINE void store4(f16_t* p, const float* x) {
  uint2 v;
  v.x = static_cast<uint32_t>(from_float<f16_t>(x[0]).bits) |
        (static_cast<uint32_t>(from_float<f16_t>(x[1]).bits) << 16);
  v.y = static_cast<uint32_t>(from_float<f16_t>(x[2]).bits) |
        (static_cast<uint32_t>(from_float<f16_t>(x[3]).bits) << 16);
  *reinterpret_cast<uint2*>(p) = v;
}

// The param stream's 4-element load in its format: load4, plus the compensation's 4 elements
// for the compensated format (storage.h's load_param: one float32 addition each).
template <Rounding R, class TP>
__device__ MUPOPT_FORCE_INLINE void load4_param(const TP* p, const TP* c, float* o) {
  load4(p, o);
  if constexpr (kCompensates<TP, R>) {
    float e[4];
    load4(c, e);
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] += e[j];
  }
}

// The param stream's 4-element store in its format: rounding to nearest as store4, the
// compensated split into p and c (both 4-wide), or each element through the storage layer
// (storage.h) with its index ``i0 + j``.
template <Rounding R, class TP>
__device__ MUPOPT_FORCE_INLINE void store4_param(TP* p, TP* c, const float* x, uint32_t span_key, int64_t i0) {
  if constexpr (R == Rounding::kNearest || std::is_same<TP, float>::value) {
    store4(p, x);
  } else if constexpr (R == Rounding::kCompensated) {
    uint32_t hp[4], hc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      TP cj;
      hp[j] = compensated_split<TP>(x[j], cj).bits;
      hc[j] = cj.bits;
    }
    uint2 vp, vc;
    vp.x = hp[0] | (hp[1] << 16);
    vp.y = hp[2] | (hp[3] << 16);
    vc.x = hc[0] | (hc[1] << 16);
    vc.y = hc[2] | (hc[3] << 16);
    *reinterpret_cast<uint2*>(p) = vp;
    *reinterpret_cast<uint2*>(c) = vc;
  } else {
    // i0 is a multiple of 4: the elements are two whole pairs, one random word each (storage.h).
    const uint32_t pair0 = static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 1);
    const uint32_t w0 = sr_word(span_key, pair0), w1 = sr_word(span_key, pair0 + 1u);
    const uint32_t r[4] = {w0 & 0xFFFFu, w0 >> 16, w1 & 0xFFFFu, w1 >> 16};
    uint32_t h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = store_value<TP, R>(x[j], r[j]).bits;
    uint2 v;
    v.x = h[0] | (h[1] << 16);
    v.y = h[2] | (h[3] << 16);
    *reinterpret_cast<uint2*>(p) = v;
  }
}

// Block-wide sum of one double per thread, in a fixed order (deterministic).
__device__ MUPOPT_FORCE_INLINE double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  }
  return total;  // valid in thread 0
}

// One element's step, the same in every CUDA loop: the gradient multiplier, the Op's math on
// x (the element of each stream, updated in place), its reduction terms added to acc0 / acc1.
template <class Op>
__device__ MUPOPT_FORCE_INLINE void apply_element(const Op& op, float* x, float gmul, const float* sc, double& acc0,
                                                  double& acc1) {
  if constexpr (Op::kGradStream) x[1] *= gmul;
  float c[kMaxReduce] = {0.0f, 0.0f};
  op.template apply<true, float>(x, sc, c);
  if constexpr (Op::kReduce > 0) {
    acc0 += static_cast<double>(c[0]);
    acc1 += static_cast<double>(c[1]);
  }
}

// One chunk [begin, end) of a row whose states are format 32 or 16 (TS = TP or bf16_t): 4-wide
// accesses where the row is aligned, then the rest one element per thread.
template <class Op, class TP, class TG, class TS, Rounding R>
__device__ MUPOPT_FORCE_INLINE void plain_chunk(const TensorRow& row, int64_t begin, int64_t end, const Op& op,
                                                float gmul, const float* sc, uint32_t span_key, double& acc0,
                                                double& acc1) {
  constexpr unsigned L = Op::kLoad;
  constexpr unsigned W = Op::kStore;
  TP* s0 = static_cast<TP*>(row.ptr[0]);
  const TG* s1 = static_cast<const TG*>(row.ptr[1]);
  TS* s2 = static_cast<TS*>(row.ptr[2]);
  TS* s3 = static_cast<TS*>(row.ptr[3]);
  TS* s4 = static_cast<TS*>(row.ptr[4]);
  TP* c0 = static_cast<TP*>(row.compensation);  // the compensated param format's (storage.h)

  int64_t scalar_from = begin;
  if (row.aligned) {
    const int64_t vec_end = begin + ((end - begin) / kVec) * kVec;
    for (int64_t i = begin + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) {
      float v[kMaxStreams][kVec];
      if constexpr ((L & 1u) != 0) load4_param<R>(s0 + i, c0 + i, v[0]);
      if constexpr ((L & 2u) != 0) load4(s1 + i, v[1]);
      if constexpr ((L & 4u) != 0) load4(s2 + i, v[2]);
      if constexpr ((L & 8u) != 0) load4(s3 + i, v[3]);
      if constexpr ((L & 16u) != 0) load4(s4 + i, v[4]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float x[kMaxStreams];
#pragma unroll
        for (int s = 0; s < kMaxStreams; ++s) x[s] = ((L >> s) & 1u) ? v[s][j] : 0.0f;
        apply_element(op, x, gmul, sc, acc0, acc1);
#pragma unroll
        for (int s = 0; s < kMaxStreams; ++s) v[s][j] = x[s];
      }
      if constexpr ((W & 1u) != 0) store4_param<R>(s0 + i, c0 + i, v[0], span_key, i);
      if constexpr ((W & 4u) != 0) store4(s2 + i, v[2]);
      if constexpr ((W & 8u) != 0) store4(s3 + i, v[3]);
      if constexpr ((W & 16u) != 0) store4(s4 + i, v[4]);
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    float x[kMaxStreams] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr ((L & 1u) != 0) x[0] = load_param<TP, R>(s0, c0, i);
    if constexpr ((L & 2u) != 0) x[1] = to_float(s1[i]);
    if constexpr ((L & 4u) != 0) x[2] = to_float(s2[i]);
    if constexpr ((L & 8u) != 0) x[3] = to_float(s3[i]);
    if constexpr ((L & 16u) != 0) x[4] = to_float(s4[i]);
    apply_element(op, x, gmul, sc, acc0, acc1);
    if constexpr ((W & 1u) != 0) store_param<TP, R>(s0, c0, i, x[0], sr_bits(span_key, i));
    if constexpr ((W & 4u) != 0) s2[i] = from_float<TS>(x[2]);
    if constexpr ((W & 8u) != 0) s3[i] = from_float<TS>(x[3]);
    if constexpr ((W & 16u) != 0) s4[i] = from_float<TS>(x[4]);
  }
}

// ---- Format 8 (state_bits=8, storage.h's kBlock8) ------------------------------------------
// A thread takes 4 consecutive elements per iteration and 256 threads 1024, so quantization
// block b of an iteration (256 elements) is threads 64b .. 64b+63: two whole warps. Per
// iteration: the codes of each loaded state stream decoded (map value times the block's absmax),
// the Op's math, then for each stored state stream the block's absmax (a warp max of the |x|
// patterns, then one exchange through shared memory between the block's two warps) and the
// codes, by the same helpers as the CPU loops (storage.h's q8_bucket and q8_code). Every thread
// runs every iteration (threads past the end hold no elements), so the loop may synchronise.
//
// The tables live in shared memory, copied in by each thread block: the 256 map values (1 KiB)
// of a stream the Op loads, the whole bucket table of one it stores (the dynamic maps: 22.9 KiB
// signed, 23.7 KiB unsigned; 46.5 KiB for AdamW's two, under the 48 KiB a kernel gets without
// opting in). Chosen over a binary search over the 255 midpoints in shared memory: a lookup is
// one shared load per element instead of 8 dependent ones. At an H100's memory bound (3.35 TB/s,
// 10 bytes per element for AdamW with bf16 params: 0.34 G elements per ms) AdamW's two decodes
// and two binary searches would take 18 shared loads per element, 6 T per second of the about
// 7.4 T (132 SMs x 32 lanes x 1.75 GHz) an H100 serves without bank conflicts; the buckets take
// 4. And it is the CPU loops' rule, not a second implementation of the spec's. Cost: 47 KiB read from L2 per thread block of 16384 elements (3 bytes per element
// against 10-16 from DRAM), and 4 resident blocks per SM (half occupancy). Untuned: no GPU was
// lent when this was written.

// The shared-memory copy of a launch's tables for one Op: stream s's table begins at word at[s]
// (its values; lo, count and the bucket entries follow, as in device memory). Piece s copies
// n[s] words from src[s]; n[s] = 0 where the stream reads another stream's copy (the same table)
// or nothing. Built on the host per launch (shared_maps).
struct SharedMaps {
  const uint32_t* src[kMaxStreams];
  int32_t n[kMaxStreams];
  int32_t at[kMaxStreams];
  uint32_t lo[kMaxStreams];
  uint32_t count[kMaxStreams];
  int32_t words;  // shared memory in 4-byte words
};

// What an Op with load mask L and store mask W reads of the tables in ``d``: the values of a
// loaded stream, the whole table of a stored one; false when a stream it needs has no table.
template <unsigned L, unsigned W>
inline bool shared_maps(const DeviceMaps& d, SharedMaps& out) {
  out = SharedMaps{};
  for (int s = 2; s < kMaxStreams; ++s) {
    const bool store = ((W >> s) & 1u) != 0, load = ((L >> s) & 1u) != 0;
    if (!store && !load) continue;
    if (d.words == nullptr || d.count[s] == 0) return false;
    const int32_t need = store ? kQuantHeader + 2 * static_cast<int32_t>(d.count[s]) : 256;
    out.lo[s] = d.lo[s];
    out.count[s] = d.count[s];
    int reuse = -1;
    for (int t = 2; t < s; ++t) {
      if (out.n[t] >= need && d.offset[t] == d.offset[s]) reuse = t;
    }
    if (reuse >= 0) {
      out.at[s] = out.at[reuse];
      continue;
    }
    out.src[s] = d.words + d.offset[s];
    out.n[s] = need;
    out.at[s] = out.words;
    out.words += need;
  }
  return true;
}

// The dynamic shared memory of the format-8 kernels (the tables); 16-byte aligned.
extern __shared__ __align__(16) uint32_t q8_shared[];

// Max of one uint32 per thread over a warp.
__device__ MUPOPT_FORCE_INLINE uint32_t warp_max(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xFFFFFFFFu, v);
#else
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  return v;
#endif
}

// One chunk [begin, end) of a row whose states are format 8. acc0/acc1: this thread's share of
// the Op's sums.
template <class Op, class TP, class TG, Rounding R>
__device__ MUPOPT_FORCE_INLINE void q8_chunk(const TensorRow& row, int64_t begin, int64_t end, const Op& op,
                                             float gmul, const float* sc, uint32_t span_key, const SharedMaps& sm,
                                             double& acc0, double& acc1) {
  constexpr unsigned L = Op::kLoad;
  constexpr unsigned W = Op::kStore;
  // The tables into shared memory (46.5 KiB for the dynamic maps: 47 loads per thread), before
  // any lookup.
#pragma unroll
  for (int s = 2; s < kMaxStreams; ++s) {
    for (int k = threadIdx.x; k < sm.n[s]; k += kThreads) q8_shared[sm.at[s] + k] = __ldg(sm.src[s] + k);
  }
  __syncthreads();
  QuantTable q[kMaxStreams];
#pragma unroll
  for (int s = 2; s < kMaxStreams; ++s) {
    q[s].value = reinterpret_cast<const float*>(q8_shared + sm.at[s]);
    q[s].entry = q8_shared + sm.at[s] + kQuantHeader;
    q[s].lo = sm.lo[s];
    q[s].count = sm.count[s];
  }
  // Per-warp maxima of each stored state stream (index s - 2), two buffers used in turn by
  // successive iterations: the buffer written in iteration k + 1 was last read in iteration
  // k - 1, before every thread passed iteration k's barrier, so one barrier per iteration.
  __shared__ uint32_t warp_amax[2][kMaxStreams - 2][kThreads / 32];
  TP* s0 = static_cast<TP*>(row.ptr[0]);
  TP* c0 = static_cast<TP*>(row.compensation);  // the compensated param format's (storage.h)
  const TG* s1 = static_cast<const TG*>(row.ptr[1]);
  uint8_t* codes[kMaxStreams] = {nullptr, nullptr, static_cast<uint8_t*>(row.ptr[2]),
                                 static_cast<uint8_t*>(row.ptr[3]), static_cast<uint8_t*>(row.ptr[4])};
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool block_head = (threadIdx.x & (kQuantBlock / kVec - 1)) == 0;  // first thread of its 64
  int buf = 0;
  for (int64_t base = begin; base < end; base += kThreads * kVec, buf ^= 1) {
    const int64_t i0 = base + threadIdx.x * kVec;
    const int n = end - i0 >= kVec ? kVec : (end > i0 ? static_cast<int>(end - i0) : 0);
    const bool whole = n == kVec && row.aligned;  // vector accesses (codes: 4 bytes)
    const int64_t blk = i0 / kQuantBlock;
    // Elements past the end stay 0: they add nothing to a block's max.
    float v[kMaxStreams][kVec] = {};
    if (whole) {
      if constexpr ((L & 1u) != 0) load4_param<R>(s0 + i0, c0 + i0, v[0]);
      if constexpr ((L & 2u) != 0) load4(s1 + i0, v[1]);
    } else {
      // Every index below a constant (unrolled, guarded by j < n): a runtime index would put v
      // in local memory.
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j >= n) continue;
        if constexpr ((L & 1u) != 0) v[0][j] = load_param<TP, R>(s0, c0, i0 + j);
        if constexpr ((L & 2u) != 0) v[1][j] = to_float(s1[i0 + j]);
      }
    }
#pragma unroll
    for (int s = 2; s < kMaxStreams; ++s) {
      if (((L >> s) & 1u) == 0 || n == 0) continue;
      const float amax = row.absmax[s][blk];
      uint32_t c4 = 0;
      if (whole) {
        c4 = *reinterpret_cast<const uint32_t*>(codes[s] + i0);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (j < n) c4 |= static_cast<uint32_t>(codes[s][i0 + j]) << (8 * j);
        }
      }
      // The spec's float32 product; __fmul_rn is never contracted into a later add of the
      // Op's math (nvcc fuses a*b + c by default), which the reference's stored value is not.
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < n) v[s][j] = __fmul_rn(q[s].value[(c4 >> (8 * j)) & 0xFFu], amax);
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j >= n) continue;
      float x[kMaxStreams];
#pragma unroll
      for (int s = 0; s < kMaxStreams; ++s) x[s] = v[s][j];
      apply_element(op, x, gmul, sc, acc0, acc1);
#pragma unroll
      for (int s = 0; s < kMaxStreams; ++s) v[s][j] = x[s];
    }
    if constexpr ((W & 1u) != 0) {
      if (whole) {
        store4_param<R>(s0 + i0, c0 + i0, v[0], span_key, i0);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (j < n) store_param<TP, R>(s0, c0, i0 + j, v[0][j], sr_bits(span_key, i0 + j));
        }
      }
    }
    if constexpr ((W & 0x1Cu) != 0) {
      // absmax: the max of the |x| patterns (integer order is float order there, and a NaN
      // pattern exceeds every other: a NaN propagates, as on the CPU and in torch's amax).
#pragma unroll
      for (int s = 2; s < kMaxStreams; ++s) {
        if (((W >> s) & 1u) == 0) continue;
        uint32_t m = 0;
#pragma unroll
        for (int j = 0; j < kVec; ++j) m = max(m, float_bits(v[s][j]) & 0x7FFFFFFFu);
        m = warp_max(m);
        if (lane == 0) warp_amax[buf][s - 2][warp] = m;
      }
      __syncthreads();
#pragma unroll
      for (int s = 2; s < kMaxStreams; ++s) {
        if (((W >> s) & 1u) == 0 || n == 0) continue;
        const float amax = bits_float(max(warp_amax[buf][s - 2][warp], warp_amax[buf][s - 2][warp ^ 1]));
        // Every thread of the block has decoded it (before the barrier above): now it may change.
        if (block_head) row.absmax[s][blk] = amax;
        const bool pos = amax > 0.0f;
        const float div = pos ? amax : 1.0f;
        uint32_t c4 = 0;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          uint32_t index, key;
          q8_bucket(v[s][j], div, pos, q[s], index, key);
          c4 |= static_cast<uint32_t>(q8_code(q[s].entry[index], key)) << (8 * j);
        }
        if (whole) {
          *reinterpret_cast<uint32_t*>(codes[s] + i0) = c4;
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            if (j < n) codes[s][i0 + j] = static_cast<uint8_t>(c4 >> (8 * j));
          }
        }
      }
    }
  }
}

}  // namespace cuda_detail

template <class Op, class TP, class TG, class TS, Rounding R>
__global__ void __launch_bounds__(cuda_detail::kThreads)
    multi_tensor_kernel(const TensorRow* __restrict__ rows, int n_rows, Op op, GradArgs ga, double* partials,
                        cuda_detail::SharedMaps maps) {
  using namespace cuda_detail;
  if (ga.found_inf != nullptr && *ga.found_inf != 0.0f) return;
  const int64_t chunk = blockIdx.x;
  const TensorRow& row = rows[find_row(rows, n_rows, chunk)];
  const int64_t begin = (chunk - row.first_chunk) * kCudaChunk;
  const int64_t end = min(begin + kCudaChunk, row.numel);
  const float gmul = grad_multiplier(ga);
  float sc[kMaxScalars];
#pragma unroll
  for (int k = 0; k < kMaxScalars; ++k) sc[k] = static_cast<float>(row.scalar[k]);
  const uint32_t span_key = sr_span_key(row.sr_key, begin);
  double acc0 = 0.0, acc1 = 0.0;
  if constexpr (std::is_same<TS, q8_t>::value) {
    q8_chunk<Op, TP, TG, R>(row, begin, end, op, gmul, sc, span_key, maps, acc0, acc1);
  } else {
    (void)maps;
    plain_chunk<Op, TP, TG, TS, R>(row, begin, end, op, gmul, sc, span_key, acc0, acc1);
  }
  if constexpr (Op::kReduce > 0) {
    __shared__ double shared[kThreads / 32];
    const double a = block_sum(acc0, shared);
    const double b = block_sum(acc1, shared);
    if (threadIdx.x == 0) {
      partials[chunk * kMaxReduce] = a;
      partials[chunk * kMaxReduce + 1] = b;
    }
  }
}

template <class Op, class TP, class TG, class TS, Rounding R>
cudaError_t launch_typed(const TensorRow* rows, int n_rows, int64_t n_chunks, const Op& op, const GradArgs& ga,
                         double* partials, const DeviceMaps& maps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_chunks)), block(cuda_detail::kThreads);
  cuda_detail::SharedMaps shared{};
  size_t bytes = 0;
  if constexpr (std::is_same<TS, q8_t>::value) {
    if (!cuda_detail::shared_maps<Op::kLoad, Op::kStore>(maps, shared)) return cudaErrorInvalidValue;
    bytes = static_cast<size_t>(shared.words) * sizeof(uint32_t);
    // Above 48 KiB (static shared memory included: under 1 KiB here) a kernel must opt in. The
    // dynamic maps need 46.5 KiB at most, so this is for other tables (bindings_cuda.cpp bounds
    // them).
    if (bytes > 47 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(multi_tensor_kernel<Op, TP, TG, TS, R>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
      if (err != cudaSuccess) return err;
    }
  } else {
    (void)maps;
  }
  multi_tensor_kernel<Op, TP, TG, TS, R><<<grid, block, bytes, stream>>>(rows, n_rows, op, ga, partials, shared);
  return cudaGetLastError();
}

// The states' storage (storage.h's StateFormat): the param's (format 32), bfloat16 (16) or
// format 8's blocks; each only where the Op steps it (StateFormatsOf).
template <class Op, class TP, class TG, Rounding R>
cudaError_t launch_state_typed(const TensorRow* rows, int n_rows, int64_t n_chunks, StateFormat ts, const Op& op,
                               const GradArgs& ga, double* partials, const DeviceMaps& maps, cudaStream_t stream) {
  constexpr unsigned kFormats = StateFormatsOf<Op>::value;
  switch (ts) {
    case StateFormat::kParam:
      if constexpr ((kFormats & format_bit(StateFormat::kParam)) != 0) {
        return launch_typed<Op, TP, TG, TP, R>(rows, n_rows, n_chunks, op, ga, partials, maps, stream);
      }
      break;
    case StateFormat::kBFloat16:
      if constexpr ((kFormats & format_bit(StateFormat::kBFloat16)) != 0) {
        return launch_typed<Op, TP, TG, bf16_t, R>(rows, n_rows, n_chunks, op, ga, partials, maps, stream);
      }
      break;
    case StateFormat::kBlock8:
      if constexpr ((kFormats & format_bit(StateFormat::kBlock8)) != 0) {
        return launch_typed<Op, TP, TG, q8_t, R>(rows, n_rows, n_chunks, op, ga, partials, maps, stream);
      }
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

template <class Op, class TP, Rounding R = Rounding::kNearest>
cudaError_t launch_grad_typed(const TensorRow* rows, int n_rows, int64_t n_chunks, DType tg, StateFormat ts,
                              const Op& op, const GradArgs& ga, double* partials, const DeviceMaps& maps,
                              cudaStream_t stream) {
  switch (tg) {
    case DType::kBFloat16:
      return launch_state_typed<Op, TP, bf16_t, R>(rows, n_rows, n_chunks, ts, op, ga, partials, maps, stream);
    case DType::kFloat16:
      return launch_state_typed<Op, TP, f16_t, R>(rows, n_rows, n_chunks, ts, op, ga, partials, maps, stream);
    case DType::kFloat32:
      return launch_state_typed<Op, TP, float, R>(rows, n_rows, n_chunks, ts, op, ga, partials, maps, stream);
    default:
      return cudaErrorInvalidValue;  // float32 math only: the bindings refuse float64 tensors
  }
}

// A stochastic param format: the stochastic loops for Ops that store the param (stream 0), the
// nearest ones (which do the same) for the others.
template <class Op, class TP>
cudaError_t launch_stochastic(const TensorRow* rows, int n_rows, int64_t n_chunks, DType tg, StateFormat ts,
                              const Op& op, const GradArgs& ga, double* partials, const DeviceMaps& maps,
                              cudaStream_t stream) {
  if constexpr ((Op::kStore & 1u) != 0) {
    return launch_grad_typed<Op, TP, Rounding::kStochastic>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps,
                                                            stream);
  } else {
    return launch_grad_typed<Op, TP>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
  }
}

// A compensated param format: the compensated loops for Ops that read or write the param
// (LAMB's norm pass sums p*p of p + c), the nearest ones for the others (the Hessian EMA).
template <class Op, class TP>
cudaError_t launch_compensated(const TensorRow* rows, int n_rows, int64_t n_chunks, DType tg, StateFormat ts,
                               const Op& op, const GradArgs& ga, double* partials, const DeviceMaps& maps,
                               cudaStream_t stream) {
  if constexpr (((Op::kLoad | Op::kStore) & 1u) != 0) {
    return launch_grad_typed<Op, TP, Rounding::kCompensated>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps,
                                                             stream);
  } else {
    return launch_grad_typed<Op, TP>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
  }
}

// One launch per (param format, grad dtype, state format) triple. rows: device table of n_rows
// rows with first_chunk counted from 0; partials: device buffer of 2 * n_chunks doubles when
// Op::kReduce, else unused; maps: format 8's tables (unused by the other formats).
template <class Op>
cudaError_t launch_multi_tensor(const TensorRow* rows, int n_rows, int64_t n_chunks, DType tp, DType tg,
                                StateFormat ts, const DeviceMaps& maps, const Op& op, const GradArgs& ga,
                                double* partials, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  if (n_chunks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  if constexpr (WideParamsOnly<Op>::value) {  // float32 params only here (float64: refused)
    if (tp != DType::kFloat32) return cudaErrorInvalidValue;
    return launch_grad_typed<Op, float>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
  }
  switch (tp) {
    case DType::kBFloat16:
      return launch_grad_typed<Op, bf16_t>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    case DType::kFloat16:
      return launch_grad_typed<Op, f16_t>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    case DType::kBFloat16Stochastic:
      return launch_stochastic<Op, bf16_t>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    case DType::kFloat16Stochastic:
      return launch_stochastic<Op, f16_t>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    case DType::kBFloat16Compensated:
      return launch_compensated<Op, bf16_t>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    case DType::kFloat16Compensated:
      return launch_compensated<Op, f16_t>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    case DType::kFloat32:
      return launch_grad_typed<Op, float>(rows, n_rows, n_chunks, tg, ts, op, ga, partials, maps, stream);
    default:
      return cudaErrorInvalidValue;  // float64: as above
  }
}

#endif  // __CUDACC__

}  // namespace mupopt
