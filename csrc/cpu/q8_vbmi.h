// Format 8's block codec with AVX-512 VBMI (x86 only): the same bits as multi_tensor.h's
// Q8Scalar, without a table lookup per element. The 512-bit copy of the loops takes it on CPUs
// with avx512vbmi (driver.h, Isa::kAvx512Vbmi). Why: with scalar lookups (two decodes and two
// encodes per AdamW element) the 8-bit step ran at 18% of its byte bound on the 2-core Ice Lake
// Xeon (34 ms for 16M elements against 10.5 ms for torch's fused float32 step), and AVX2/AVX-512
// gathers are slower still there (microcoded under the Gather Data Sampling mitigation). Byte
// permutes over tables held in registers replace the lookups:
//
//  - a 256-entry float32 table is four 256-byte planes (plane j: byte j of every entry); 64
//    codes look up one plane with two vpermi2b (bits 0-6 of the code pick one of 128 bytes) and
//    a blend on bit 7, and two rounds of byte / word unpacks interleave the four planes into 64
//    floats (lookup64). Decode = value[code] * absmax (float32 product), as Q8Scalar.
//  - encode: absmax (integer max of the |x| patterns) and y = x / absmax (float32 division) as
//    Q8Scalar; then the spec's code "number of midpoints < y" as c + (y > mid[c]) for a
//    candidate c that is the code or one below it, mid[c] looked up as above (lookup64 over the
//    midpoints' planes, padded with NaN past the last: no y compares above a padding entry).
//    Two ways to the candidate:
//    * rank lines (encode_lines; the dynamic maps and the signed linear one: ops.py's
//      _rank_lines). The dynamic map (Dettmers et al. 2021, "8-bit Optimizers via Block-wise
//      Quantization", arXiv 2110.02861; _lean_states._dynamic) is linear within each decade:
//      decade e holds n values 10^-e (0.1 + 0.9 (k + 1/2) / n), so the continuous rank rho(t)
//      (rho(value c) = c, rho(midpoint c) = c + 1/2) is a line there, and each binade of t meets
//      at most two decades. c = trunc(min(line_lo(t), line_hi(t))), the binade's two lines
//      (vpermt2ps on the exponent), mirrored for y < 0 in a signed map; the midpoints sit within
//      0.24 of c + 1/2 (the decades' end midpoints; float32 roundings add ~1e-5), far from the
//      integers where trunc changes, and a NaN y lands on the top code. About 16 instructions
//      per 16 values, against the search's 8 steps of permute, compare and add per 32 keys.
//      Checked against Q8Scalar on all 2^31 float32 y of [-1, 1] (benchmarks/bench_q8_codec.py
//      --check 1), and against the spec in tests/test_lean_states_cpu.py. One thread, L2
//      (benchmarks/bench_q8_codec.py, under load, paired with the search): 0.44-0.48 ns per
//      element per encode against 0.59-0.60 (dynamic maps).
//    * rank search (encode_search; the square-root map, whose rank is not piecewise linear):
//      rank = the number of midpoints whose 16-bit key (the top half of the float's
//      order-preserving integer key) is below y's key: a midpoint of a lower key is below y, one
//      of a higher key above it, and at most one midpoint shares y's key (each 2^16 bucket of
//      float32 patterns holds at most one: _lean_states._buckets checks it), the rank-th one,
//      which the one exact float32 comparison settles. The keys are padded with 0xFFFF (above
//      every y's, NaN excepted: NaN takes the top code by the rank, as the spec's NaN rule). The
//      rank is a branch-free binary search over the 255 keys, 32 lanes of 16 bits at a time: 8
//      steps, each a compare against the pivot key[rank + s - 1] of its step s, read from a
//      table of the pivots of that step by vpermw / vpermt2w (tables of 1 to 128 keys:
//      mupopt/kernels/cpp/ops.py's _vector_tables). About 800 instructions per block of 256.
//    What remains of an encode with lines (one thread, L2, under load): the midpoint lookup
//    ~0.19 ns per element (8 vpermt2b per 64: also the decode's cost), the division ~0.09
//    (16 vdivps per block, kept: the code depends on the rounded y).
//
// The search is generic over the map (any 256 ascending values with one midpoint per bucket at
// most: both families of MAP_NAMES, signed and unsigned), the lines hold for the maps ops.py
// gives them to; both are tested against the spec's quantize on every midpoint and its
// neighbours (tests/test_lean_states_cpu.py, through q8_codec.cpp and the loops).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "mupopt/multi_tensor.h"

