// What every mupopt kernel header shares: host/device qualifiers, bf16 storage without
// cuda_bf16.h, the compute type of each storage type, and the arithmetic forms the optimizers
// are written in (fused multiply-add, torch's lerp, NaN-propagating min/max), each for float32
// and float64 arithmetic.
//
// Numerics: the per-element functions reproduce the rounding sequence of the reference
// backends (mupopt/optim/<name>.py), which run ATen's vectorised CPU kernels. On a CPU whose
// ATen capability is AVX2 or AVX512, ATen evaluates `lerp`, `add(alpha)` and `addcmul` with one
// fused multiply-add (checked against torch 2.13 on 100003 random elements: 0 differences with
// the FMA form, 11257 without it for lerp); the DEFAULT capability evaluates a*b + c with two
// roundings. `madd<kFma>` selects either form, so the CPU backend can follow ATen bit for bit.
// CUDA code always uses kFma = true.
//
// Compute type: float32 for float32, bfloat16 and float16 storage; float64 for float64 storage,
// as torch.optim computes in the param's dtype (the reference backends likewise,
// mupopt/optim/_base.py compute_dtype). Every per-element function is a template on it; the
// CUDA kernels instantiate float32 only (the cuda backend refuses float64 tensors).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MUPOPT_HD __host__ __device__
#define MUPOPT_FORCE_INLINE __forceinline__
#else
#define MUPOPT_HD
#if defined(_MSC_VER)
#define MUPOPT_FORCE_INLINE __forceinline
#else
#define MUPOPT_FORCE_INLINE inline __attribute__((always_inline))
#endif
#endif
// Every per-element function is forced inline: the CPU loops compile them into vector code
// under their own target attribute (see csrc/cpu/driver.h), which needs them inlined.
#define MUPOPT_HDI MUPOPT_HD MUPOPT_FORCE_INLINE

namespace mupopt {

// Storage dtypes the kernels read and write (float64: the CPU loops only). The first
// kDTypeCount codes are the dtypes of tensors; the stochastic and compensated codes are param
// formats of a launch only: bfloat16 / float16 storage whose param stream is rounded
// stochastically, or loaded and stored with a compensation (kahan_summation; storage.h), its
// states to nearest.
enum class DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  kBFloat16Stochastic = 4,
  kFloat16Stochastic = 5,
  kBFloat16Compensated = 6,
  kFloat16Compensated = 7,
};
constexpr int kDTypeCount = 4;

// A launch's param format with stochastic rounding on: 16-bit storage changes, float32 and
// float64 stores are exact and stay as they are.
MUPOPT_HD inline DType stochastic_format(DType d) {
  return d == DType::kBFloat16 ? DType::kBFloat16Stochastic : d == DType::kFloat16 ? DType::kFloat16Stochastic : d;
}

// The same with kahan_summation on: 16-bit params get their compensation, float32 and float64
// params have none (their store is exact).
MUPOPT_HD inline DType compensated_format(DType d) {
  return d == DType::kBFloat16 ? DType::kBFloat16Compensated : d == DType::kFloat16 ? DType::kFloat16Compensated : d;
}

// bfloat16 storage: the upper 16 bits of a float32. A plain struct, so host code needs no
// CUDA header and the CPU loops vectorise its conversions as integer shifts.
struct alignas(2) bf16_t {
  uint16_t bits;
};

// IEEE float16 storage (c10::Half's bits), converted with integer and float32 operations only,
// so it needs no CUDA header either and the CPU loops vectorise it.
struct alignas(2) f16_t {
  uint16_t bits;
};

