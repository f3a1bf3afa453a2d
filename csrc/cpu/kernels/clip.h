// The arithmetic of gradient clipping over one work item (a run of one tensor's elements): a
// kernel body (csrc/cpu/isa/), compiled once per instruction set; entries of ClipKernels
// (csrc/cpu/kernels.h). The multi-tensor passes around them are csrc/cpu/clip.cpp.
// float32 and float64 have AVX-512 paths (float32 sums also an AVX2 path); the rest run scalar
// loops with eight independent accumulators (the elementwise passes are auto-vectorised).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/kernels/vec_math.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace clip {

template <typename T>
inline double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
inline double to_double<double>(double x) {
  return x;
}
template <>
inline double to_double<float>(float x) {
  return static_cast<double>(x);
}

inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(a, b);
}
inline double nan_min(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::min(a, b);
}

// ---- reductions over one item ---------------------------------------------------------------

// Scalar reduction with eight independent accumulators (any dtype, any kind).
template <typename T>
double reduce_scalar(const T* x, int64_t n, NormKind kind, double p) {
  double acc[8];
  const double init = kind == NormKind::kNegInf ? std::numeric_limits<double>::infinity() : 0.0;
  for (double& a : acc) a = init;
  auto step = [&](double& a, double v) {
    switch (kind) {
      case NormKind::kTwo: a += v * v; break;
      case NormKind::kOne: a += std::fabs(v); break;
      case NormKind::kInf: a = nan_max(a, std::fabs(v)); break;
      case NormKind::kNegInf: a = nan_min(a, std::fabs(v)); break;
      case NormKind::kZero: a += (v != 0.0) ? 1.0 : 0.0; break;
      case NormKind::kPow: a += std::pow(std::fabs(v), p); break;
    }
  };
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) step(acc[k], to_double(x[j + k]));
  }
  for (; j < n; ++j) step(acc[j & 7], to_double(x[j]));
  double r = acc[0];
  for (int k = 1; k < 8; ++k) {
    if (kind == NormKind::kInf) r = nan_max(r, acc[k]);
    else if (kind == NormKind::kNegInf) r = nan_min(r, acc[k]);
    else r += acc[k];
  }
  return r;
}

#if PYENGINE_HAS_AVX512
// sum x^2 or sum |x| of float32. Converting every element to float64 costs more than the memory
// stream here, so blocks of 1024 elements accumulate in float32 (64 lanes, 16 terms per lane per
// block: a relative error of a few 1e-8) and each block's lanes are added into float64
// accumulators.
template <bool kSquare>
double reduce_f32_sum(const float* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  auto term = [&](__m512 v) {
    if constexpr (kSquare) return v;
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
  };
  auto widen = [](__m512d acc, __m512 f) {  // acc + the 16 floats of f, in float64
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1));
    return _mm512_add_pd(acc, _mm512_cvtps_pd(hi));
  };
  __m512d d0 = _mm512_setzero_pd(), d1 = d0;
  int64_t j = 0;
  constexpr int64_t kBlock = 1024;
  while (j + 64 <= n) {  // blocks of 1024 (the last one: the remaining multiple of 64)
    const int64_t end = j + std::min(kBlock, (n - j) / 64 * 64);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = j; k < end; k += 64) {
      __m512 v0 = _mm512_loadu_ps(x + k), v1 = _mm512_loadu_ps(x + k + 16);
      __m512 v2 = _mm512_loadu_ps(x + k + 32), v3 = _mm512_loadu_ps(x + k + 48);
      if constexpr (kSquare) {
        a0 = _mm512_fmadd_ps(v0, v0, a0);
        a1 = _mm512_fmadd_ps(v1, v1, a1);
        a2 = _mm512_fmadd_ps(v2, v2, a2);
        a3 = _mm512_fmadd_ps(v3, v3, a3);
      } else {
        a0 = _mm512_add_ps(a0, term(v0));
        a1 = _mm512_add_ps(a1, term(v1));
        a2 = _mm512_add_ps(a2, term(v2));
        a3 = _mm512_add_ps(a3, term(v3));
      }
    }
    d0 = widen(widen(d0, a0), a1);
    d1 = widen(widen(d1, a2), a3);
    j = end;
  }
  double r = _mm512_reduce_add_pd(_mm512_add_pd(d0, d1));
  for (; j < n; ++j) {
    const double v = x[j];
    r += kSquare ? v * v : std::fabs(v);
  }
  return r;
}

template <bool kSquare>
double reduce_f64_sum(const double* x, int64_t n) {
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512d d0 = _mm512_loadu_pd(x + j), d1 = _mm512_loadu_pd(x + j + 8);
    __m512d d2 = _mm512_loadu_pd(x + j + 16), d3 = _mm512_loadu_pd(x + j + 24);
    if constexpr (kSquare) {
      a0 = _mm512_fmadd_pd(d0, d0, a0);
      a1 = _mm512_fmadd_pd(d1, d1, a1);
      a2 = _mm512_fmadd_pd(d2, d2, a2);
      a3 = _mm512_fmadd_pd(d3, d3, a3);
    } else {
      a0 = _mm512_add_pd(a0, _mm512_abs_pd(d0));
      a1 = _mm512_add_pd(a1, _mm512_abs_pd(d1));
      a2 = _mm512_add_pd(a2, _mm512_abs_pd(d2));
      a3 = _mm512_add_pd(a3, _mm512_abs_pd(d3));
    }
  }
  double r = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
  for (; j < n; ++j) r += kSquare ? x[j] * x[j] : std::fabs(x[j]);
  return r;
}