namespace mupopt {
namespace cpu {

#define MUPOPT_TARGET_VBMI \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512vbmi,prefer-vector-width=512")))
#define MUPOPT_VBMI_INLINE MUPOPT_TARGET_VBMI inline __attribute__((always_inline))

namespace q8v {

// Index vectors of the permutes.
struct Indices {
  // lookup64's input order: the unpacks leave in 128-bit lane L of output r the entries of
  // input bytes 16L + 4r + (0..3), so the codes go in with byte 16L + 4r + j taken from
  // 16r + 4L + j and output r holds entries 16r .. 16r + 15 in order.
  alignas(64) uint8_t lane_order[64];
  alignas(64) uint8_t low_bytes[64];    // byte 2i of a vector pair: the low bytes of 64 uint16
  alignas(64) uint16_t high_words[32];  // word 2i + 1 of a vector pair: the high halves of 32 uint32
  constexpr Indices() : lane_order{}, low_bytes{}, high_words{} {
    for (int p = 0; p < 64; ++p) {
      lane_order[p] = static_cast<uint8_t>((p & 3) | (((p >> 4) & 3) << 2) | (((p >> 2) & 3) << 4));
      low_bytes[p] = static_cast<uint8_t>(2 * p);
    }
    for (int i = 0; i < 32; ++i) high_words[i] = static_cast<uint16_t>(2 * i + 1);
  }
};
inline constexpr Indices kIdx{};

// The live lanes of a group of elements starting m before the block's end (m may be <= 0).
MUPOPT_VBMI_INLINE __mmask64 live_mask(int m) {
  return m >= 64 ? ~__mmask64(0) : m <= 0 ? __mmask64(0) : (__mmask64(1) << m) - 1;
}

// 64 entries of a 256-entry float32 table given as four byte planes, at byte indices idx (in
// lane_order): out[r] = the entries of the codes 16r .. 16r + 15.
MUPOPT_VBMI_INLINE void lookup64(const uint8_t* planes, __m512i idx, __m512* out) {
  const __mmask64 high = _mm512_movepi8_mask(idx);  // bit 7: entries 128..255
  __m512i b[4];
  for (int j = 0; j < 4; ++j) {
    const uint8_t* p = planes + 256 * j;
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
    const __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(p + 128), idx, _mm512_loadu_si512(p + 192));
    b[j] = _mm512_mask_blend_epi8(high, lo, hi);
  }
  const __m512i w01lo = _mm512_unpacklo_epi8(b[0], b[1]), w01hi = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23lo = _mm512_unpacklo_epi8(b[2], b[3]), w23hi = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01lo, w23lo));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01lo, w23lo));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01hi, w23hi));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01hi, w23hi));
}

// The rank search over a block: kRankVectors vectors of 32 uint16 keys, each step applied to all
// of them before the next, so that the eight dependency chains (shift, permute, compare, masked
// add: about 8 cycles a step) overlap: one chain at a time (64 elements per loop iteration) ran
// the encode at about 3.8 cycles per element on the Ice Lake Xeon, latency-bound.
constexpr int kRankVectors = kQuantBlock / 32;

// One step: r += s where pivot < key (a function, not a lambda: a lambda would not carry the
// target). The pivot of step s is key[r + s - 1], r a multiple of 2s: entry r / (2s) of the
// step's pivots, read by vpermw from one register (steps 4 .. 64: at most 32 pivots).
MUPOPT_VBMI_INLINE void rank_step(__m512i* r, const __m512i* key, const uint16_t* pivots, int shift, short s) {
  const __m512i table = _mm512_loadu_si512(pivots);
  const __m512i add = _mm512_set1_epi16(s);
  for (int v = 0; v < kRankVectors; ++v) {
    const __m512i pivot = _mm512_permutexvar_epi16(_mm512_srli_epi16(r[v], shift), table);
    r[v] = _mm512_mask_add_epi16(r[v], _mm512_cmplt_epu16_mask(pivot, key[v]), r[v], add);
  }
}

