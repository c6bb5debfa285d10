// The storage layer of the C++ backends (CPU loops and CUDA kernel alike): how a value computed in
// float32 is written to its storage format. The per-element math of the optimizers (adamw.h, ...)
// never sees a format; the traversal (multi_tensor.h) loads with to_compute() and stores with
// store_value<TP, R>(), where TP is the storage type (float, bf16_t, f16_t, double: common.h)
// and R the rounding of the param stream:
//
//   Rounding::kNearest     round to nearest even, as torch's copy_ (common.h's from_float);
//   Rounding::kStochastic  bfloat16 / float16 rounded stochastically (below); float32 and
//                          float64 stores are exact and ignore it;
//   Rounding::kCompensated bfloat16 / float16 params with a compensation c of their dtype
//                          (kahan_summation; TensorRow::compensation): loaded as p + c, stored
//                          as the split (load_param / store_param below).
//
// A launch carries its param format as a DType code (kBFloat16Stochastic, kFloat16Stochastic,
// kBFloat16Compensated, kFloat16Compensated: the bf16 / f16 storage of the param, its states
// rounded to nearest), so the drivers pick the loop instantiation by one switch. The param
// stream is read and written through load_param / store_param, which are to_compute /
// store_value for every format but the compensated one (same code: the other loops unchanged).
//
// The states (streams >= 2) have a format of their own, StateFormat (state_bits,
// mupopt/optim/_lean_states.py): kParam (the param's storage type, format 32), kBFloat16
// (bfloat16 states of float32 / float16 params, format 16: rounded to nearest on store) or
// kBlock8 (format 8: uint8 codes and a float32 absmax per block of kQuantBlock elements; storage
// type q8_t, decoded and encoded per block by the traversal with the tables of QuantTable).
//
// Stochastic rounding: the executable spec is mupopt/storage.py (round_stochastic, random_bits);
// this is the same rule, bit for bit (tests/test_stochastic_rounding.py compares the backends):
//  - random bits: 16 per element, one 32-bit word per pair j = i >> 1 of element indices,
//    mix32(key ^ lo32(j) ^ hi32(j)*0x9E3779B9), its low half for even i and high half for odd
//    i, with the per-tensor, per-step key = mix32(mix32(step) ^ seed) formed on the host
//    (TensorRow::sr_key) and mix32 C. Wellons' lowbias32 (hash-prospector, 2018: two
//    multiply-xorshift rounds);
//  - bfloat16: add the 16 random bits to the float32 pattern, keep its upper half;
//  - float16: |x| >= 2^-14: the same with the top 13 bits below float16's 10-bit mantissa;
//    below, in units of float16's fixed spacing 2^-24: up when the 16 bits < frac(|x|*2^24)*2^16;
//  - inf stays inf, NaN stays a quiet NaN (bits: bf16_stochastic, f16_stochastic).
// Written without branches (masks), so the CPU loops stay vectorised.
#pragma once

#include "common.h"

namespace mupopt {

enum class Rounding : int32_t { kNearest = 0, kStochastic = 1, kCompensated = 2 };

// lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16.
MUPOPT_HDI uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// A tensor's key at one step (``step``: the count after this step's increment).
MUPOPT_HD inline uint32_t sr_step_key(uint32_t seed, uint32_t step) { return mix32(mix32(step) ^ seed); }

// The key with the high word of the pair index (element index >> 1) folded in. Chunks (32768
// CPU, 16384 CUDA elements) divide 2^33, so the high word is constant over one chunk: the loops
// form this once.
MUPOPT_HDI uint32_t sr_span_key(uint32_t key, int64_t begin) {
  return key ^ (static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 33) * 0x9E3779B9u);
}