// max |x| of float32 (exact in float32), NaN propagated through an unordered-compare mask.
double reduce_f32_max(const float* x, int64_t n) {
  __m512 m0 = _mm512_setzero_ps(), m1 = m0;
  __mmask16 nan = 0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
    nan |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(x0));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(x1));
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  double r = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  for (; j < n; ++j) r = nan_max(r, std::fabs((double)x[j]));
  return r;
}
#endif

#if PYENGINE_HAS_AVX2 && !PYENGINE_HAS_AVX512
// AVX2 machines: sum x^2 or sum |x| of float32 in float64 lanes, 16 floats per iteration.
template <bool kSquare>
double reduce_f32_sum_avx2(const float* x, int64_t n) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256d d0 = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
    __m256d d1 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4));
    __m256d d2 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 8));
    __m256d d3 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 12));
    if constexpr (kSquare) {
      a0 = _mm256_fmadd_pd(d0, d0, a0);
      a1 = _mm256_fmadd_pd(d1, d1, a1);
      a2 = _mm256_fmadd_pd(d2, d2, a2);
      a3 = _mm256_fmadd_pd(d3, d3, a3);
    } else {
      a0 = _mm256_add_pd(a0, _mm256_andnot_pd(sign, d0));
      a1 = _mm256_add_pd(a1, _mm256_andnot_pd(sign, d1));
      a2 = _mm256_add_pd(a2, _mm256_andnot_pd(sign, d2));
      a3 = _mm256_add_pd(a3, _mm256_andnot_pd(sign, d3));
    }
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  double r = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; j < n; ++j) {
    const double v = x[j];
    r += kSquare ? v * v : std::fabs(v);
  }
  return r;
}
#endif

template <typename T>
double reduce_item(const T* x, int64_t n, NormKind kind, double p) {
#if PYENGINE_HAS_AVX2 && !PYENGINE_HAS_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (kind == NormKind::kTwo) return reduce_f32_sum_avx2<true>(x, n);
    if (kind == NormKind::kOne) return reduce_f32_sum_avx2<false>(x, n);
  }
#endif
#if PYENGINE_HAS_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (kind == NormKind::kTwo) return reduce_f32_sum<true>(x, n);
    if (kind == NormKind::kOne) return reduce_f32_sum<false>(x, n);
    if (kind == NormKind::kInf) return reduce_f32_max(x, n);
  }
  if constexpr (std::is_same_v<T, double>) {
    if (kind == NormKind::kTwo) return reduce_f64_sum<true>(x, n);
    if (kind == NormKind::kOne) return reduce_f64_sum<false>(x, n);
  }
#endif
  return reduce_scalar(x, n, kind, p);
}

// ---- elementwise passes over one item --------------------------------------------------------

template <typename T>
void scale_item(T* x, int64_t n, double coef) {
  if constexpr (std::is_same_v<T, double>) {
    int64_t j = 0;
#if PYENGINE_HAS_AVX512
    const __m512d c = _mm512_set1_pd(coef);
    for (; j + 16 <= n; j += 16) {
      _mm512_storeu_pd(x + j, _mm512_mul_pd(_mm512_loadu_pd(x + j), c));
      _mm512_storeu_pd(x + j + 8, _mm512_mul_pd(_mm512_loadu_pd(x + j + 8), c));
    }
#endif
    for (; j < n; ++j) x[j] *= coef;
  } else {
    const float c = static_cast<float>(coef);
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
#if PYENGINE_HAS_AVX512
      const __m512 cv = _mm512_set1_ps(c);
      for (; j + 32 <= n; j += 32) {
        _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), cv));
        _mm512_storeu_ps(x + j + 16, _mm512_mul_ps(_mm512_loadu_ps(x + j + 16), cv));
      }
#endif
    }
    for (; j < n; ++j) x[j] = static_cast<T>(static_cast<float>(x[j]) * c);
  }
}

template <typename T, typename A>
inline A clamp_one(A v, A lo, A hi) {
  return std::isnan(v) ? v : std::min(std::max(v, lo), hi);
}

template <typename T>
void clamp_item(T* x, int64_t n, double clip) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < n; ++j) x[j] = clamp_one<T, double>(x[j], -clip, clip);
  } else {
    const float hi = static_cast<float>(clip), lo = -hi;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
#if PYENGINE_HAS_AVX512
      // max/min return their second operand when either is NaN: a NaN x passes through.
      const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
      for (; j + 16 <= n; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        _mm512_storeu_ps(x + j, _mm512_min_ps(hiv, _mm512_max_ps(lov, v)));
      }
#endif
    }
    for (; j < n; ++j) x[j] = static_cast<T>(clamp_one<T, float>(static_cast<float>(x[j]), lo, hi));
  }
}

template <typename F>
void on_type(FloatType type, const F& fn) {
  switch (type) {
    case FloatType::kFloat32: fn(float{}); break;
    case FloatType::kFloat64: fn(double{}); break;
    case FloatType::kBFloat16: fn(c10::BFloat16{}); break;
    case FloatType::kFloat16: fn(c10::Half{}); break;
  }
}

inline double reduce(const void* x, int64_t n, FloatType type, NormKind kind, double p) {
  double r = 0;
  on_type(type, [&](auto tag) {
    using T = decltype(tag);
    r = reduce_item(static_cast<const T*>(x), n, kind, p);
  });
  return r;
}

inline void scale(void* x, int64_t n, FloatType type, double coef) {
  on_type(type, [&](auto tag) {
    using T = decltype(tag);
    scale_item(static_cast<T*>(x), n, coef);
  });
}

inline void clamp(void* x, int64_t n, FloatType type, double clip) {
  on_type(type, [&](auto tag) {
    using T = decltype(tag);
    clamp_item(static_cast<T*>(x), n, clip);
  });
}

}  // namespace clip

// This instruction set's ClipKernels.
inline ClipKernels clip_kernels() { return {&clip::reduce, &clip::scale, &clip::clamp}; }

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