// r[v] = the number of the 255 keys (ascending; storage.h's pivots) below each key of key[v].
MUPOPT_VBMI_INLINE void rank_block(const __m512i* key, __m512i* r, const uint16_t* pv) {
  const __m512i top = _mm512_set1_epi16(static_cast<short>(pv[352]));  // step 128: key[127]
  const __m512i add128 = _mm512_set1_epi16(128);
  for (int v = 0; v < kRankVectors; ++v) {
    r[v] = _mm512_maskz_mov_epi16(_mm512_cmplt_epu16_mask(top, key[v]), add128);
  }
  rank_step(r, key, pv + 320, 7, 64);
  rank_step(r, key, pv + 288, 6, 32);
  rank_step(r, key, pv + 256, 5, 16);
  rank_step(r, key, pv + 224, 4, 8);
  rank_step(r, key, pv + 192, 3, 4);
  {  // step 2: 64 pivots, one vpermt2w
    const __m512i lo = _mm512_loadu_si512(pv + 128), hi = _mm512_loadu_si512(pv + 160);
    const __m512i add = _mm512_set1_epi16(2);
    for (int v = 0; v < kRankVectors; ++v) {
      const __m512i pivot = _mm512_permutex2var_epi16(lo, _mm512_srli_epi16(r[v], 2), hi);
      r[v] = _mm512_mask_add_epi16(r[v], _mm512_cmplt_epu16_mask(pivot, key[v]), r[v], add);
    }
  }
  {  // step 1: 128 pivots, two vpermt2w and a blend on bit 6 of the index
    const __m512i t0 = _mm512_loadu_si512(pv), t1 = _mm512_loadu_si512(pv + 32);
    const __m512i t2 = _mm512_loadu_si512(pv + 64), t3 = _mm512_loadu_si512(pv + 96);
    const __m512i one = _mm512_set1_epi16(1), bit6 = _mm512_set1_epi16(64);
    for (int v = 0; v < kRankVectors; ++v) {
      const __m512i t = _mm512_srli_epi16(r[v], 1);
      const __m512i pivot = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(t, bit6),
                                                    _mm512_permutex2var_epi16(t0, t, t1),
                                                    _mm512_permutex2var_epi16(t2, t, t3));
      r[v] = _mm512_mask_add_epi16(r[v], _mm512_cmplt_epu16_mask(pivot, key[v]), r[v], one);
    }
  }
}

// One block of n <= kQuantBlock elements (codes read under a mask: the block may end the
// tensor; q holds kQuantBlock floats). Out of line: the loops that call them carry no VBMI
// target (one call per block and stream).
MUPOPT_TARGET_VBMI __attribute__((noinline)) inline void decode(const uint8_t* codes, float amax,
                                                                 const QuantTable& t, float* q, int n) {
  const __m512i order = _mm512_load_si512(kIdx.lane_order);
  const __m512 a = _mm512_set1_ps(amax);
  for (int k = 0; k < n; k += 64) {
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(live_mask(n - k), codes + k));
    __m512 v[4];
    lookup64(t.value_planes, c, v);
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(q + k + 16 * r, _mm512_mul_ps(v[r], a));
  }
}

// The rank lines of a map (ops.py's _rank_lines), in registers: per binade b (the exponent of
// max(|y|, 2^-31), low 5 bits: binades 2^-31 .. 2^0) two lines rho = t * slope + intercept.
struct RankLines {
  __m512 slope_lo[2], icpt_lo[2], slope_hi[2], icpt_hi[2];
  __m512 top;  // the top code, where a NaN y lands (the spec's NaN rule)
  MUPOPT_VBMI_INLINE explicit RankLines(const float* w) {
    for (int h = 0; h < 2; ++h) {
      slope_lo[h] = _mm512_loadu_ps(w + 16 * h);
      icpt_lo[h] = _mm512_loadu_ps(w + 32 + 16 * h);
      slope_hi[h] = _mm512_loadu_ps(w + 64 + 16 * h);
      icpt_hi[h] = _mm512_loadu_ps(w + 96 + 16 * h);
    }
    top = _mm512_set1_ps(w[128]);
  }
};

// The candidate code of 16 values y: trunc(rho(y)), one below or at the code, so that
// code = candidate + (y > midpoint[candidate]). rho is the min of the binade's two lines at
// t = |y| (signed maps; rho(y) = 254 - rho(|y|) for y < 0, -0 included) or t = max(y, 0)
// (unsigned: negative y below every midpoint, like 0). A NaN y stays NaN through the lines (max
// and min return their second operand, here the NaN one), and min(rho, top) turns it into top.
// rho >= -0.5 (rho(1) = 254.5 at most), so the truncation is the floor or 0.
template <bool kSigned>
MUPOPT_VBMI_INLINE __m512i line_candidate(__m512 y, const RankLines& L) {
  const __m512 t = kSigned ? _mm512_abs_ps(y) : _mm512_max_ps(_mm512_setzero_ps(), y);
  const __m512i b = _mm512_srli_epi32(_mm512_castps_si512(_mm512_max_ps(t, _mm512_set1_ps(0x1p-31f))), 23);
  const __m512 lo = _mm512_fmadd_ps(t, _mm512_permutex2var_ps(L.slope_lo[0], b, L.slope_lo[1]),
                                    _mm512_permutex2var_ps(L.icpt_lo[0], b, L.icpt_lo[1]));
  const __m512 hi = _mm512_fmadd_ps(t, _mm512_permutex2var_ps(L.slope_hi[0], b, L.slope_hi[1]),
                                    _mm512_permutex2var_ps(L.icpt_hi[0], b, L.icpt_hi[1]));
  __m512 rho = _mm512_min_ps(lo, hi);
  if constexpr (kSigned) {
    rho = _mm512_mask_sub_ps(rho, _mm512_movepi32_mask(_mm512_castps_si512(y)), _mm512_set1_ps(254.0f), rho);
  }
  return _mm512_cvttps_epi32(_mm512_min_ps(rho, L.top));
}