// Non-finite values: inf stays inf; NaN stays NaN, quiet (bfloat16: its upper half with the quiet
// bit set; float16: 0x7E00 with the sign, as common.h's from_float). No round-to-nearest
// conversion on this path (an extra conversion and select per element); the guard keeps a NaN
// whose payload would carry into the exponent from becoming -0 and one whose payload lies in
// the low 16 bits from becoming inf.
// As a 32-bit word whose upper half is the result (common.h's bf16_nearest_high says why). Only
// NaN needs a select: r < 2^16 added to inf (low half zero) leaves its upper half alone, and
// finite patterns are <= 0xFF7FFFFF (no wrap). x != x is one float compare where a pattern test
// is two operations (three with a finiteness mask: 7 vector operations per element before, 3 now).
MUPOPT_HDI uint32_t bf16_stochastic_high(float x, uint32_t r) {  // r < 2^16
  const uint32_t u = float_bits(x);
  return x != x ? (u | 0x400000u) : u + r;
}

MUPOPT_HDI bf16_t bf16_stochastic(float x, uint32_t r) {  // r < 2^16
  bf16_t out;
  out.bits = static_cast<uint16_t>(bf16_stochastic_high(x, r) >> 16);
  return out;
}

MUPOPT_HDI f16_t f16_stochastic(float x, uint32_t r) {  // r < 2^16
  const uint32_t u = float_bits(x);
  const uint32_t ua = u & 0x7FFFFFFFu;
  // float16 normals and above: 13 random bits under float16's mantissa, then truncation.
  const uint32_t normal = (ua + (r >> 3)) & ~0x1FFFu;
  // Below 2^-14 (pattern 0x38800000): units of 2^-24. The clamp of the pattern keeps the lanes
  // of the other branch (and NaN) finite; y < 2^10, so the int32 conversions are exact.
  const uint32_t is_small = 0u - static_cast<uint32_t>(ua < 0x38800000u);
  const float y = bits_float((ua & is_small) | (0x38800000u & ~is_small)) * 0x1.0p+24f;
  const float whole = static_cast<float>(static_cast<int32_t>(y));
  const int32_t threshold = static_cast<int32_t>((y - whole) * 0x1.0p+16f);
  const float up = static_cast<float>(static_cast<int32_t>(static_cast<int32_t>(r) < threshold));
  const uint32_t small = float_bits((whole + up) * 0x1.0p-24f);
  const uint32_t mag = (small & is_small) | (normal & ~is_small);
  // One conversion: exact for the value on float16's grid (2^16 and above become inf), and
  // x itself where it is not finite.
  const uint32_t finite = 0u - static_cast<uint32_t>(ua < 0x7F800000u);
  return from_float<f16_t>(bits_float(((mag | (u & 0x80000000u)) & finite) | (u & ~finite)));
}

// The random word of the pair of elements whose pair index (element index >> 1) has low word
// ``pair_lo``, under sr_span_key's ``span_key``: 16 bits for each of the two elements.
MUPOPT_HDI uint32_t sr_word(uint32_t span_key, uint32_t pair_lo) { return mix32(span_key ^ pair_lo); }

// The 16 random bits of element ``i`` (in the span of ``span_key``).
MUPOPT_HDI uint32_t sr_bits(uint32_t span_key, int64_t i) {
  const uint32_t word = sr_word(span_key, static_cast<uint32_t>(static_cast<uint64_t>(i) >> 1));
  return (word >> ((static_cast<uint32_t>(i) & 1u) * 16u)) & 0xFFFFu;
}

// compute type -> storage. ``r``: the element's 16 random bits (sr_bits), read by kStochastic
// on 16-bit storage only.
template <class TP, Rounding R>
MUPOPT_HDI TP store_value(compute_t<TP> x, uint32_t r) {
  if constexpr (R == Rounding::kStochastic && std::is_same<TP, bf16_t>::value) {
    return bf16_stochastic(x, r);
  } else if constexpr (R == Rounding::kStochastic && std::is_same<TP, f16_t>::value) {
    return f16_stochastic(x, r);
  } else {
    (void)r;
    return from_compute<TP>(x);
  }
}

// store_value for bfloat16, in bf16_nearest_high's form.
template <Rounding R>
MUPOPT_HDI uint32_t bf16_store_high(float x, uint32_t r) {
  if constexpr (R == Rounding::kStochastic) {
    return bf16_stochastic_high(x, r);
  } else {
    (void)r;
    return bf16_nearest_high(x);
  }
}