MUPOPT_HDI uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MUPOPT_HDI float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MUPOPT_HDI float to_float(float x) { return x; }
MUPOPT_HDI float to_float(bf16_t x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

// float16 -> float32, exact, without a branch. With h's exponent and mantissa shifted to the
// top of a word (e = bits 27..31, mantissa below them):
//  normal, inf, NaN (e > 0): the same bits moved down to float32's fields are the value times
//    2^(127-15) with float32's bias; adding 224 to the exponent field and scaling by 2^-112
//    gives the float (e = 31 lands on exponent 255: inf and NaN stay inf and NaN);
//  subnormal and zero (e == 0): the mantissa m placed under the exponent of 0.5 is 0.5 + m*2^-24;
//    subtracting 0.5 leaves m*2^-24, the value, exactly.
MUPOPT_HDI float to_float(f16_t x) {
  const uint32_t word = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = word & 0x80000000u;
  const uint32_t body = word << 1;  // exponent and mantissa, sign dropped
  const float normal = bits_float((body >> 4) + (224u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_float((body >> 17) | (126u << 23)) - 0.5f;
  const uint32_t small = 0u - static_cast<uint32_t>(body < (1u << 27));  // all ones when e == 0
  return bits_float(sign | (float_bits(subnormal) & small) | (float_bits(normal) & ~small));
}

// float32 -> storage. bf16: round to nearest even as c10::BFloat16 (NaN -> 0x7FC0), written
// without a branch so the CPU loops stay vectorised.
template <class T>
MUPOPT_HDI T from_float(float x);

template <>
MUPOPT_HDI float from_float<float>(float x) { return x; }

// Raw bytes: the no-math traffic bound of state_bits=8 (csrc/cpu/traffic.cpp) moves its codes as
// numbers; a byte out is the low byte of the value's pattern (defined for any value).
MUPOPT_HDI float to_float(uint8_t x) { return static_cast<float>(x); }
template <>
MUPOPT_HDI uint8_t from_float<uint8_t>(float x) { return static_cast<uint8_t>(float_bits(x)); }

// bf16 round to nearest even as a 32-bit word whose upper half is the result (the lower half is
// not cleared): from_float<bf16_t> keeps the upper half; the CPU pair loop (multi_tensor.h)
// packs two words into one without narrowing to 16-bit lanes.
// NaN found by x != x: one float compare, where the pattern test (u & 0x7FFFFFFF) > 0x7F800000
// takes two vector operations. inf needs no select (low half zero: nothing carries).
MUPOPT_HDI uint32_t bf16_nearest_high(float x) {
  const uint32_t u = float_bits(x);
  return x != x ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
}

template <>
MUPOPT_HDI bf16_t from_float<bf16_t>(float x) {
  bf16_t out;
  out.bits = static_cast<uint16_t>(bf16_nearest_high(x) >> 16);
  return out;
}

// float32 -> float16, round to nearest even as c10::Half (overflow -> inf, NaN -> 0x7E00 with
// the sign kept), without a branch. The rounding is done by one float32 addition: |x|*4 plus
// 2^(E+15), E being x's exponent clamped below at float16's smallest normal exponent -14, has
// the unit in the last place 2^(E-8) = 4 * 2^(E-10), i.e. four times float16's for |x|, so the
// float32 adder rounds |x| to float16's precision, ties to even, subnormals included. The sum's
// exponent field minus 15's bias and its low mantissa bits are then the float16's fields (a
// carry from the mantissa into the exponent is the correct rounding up, and turns a value
// rounding to 2^16 into the inf pattern). |x| >= 2^16 would wrap the 5-bit exponent:
// multiplying by 2^112 first overflows exactly those to inf, and 2^-110 scales back (both
// exact for every other value).
template <>
MUPOPT_HDI f16_t from_float<f16_t>(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t body = u << 1;  // exponent and mantissa, sign dropped
  const float scaled = (fabsf(x) * 0x1.0p+112f) * 0x1.0p-110f;
  // Selects written as masks: GCC 12 does not vectorise these ternaries ("control flow in loop").
  const uint32_t exponent = body & 0xFF000000u;
  const uint32_t low = 0u - static_cast<uint32_t>(exponent < 0x71000000u);  // 0x71 = 113 = 127 - 14
  const uint32_t clamped = (0x71000000u & low) | (exponent & ~low);
  const float rounded = bits_float((clamped >> 1) + (15u << 23)) + scaled;
  const uint32_t r = float_bits(rounded);
  const uint32_t finite = ((r >> 13) & 0x7C00u) + (r & 0x0FFFu);
  const uint32_t nan = 0u - static_cast<uint32_t>(body > 0xFF000000u);
  f16_t out;
  out.bits = static_cast<uint16_t>(((u >> 16) & 0x8000u) | (0x7E00u & nan) | (finite & ~nan));
  return out;
}

// The arithmetic type of a storage type (see the header comment) and the conversions the loops
// use: storage -> compute type on load, compute type -> storage on store (float32 and float64:
// the identity; 16-bit: the conversions above).
template <class S>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <class S>
using compute_t = typename ComputeOf<S>::type;

template <class S>
MUPOPT_HDI compute_t<S> to_compute(S x) {
  if constexpr (std::is_same<S, double>::value) {
    return x;
  } else {
    return to_float(x);
  }
}

template <class S>
MUPOPT_HDI S from_compute(compute_t<S> x) {
  if constexpr (std::is_same<S, double>::value) {
    return x;
  } else {
    return from_float<S>(x);
  }
}

// The unsigned integer of a compute type's width (select_bits' masks).
template <class T>
struct BitsOf;
template <>
struct BitsOf<float> {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};
template <class T>
using bits_t = typename BitsOf<T>::type;

MUPOPT_HDI float sqrt_of(float x) { return sqrtf(x); }
MUPOPT_HDI double sqrt_of(double x) { return sqrt(x); }
MUPOPT_HDI float abs_of(float x) { return fabsf(x); }
MUPOPT_HDI double abs_of(double x) { return fabs(x); }
MUPOPT_HDI float fused_madd(float a, float b, float c) { return fmaf(a, b, c); }
MUPOPT_HDI double fused_madd(double a, double b, double c) { return fma(a, b, c); }

// a*b + c: one rounding (kFma) or two. The two-rounding form relies on the compiler not
// contracting it: the CPU build passes -ffp-contract=off; CUDA code never instantiates it.
template <bool kFma, class T>
MUPOPT_HDI T madd(T a, T b, T c) {
  if constexpr (kFma) {
    return fused_madd(a, b, c);
  } else {
    return a * b + c;
  }
}

// Picks a (mask all ones) or b (mask zero) for a mask fixed per call. Written with integer
// bit operations on the host: GCC 12 does not vectorise `flag ? a : b` on a loop-invariant
// bool (checked with -fopt-info-vec: "relevant stmt not supported" on the select), while the
// bit form vectorises as two ANDs and an OR and is exact for every value, NaN included.
template <class T>
MUPOPT_HDI T select_bits(bits_t<T> mask, T a, T b) {
#if defined(__CUDA_ARCH__)
  return mask ? a : b;
#else
  bits_t<T> ua, ub;
  memcpy(&ua, &a, sizeof ua);
  memcpy(&ub, &b, sizeof ub);
  const bits_t<T> u = (ua & mask) | (ub & ~mask);
  T out;
  memcpy(&out, &u, sizeof out);
  return out;
#endif
}

template <class T>
MUPOPT_HD inline bits_t<T> mask_of(bool flag) {
  return flag ? ~bits_t<T>(0) : bits_t<T>(0);
}

// torch.lerp with a scalar weight w, in ATen's form: start + w*(end-start) for |w| < 0.5, else
// end + (w-1)*(end-start). The choice depends on w only, so it is made once per call.
template <class T>
struct Lerp {
  T coef;
  bits_t<T> start_mask;  // all ones: the start + w*diff form

  static MUPOPT_HD Lerp make(T w) {
    Lerp l;
    const bool from_start = abs_of(w) < T(0.5);
    l.start_mask = mask_of<T>(from_start);
    l.coef = from_start ? w : w - T(1);
    return l;
  }

  template <bool kFma>
  MUPOPT_HDI T apply(T start, T end) const {
    return madd<kFma>(coef, end - start, select_bits(start_mask, start, end));
  }
};

// torch.maximum / torch.minimum / clamp: a NaN in either operand gives NaN.
template <class T>
MUPOPT_HDI T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <class T>
MUPOPT_HDI T min_nan(T a, T b) {
  return (a < b || a != a) ? a : b;
}

// torch.sign: -1, 0 or 1 (0 for NaN, as ATen's (0 < x) - (x < 0)).
template <class T>
MUPOPT_HDI T sign_of(T x) {
  return static_cast<T>((T(0) < x) - (x < T(0)));
}

// An optimizer's hyperparameter record in both compute types, each formed from the float64
// values as the reference forms it for a tensor of that type (a Python float is rounded to
// float32 for a float32 tensor and kept for a float64 one). An Op carries one and each loop
// takes the record of its compute type (get<T>()).
template <template <class> class H>
struct PerCompute {
  H<float> f32;
  H<double> f64;

  template <class T>
  MUPOPT_HDI const H<T>& get() const {
    if constexpr (std::is_same<T, double>::value) {
      return f64;
    } else {
      return f32;
    }
  }
};

}  // namespace mupopt
