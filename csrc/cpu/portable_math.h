// exp, log and select written as plain, branch-free C++ (integer bit moves, masks,
// polynomials), so a loop that calls them is vectorised by the compiler for whatever instruction
// set the file is built for: no intrinsics, no #ifdef per instruction set. std::exp/std::log are
// calls to libm that GCC and Clang do not vectorise without -ffast-math, which the build does
// not use.
//
// Why `select` and not `c ? a : b`: under the default -ftrapping-math, GCC turns a conditional
// whose arm computes something (or whose arms it sinks a computation into) into a branch, and
// refuses to if-convert a branch holding floating-point arithmetic ("could trap") unless the
// instruction set has masked operations (AVX-512): the loop then stays scalar on AVX2 and SSE.
// A select made of integer masks is never a branch.
//
// float: Cephes-style range reduction and polynomials, about 2 ulp over the float range.
// double: std::exp / std::log (the float64 path is for tests and references, not speed).
// Special values follow libm: exp(-inf) = 0 exactly (and 0 below -87.3, where float would be
// subnormal), exp(NaN) = NaN; log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, log(NaN) = NaN,
// subnormal inputs handled.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Forced inlining: a call left out of line (GCC's inliner gives up in a large function) keeps
// the loop around it scalar.
#if defined(__GNUC__) || defined(__clang__)
#define PYENGINE_INLINE inline __attribute__((always_inline))
#else
#define PYENGINE_INLINE inline
#endif

namespace pyengine {
namespace cpu {
namespace portable {

PYENGINE_INLINE float float_from_bits(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

PYENGINE_INLINE int32_t bits_of(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// c ? a : b, both already computed, without a branch.
PYENGINE_INLINE float select(bool c, float a, float b) {
  const int32_t mask = -static_cast<int32_t>(c);
  return float_from_bits((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

PYENGINE_INLINE double select(bool c, double a, double b) {
  const int64_t mask = -static_cast<int64_t>(c);
  int64_t ia, ib;
  std::memcpy(&ia, &a, sizeof a);
  std::memcpy(&ib, &b, sizeof b);
  const int64_t r = (ia & mask) | (ib & ~mask);
  double out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

PYENGINE_INLINE float exp(float x) {
  constexpr float lo = -87.3365478515625f, hi = 88.3762626647949f;
  float xc = select(x < lo, lo, x);  // comparisons are false for NaN: NaN flows through
  xc = select(xc > hi, hi, xc);
  // n = round(x / ln 2): adding 1.5 * 2^23 rounds to an integer in float arithmetic.
  constexpr float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;  // ln 2 split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = float_from_bits((static_cast<int32_t>(n) + 127) << 23);
  return select(x < lo, 0.0f, p * scale);
}

PYENGINE_INLINE float log(float x) {
  constexpr float min_normal = 1.17549435e-38f;
  const bool tiny = x < min_normal;
  const float xs = select(tiny, x * 8388608.0f, x);  // subnormals scaled by 2^23
  // x = 2^k z with z in [sqrt(1/2), sqrt(2)), split in integer arithmetic
  const int32_t ix = bits_of(xs);
  const int32_t offset = ix - 0x3f3504f3;  // the bits of sqrt(1/2)
  const int32_t k = offset >> 23;
  const float m = float_from_bits(ix - (offset & static_cast<int32_t>(0xff800000u))) - 1.0f;
  const float e = static_cast<float>(k) - select(tiny, 23.0f, 0.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = m + y + e * 0.693359375f;  // ln 2 split in two
  constexpr float inf = std::numeric_limits<float>::infinity();
  r = select(x == 0.0f, -inf, r);
  r = select(x == inf, inf, r);
  r = select(x < 0.0f, std::numeric_limits<float>::quiet_NaN(), r);
  return select(x != x, x, r);  // NaN stays NaN
}

PYENGINE_INLINE double exp(double x) { return std::exp(x); }
PYENGINE_INLINE double log(double x) { return std::log(x); }

}  // namespace portable
}  // namespace cpu
}  // namespace pyengine
