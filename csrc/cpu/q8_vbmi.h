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
//    Q8Scalar; then the spec's code "number of midpoints < y" as rank + (y > mid[rank]), where
//    rank = the number of midpoints whose 16-bit key (the top half of the float's
//    order-preserving integer key) is below y's key: a midpoint of a lower key is below y, one
//    of a higher key above it, and at most one midpoint shares y's key (each 2^16 bucket of
//    float32 patterns holds at most one: _lean_states._buckets checks it), the rank-th one, which
//    the one exact float32 comparison settles. mid[] is padded with NaN past the last midpoint
//    (no y compares above it) and the keys with 0xFFFF (above every y's, NaN excepted: NaN takes
//    the top code by the rank, as the spec's NaN rule). The rank is a branch-free binary search
//    over the 255 keys, 32 lanes of 16 bits at a time: 8 steps, each a compare against the pivot
//    key[rank + s - 1] of its step s, read from a table of the pivots of that step by vpermw /
//    vpermt2w (tables of 1 to 128 keys: mupopt/kernels/cpp/ops.py's _vector_tables).
//
// Generic over the map (any 256 ascending values with one midpoint per bucket at most: both
// families of MAP_NAMES, signed and unsigned); tested against the spec's quantize on every
// midpoint and its neighbours (tests/test_lean_states_cpu.py, through q8_codec.cpp and the loops).
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

MUPOPT_TARGET_VBMI __attribute__((noinline)) inline void encode(const float* q, uint8_t* codes, float* absmax,
                                                                 const QuantTable& t, int n) {
  const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i mx = _mm512_setzero_si512();
  for (int k = 0; k < n; k += 16) {
    const __mmask16 live = static_cast<__mmask16>(live_mask(n - k));
    mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_maskz_loadu_epi32(live, q + k), abs_bits));
  }
  const float amax = bits_float(static_cast<uint32_t>(_mm512_reduce_max_epu32(mx)));
  *absmax = amax;
  const bool pos = amax > 0.0f;  // else (0 or NaN) every y is 0
  const __m512 div = _mm512_set1_ps(amax);
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
    __m512 mid[4];
    lookup64(t.mid_planes, _mm512_permutexvar_epi8(order, rank), mid);
    uint64_t up = 0;
    for (int h = 0; h < 4; ++h) {
      up |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_load_ps(ys + k + 16 * h), mid[h], _CMP_GT_OQ))
            << (16 * h);
    }
    const __m512i code = _mm512_mask_add_epi8(rank, up, rank, _mm512_set1_epi8(1));
    _mm512_mask_storeu_epi8(codes + k, live_mask(n - k), code);
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