// The block's absmax: the integer max of the |x| patterns (a NaN pattern is above all others).
MUPOPT_VBMI_INLINE float block_absmax(const float* q, int n) {
  const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i mx = _mm512_setzero_si512();
  for (int k = 0; k < n; k += 16) {
    const __mmask16 live = static_cast<__mmask16>(live_mask(n - k));
    mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_maskz_loadu_epi32(live, q + k), abs_bits));
  }
  return bits_float(static_cast<uint32_t>(_mm512_reduce_max_epu32(mx)));
}

// code = rank + (y > mid[rank]) for 64 values y[0..3] (m live), rank given in order and in
// lookup64's order (lane_order).
MUPOPT_VBMI_INLINE void store_codes(const QuantTable& t, __m512i rank, __m512i rank_lanes, const __m512* y,
                                    uint8_t* codes, int m) {
  __m512 mid[4];
  lookup64(t.mid_planes, rank_lanes, mid);
  __mmask16 up[4];
  for (int h = 0; h < 4; ++h) up[h] = _mm512_cmp_ps_mask(y[h], mid[h], _CMP_GT_OQ);
  const __mmask64 up64 = _mm512_kunpackd(_mm512_kunpackw(up[3], up[2]), _mm512_kunpackw(up[1], up[0]));
  const __m512i code = _mm512_mask_add_epi8(rank, up64, rank, _mm512_set1_epi8(1));
  if (m >= 64) {
    _mm512_storeu_si512(codes, code);
  } else {
    _mm512_mask_storeu_epi8(codes, live_mask(m), code);
  }
}

// Encode with the rank lines, n values of a block (kFull: n = kQuantBlock), y = x / div; the
// values are read as 0 past ``loaded`` (kFull: n).
// Two passes over the block, so that the out-of-order core overlaps the 16 chains of division,
// lines and packs (about 40 cycles each) and then the 4 midpoint lookups: one pass per 64
// values ran at 0.58 ns per value (one thread, L2, under load), little faster than the search.
template <bool kSigned, bool kFull>
MUPOPT_VBMI_INLINE void encode_lines_pass(const float* q, uint8_t* codes, float div, const RankLines& L,
                                          const QuantTable& t, int n, int loaded) {
  const __m512 d = _mm512_set1_ps(div);
  alignas(64) float ys[kQuantBlock];
  __m512i lanes[kQuantBlock / 64];
  for (int g = 0; g < kQuantBlock / 64; ++g) {
    __m512i c[4];
    for (int h = 0; h < 4; ++h) {
      const int k = 64 * g + 16 * h;
      const __m512 x = kFull ? _mm512_loadu_ps(q + k)
                             : _mm512_maskz_loadu_ps(static_cast<__mmask16>(live_mask(loaded - k)), q + k);
      const __m512 y = _mm512_div_ps(x, d);
      _mm512_store_ps(ys + k, y);
      c[h] = line_candidate<kSigned>(y, L);
    }
    // candidates in [0, 255]: the packs (per 128-bit lane) leave byte 16L + 4r + j = value
    // 16r + 4L + j, lookup64's order
    lanes[g] = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
  }
  // lane_order is its own inverse (it swaps the 128-bit lane and the group of 4): in order
  const __m512i order = _mm512_load_si512(kIdx.lane_order);
  for (int g = 0; g < kQuantBlock / 64; ++g) {
    if (!kFull && 64 * g >= n) break;
    __m512 y[4];
    for (int h = 0; h < 4; ++h) y[h] = _mm512_load_ps(ys + 64 * g + 16 * h);
    store_codes(t, _mm512_permutexvar_epi8(order, lanes[g]), lanes[g], y, codes + 64 * g, kFull ? 64 : n - 64 * g);
  }
}