// ---------------------------------------------------------------------------------------------
// State formats
// ---------------------------------------------------------------------------------------------
// kBytes: uint8 states moved as plain numbers, for the no-math bound of format 8's traffic only
// (csrc/cpu/traffic.cpp).
enum class StateFormat : int32_t { kParam = 0, kBFloat16 = 1, kBlock8 = 2, kBytes = 3 };
constexpr int kStateFormatCount = 4;
// An Op's kStateFormats: a mask of (1 << format).
constexpr unsigned format_bit(StateFormat f) { return 1u << static_cast<int>(f); }
// What an Op steps unless it says otherwise (driver.h).
constexpr unsigned kOptimizerFormats =
    format_bit(StateFormat::kParam) | format_bit(StateFormat::kBFloat16) | format_bit(StateFormat::kBlock8);

// Format 8's storage tag: one uint8 code per element (the row's stream pointer) and one float32
// absmax per block (TensorRow::absmax). Never converted element by element: the CPU loops decode
// and encode whole blocks (multi_tensor.h).
struct q8_t {
  uint8_t code;
};

// Format 8's block: the spec's BLOCK (_lean_states.py); blocks start at element 0 of a tensor,
// and the chunks of both traversals are multiples of it, so a chunk holds whole blocks.
constexpr int kQuantBlock = 256;

// One map's tables (one per state stream; its kind, signed or unsigned, is the optimizer's
// choice), built by mupopt/kernels/cpp/ops.py from _lean_states.py's map and its bucket search
// and handed over as one int32 tensor: [0, 256) the map's float32 values, [256] lo, [257] count,
// then 2*count bucket entries (count for y >= 0, then count for y < 0).
//
// The nearest code of a normalized y (|y| <= 1 or NaN), the spec's "number of midpoints < y",
// through the 2^16 buckets of float32 values sharing their top 16 bits (each holds at most one
// midpoint): code = base + (y > midpoint in y's bucket). Only the buckets of magnitudes in
// [lo, lo + count) are kept: lo is below the bucket of the smallest |midpoint| (every smaller
// magnitude has lo's code) and lo + count - 1 is 1.0's bucket (|y| <= 1; NaN, whose magnitude
// is above it, takes that entry: the spec's NaN code is the top one, as bucketize puts NaN after
// every midpoint). 2 * count is about 5600 entries, 22 KiB for the dynamic maps: L1-resident.
// An entry is base << 16 | t: within the bucket y > midpoint exactly when the low 16 bits of
// y's pattern, complemented for y < 0 (the pattern order of negative floats is reversed), are
// > t; t = 0xFFFF where the bucket holds no midpoint (never true).
// After the entries, kQuantVectorWords words for the AVX-512 VBMI codec (csrc/cpu/q8_vbmi.h,
// which documents them): the values and the midpoints as byte planes, and the pivots of a rank
// search over the midpoints' 16-bit keys, then 132 words of its closed-form search (the rank
// lines of ops.py's _rank_lines; ``lines`` is null where the map has none).
constexpr int kQuantHeader = 258;
constexpr int kQuantVectorWords = 704 + 132;
struct QuantTable {
  const float* value = nullptr;      // 256 map values
  const uint32_t* entry = nullptr;   // 2 * count bucket entries
  uint32_t lo = 0, count = 0;
  const uint8_t* value_planes = nullptr;  // [4][256]: byte j of value[c] at [j][c]
  const uint8_t* mid_planes = nullptr;    // [4][256]: byte j of the c-th midpoint (NaN past the last)
  const uint16_t* pivots = nullptr;       // 384 keys of the rank search
  const float* lines = nullptr;           // 132 words of rank lines, or null (q8_vbmi.h)
};

