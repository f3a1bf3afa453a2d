// Activation functions for the CPU kernels: vector paths for 16 floats (AVX-512) and 8 floats
// (AVX2 + FMA) at a time, and a scalar path (any type, any machine). Included by the kernel
// bodies of one instruction set (PYENGINE_ISA_LEVEL: 0 baseline, 1 AVX2, 2 AVX-512; see
// csrc/cpu/isa/), inside that set's namespace, so each set has its own copy.
// The vector exp is a Cephes-style range reduction plus a degree-6 polynomial, accurate to about
// 2 ulp over the float range; sigmoid and tanh are built on it with a true division, so gradients
// computed from them stay within float tolerance. NaN in gives NaN out, as std::exp, and the ends
// are exact: exp(x) = +inf above log(FLT_MAX) (so exp(+inf) = +inf) and 0 below -87.34 (so
// exp(-inf) = 0). Then sigmoid(-inf) = 0, sigmoid(+inf) = 1 and tanh(+-inf) = +-1 exactly, as in
// torch: a saturated gate's derivative is exactly 0, and 0 * inf gives NaN downstream where
// torch's does (a tiny positive sigmoid(-inf) had turned those NaN into infinities).
#pragma once

#include <cmath>

#ifndef PYENGINE_ISA_LEVEL
#error "vec_math.h is part of a kernel body: include it through csrc/cpu/isa/*.cpp"
#endif

#if PYENGINE_ISA_LEVEL >= 1
#include <immintrin.h>
#define PYENGINE_HAS_AVX2 1
#else
#define PYENGINE_HAS_AVX2 0
#endif

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
inline T tanh_(T x) {
  return std::tanh(x);
}

#if PYENGINE_HAS_AVX2
// Bounds of the vector exp: the polynomial runs on x clamped to [kExpLo, kExpHi]; outside
// [kExpLo, kExpOverflow] the result is 0 or +inf (exp(kExpOverflow) is FLT_MAX).
constexpr float kExpHi = 88.3762626647949f;
constexpr float kExpLo = -87.3365478515625f;
constexpr float kExpOverflow = 88.72283905206835f;

// exp(x): 0 below kExpLo, +inf above kExpOverflow, exp(kExpHi) in between the two top bounds;
// NaN stays NaN (min/max return their second operand when either is NaN, so x goes second, and
// the ordered compares of the fix-up are false for NaN).
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(kExpHi);
  const __m256 lo = _mm256_set1_ps(kExpLo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(kExpOverflow), _CMP_GT_OQ);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(underflow,
                          _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), overflow));
}

inline __m256 sigmoid256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x) = sign(x) * (1 - t) / (1 + t), t = exp(-2|x|): no overflow for any x.
inline __m256 tanh256(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 ax = _mm256_andnot_ps(sign_mask, x);
  __m256 t = exp256(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
  __m256 y = _mm256_div_ps(_mm256_sub_ps(one, t), _mm256_add_ps(one, t));
  return _mm256_or_ps(y, _mm256_and_ps(x, sign_mask));
}
#endif

#if PYENGINE_ISA_LEVEL >= 2
#define PYENGINE_HAS_AVX512 1
// The same functions 16 floats at a time. 2^n is applied with vscalefps, and the divisions are a
// 14-bit reciprocal refined by one Newton step (relative error about 1e-8, below float's ulp).
inline __m512 exp512(__m512 x) {
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpOverflow), _CMP_GT_OQ);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(kExpLo), _mm512_min_ps(_mm512_set1_ps(kExpHi), x));  // NaN kept
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512 y = _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), overflow, _mm512_set1_ps(INFINITY));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), y);
}

// 1/d; 1/inf = 0 exactly (where the Newton step would compute 0 * (2 - inf * 0) = NaN).
inline __m512 reciprocal512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  const __m512 refined = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  return _mm512_mask_mov_ps(refined, _mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_EQ_OQ), r);
}

inline __m512 sigmoid512(__m512 x) {
  return reciprocal512(_mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __m512 tanh512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 ax = _mm512_abs_ps(x);
  __m512 t = exp512(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
  __m512 y = _mm512_mul_ps(_mm512_sub_ps(one, t), reciprocal512(_mm512_add_ps(one, t)));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}
#else
#define PYENGINE_HAS_AVX512 0
#endif

// ---- float vector traits: one interface over the widths, for kernels written once ------------
// T: the register type; W: floats per register. Used by the LSTM cell and tiles (lstm_cell.h,
// lstm.cpp) and by the cross-entropy row passes (cross_entropy.cpp).
#if PYENGINE_HAS_AVX2
struct Avx2F32 {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int kRegisters = 16;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T zero() { return _mm256_setzero_ps(); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T bit_or(T a, T b) { return _mm256_or_ps(a, b); }
  static T unordered(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }  // lanes: a or b NaN
  static bool any(T mask) { return _mm256_movemask_ps(mask) != 0; }
  static T exp(T a) { return exp256(a); }
  static T sig(T x) { return sigmoid256(x); }
  static T th(T x) { return tanh256(x); }
  static float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static float hmax(T a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};
#endif

#if PYENGINE_HAS_AVX512
struct Avx512F32 {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int kRegisters = 32;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static T zero() { return _mm512_setzero_ps(); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T bit_or(T a, T b) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static T unordered(T a, T b) {  // lanes: a or b NaN
    return _mm512_castsi512_ps(_mm512_maskz_set1_epi32(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), -1));
  }
  static bool any(T mask) {
    return _mm512_test_epi32_mask(_mm512_castps_si512(mask), _mm512_castps_si512(mask)) != 0;
  }
  static T exp(T a) { return exp512(a); }
  static T sig(T x) { return sigmoid512(x); }
  static T th(T x) { return tanh512(x); }
  static float hsum(T a) { return _mm512_reduce_add_ps(a); }
  static float hmax(T a) { return _mm512_reduce_max_ps(a); }
};
#endif

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