// A block with absmax amax: y = x / amax, or 0 where amax is not > 0 (0 or NaN; then the values
// are read as 0 and divided by 1).
template <bool kSigned>
MUPOPT_VBMI_INLINE void encode_lines(const float* q, uint8_t* codes, float amax, const QuantTable& t, int n) {
  const RankLines L(t.lines);
  if (amax > 0.0f && n == kQuantBlock) {
    encode_lines_pass<kSigned, true>(q, codes, amax, L, t, n, n);
  } else {
    encode_lines_pass<kSigned, false>(q, codes, amax > 0.0f ? amax : 1.0f, L, t, n, amax > 0.0f ? n : 0);
  }
}

// Encode with the rank search (maps without rank lines).
MUPOPT_VBMI_INLINE void encode_search(const float* q, uint8_t* codes, float amax, const QuantTable& t, int n) {
  const bool pos = amax > 0.0f;  // else (0 or NaN) every y is 0
  const __m512 div = _mm512_set1_ps(amax);
  const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i order = _mm512_load_si512(kIdx.lane_order);
  const __m512i low_bytes = _mm512_load_si512(kIdx.low_bytes);
  const __m512i high_words = _mm512_load_si512(kIdx.high_words);
  // Pass 1: y and the 16-bit keys of the whole block (lanes past n: 0, their codes not stored).
  alignas(64) float ys[kQuantBlock];
  __m512i keys[kRankVectors];
  for (int g = 0; g < kRankVectors; ++g) {
    __m512i key[2];
    for (int h = 0; h < 2; ++h) {
      const int k = 32 * g + 16 * h;
      const __m512 x = _mm512_maskz_loadu_ps(static_cast<__mmask16>(live_mask(n - k)), q + k);
      const __m512 y = pos ? _mm512_div_ps(x, div) : _mm512_setzero_ps();
      _mm512_store_ps(ys + k, y);
      // The order-preserving key, NaN as positive (the top code)
      __m512i u = _mm512_castps_si512(y);
      u = _mm512_mask_and_epi32(u, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), u, abs_bits);
      key[h] = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
    }
    keys[g] = _mm512_permutex2var_epi16(key[0], high_words, key[1]);
  }
  // Pass 2: the ranks, all chains together.
  __m512i r[kRankVectors];
  rank_block(keys, r, t.pivots);
  // Pass 3: code = rank + (y > mid[rank]), 64 at a time.
  for (int k = 0; k < n; k += 64) {
    const __m512i rank = _mm512_permutex2var_epi8(r[k / 32], low_bytes, r[k / 32 + 1]);  // 64 bytes
    __m512 y[4];
    for (int h = 0; h < 4; ++h) y[h] = _mm512_load_ps(ys + k + 16 * h);
    store_codes(t, rank, _mm512_permutexvar_epi8(order, rank), y, codes + k, n - k);
  }
}

MUPOPT_TARGET_VBMI __attribute__((noinline)) inline void encode(const float* q, uint8_t* codes, float* absmax,
                                                                 const QuantTable& t, int n) {
  const float amax = block_absmax(q, n);
  *absmax = amax;
  if (t.lines == nullptr) {
    encode_search(q, codes, amax, t, n);
  } else if (float_bits(t.lines[129]) != 0) {  // signed (ops.py's _rank_lines)
    encode_lines<true>(q, codes, amax, t, n);
  } else {
    encode_lines<false>(q, codes, amax, t, n);
  }
}

}  // namespace q8v

// The codec policy of cpu_span (multi_tensor.h) for the VBMI copy: float32 values here, float64
// ones (float64 params) through Q8Scalar.
struct Q8Vbmi {
  template <class T>
  static MUPOPT_FORCE_INLINE void decode(const uint8_t* codes, float amax, const QuantTable& t, T* q, int n) {
    if constexpr (std::is_same<T, float>::value) {
      q8v::decode(codes, amax, t, q, n);
    } else {
      Q8Scalar::decode(codes, amax, t, q, n);
    }
  }
  template <class T>
  static MUPOPT_FORCE_INLINE void encode(const T* q, uint8_t* codes, float* absmax, const QuantTable& t, int n) {
    if constexpr (std::is_same<T, float>::value) {
      q8v::encode(q, codes, absmax, t, n);
    } else {
      Q8Scalar::encode(q, codes, absmax, t, n);
    }
  }
};

}  // namespace cpu
}  // namespace mupopt