// The code of x in a block of absmax ``amax`` (``div``: amax where amax > 0, else 1; ``pos``:
// amax > 0), as _lean_states.quantize_: y = x / amax, or 0 where amax is not > 0 (0 or NaN). In
// two steps, so that the CPU loops vectorise the first and look the table up in scalar code
// (multi_tensor.h's q8_encode): the entry index and the key of y, then the code from the entry.
MUPOPT_HDI void q8_bucket(float x, float div, bool pos, const QuantTable& q, uint32_t& index, uint32_t& key) {
  const float y = pos ? x / div : 0.0f;
  const uint32_t u = float_bits(y);
  const uint32_t body = u & 0x7FFFFFFFu;
  const uint32_t neg = (u >> 31) & static_cast<uint32_t>(body <= 0x7F800000u);  // NaN: as positive
  uint32_t mag = body >> 16;
  mag = mag < q.lo ? q.lo : mag;
  mag = mag > q.lo + q.count - 1 ? q.lo + q.count - 1 : mag;
  index = (mag - q.lo) + (neg ? q.count : 0u);
  key = (u & 0xFFFFu) ^ (neg ? 0xFFFFu : 0u);
}

MUPOPT_HDI uint8_t q8_code(uint32_t entry, uint32_t key) {
  return static_cast<uint8_t>((entry >> 16) + static_cast<uint32_t>(key > (entry & 0xFFFFu)));
}

// Whether a loop storing TP with rounding R needs random bits.
template <class TP, Rounding R>
constexpr bool kNeedsBits = R == Rounding::kStochastic && !std::is_same<compute_t<TP>, TP>::value;

// ---------------------------------------------------------------------------------------------
// Compensated params (kahan_summation; the executable spec is mupopt/storage.py, "Compensated
// stores"; Zamirai et al. 2020, arXiv 2010.06192): a bfloat16 / float16 param p keeps c, the
// rounding error of its last store, in a tensor of its dtype. Load: x = float32(p) + float32(c),
// one rounded float32 addition. Store: p = x rounded to nearest even, c = (x - float32(p))
// rounded to nearest even; x - p is exact in float32 (p is x rounded), so c loses only its own
// rounding. Non-finite x: p is x's rounding (inf stays inf), c = inf - inf = NaN, as the spec.
// ---------------------------------------------------------------------------------------------
template <class TP, Rounding R>
constexpr bool kCompensates = R == Rounding::kCompensated && !std::is_same<compute_t<TP>, TP>::value;

// Element i of the param stream p (compensation c: read by the compensated format only).
template <class TP, Rounding R>
MUPOPT_HDI compute_t<TP> load_param(const TP* p, const TP* c, int64_t i) {
  if constexpr (kCompensates<TP, R>) {
    return to_float(p[i]) + to_float(c[i]);
  } else {
    (void)c;
    return to_compute(p[i]);
  }
}

// The compensated split of x: p returned, c written.
template <class TP>
MUPOPT_HDI TP compensated_split(float x, TP& c) {
  const TP p = from_float<TP>(x);
  c = from_float<TP>(x - to_float(p));
  return p;
}

// compensated_split for bfloat16 in bf16_nearest_high's form (the CPU pair loop's words): the
// same operations, p's word returned, c's word in ``c_high`` (upper halves).
MUPOPT_HDI uint32_t bf16_compensated_high(float x, uint32_t& c_high) {
  const uint32_t p_high = bf16_nearest_high(x);
  c_high = bf16_nearest_high(x - bits_float(p_high & 0xFFFF0000u));
  return p_high;
}

// Stores element i of the param stream: store_value (``r``: its random bits, for kStochastic),
// or the compensated split into p[i] and c[i].
template <class TP, Rounding R>
MUPOPT_HDI void store_param(TP* p, TP* c, int64_t i, compute_t<TP> x, uint32_t r) {
  if constexpr (kCompensates<TP, R>) {
    (void)r;
    TP ci;
    p[i] = compensated_split<TP>(x, ci);
    c[i] = ci;
  } else {
    (void)c;
    p[i] = store_value<TP, R>(x, r);
  }
}

}  // namespace mupopt
