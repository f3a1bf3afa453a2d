// The row passes of the cross-entropy family over float32 rows: a kernel body (csrc/cpu/isa/),
// compiled once per instruction set; entries of CrossEntropyKernels (csrc/cpu/kernels.h). The ops
// around them, and the float64 passes, are csrc/cpu/cross_entropy.cpp.
// Vector lanes accumulate in float (one accumulator per lane, two vectors wide), the tails and
// the baseline in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/kernels/vec_math.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace ce {

#if PYENGINE_HAS_AVX512
using VF = Avx512F32;
#elif PYENGINE_HAS_AVX2
using VF = Avx2F32;
#endif

// max_j x_j; NaN when any x_j is NaN (vector max drops a NaN, so NaN is looked for apart).
inline double row_max(const float* x, int64_t C) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
#if PYENGINE_HAS_AVX2
  if (C >= 2 * VF::W) {
    VF::T m0 = VF::set1(m), m1 = VF::set1(m), unordered = VF::zero();
    for (; j + 2 * VF::W <= C; j += 2 * VF::W) {
      const VF::T x0 = VF::load(x + j), x1 = VF::load(x + j + VF::W);
      m0 = VF::max(m0, x0);
      m1 = VF::max(m1, x1);
      unordered = VF::bit_or(unordered, VF::unordered(x0, x1));
    }
    m = VF::hmax(VF::max(m0, m1));
    nan = VF::any(unordered);
  }
#endif
  for (; j < C; ++j) {
    nan = nan || std::isnan(x[j]);
    m = std::max(m, x[j]);
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : m;
}

#if PYENGINE_HAS_AVX2
template <bool kStore, bool kSmooth, bool kWeighted>
inline void row_sums_vec(const float* x, int64_t C, float m, const float* w, float* e,
                         double* se_out, double* sw_out) {
  const VF::T vm = VF::set1(m);
  VF::T se0 = VF::zero(), se1 = VF::zero(), sw0 = VF::zero(), sw1 = VF::zero();
  int64_t j = 0;
  for (; j + 2 * VF::W <= C; j += 2 * VF::W) {
    const VF::T d0 = VF::sub(VF::load(x + j), vm), d1 = VF::sub(VF::load(x + j + VF::W), vm);
    const VF::T e0 = VF::exp(d0), e1 = VF::exp(d1);
    if (kStore) {
      VF::store(e + j, e0);
      VF::store(e + j + VF::W, e1);
    }
    se0 = VF::add(se0, e0);
    se1 = VF::add(se1, e1);
    if (kSmooth) {
      if (kWeighted) {
        sw0 = VF::fmadd(VF::load(w + j), d0, sw0);
        sw1 = VF::fmadd(VF::load(w + j + VF::W), d1, sw1);
      } else {
        sw0 = VF::add(sw0, d0);
        sw1 = VF::add(sw1, d1);
      }
    }
  }
  double se = VF::hsum(VF::add(se0, se1)), sw = kSmooth ? VF::hsum(VF::add(sw0, sw1)) : 0.0;
  for (; j < C; ++j) {
    const float d = x[j] - m;
    const float ej = std::exp(d);
    if (kStore) e[j] = ej;
    se += ej;
    if (kSmooth) sw += (kWeighted ? static_cast<double>(w[j]) : 1.0) * d;
  }
  *se_out = se;
  *sw_out = sw;
}
#endif

inline void row_sums(const float* x, int64_t C, double m_, const float* w, bool smooth, float* e,
                     double* sumexp, double* wsum) {
#if PYENGINE_HAS_AVX2
  const float m = static_cast<float>(m_);
  if (e) {
    if (!smooth) row_sums_vec<true, false, false>(x, C, m, w, e, sumexp, wsum);
    else if (w) row_sums_vec<true, true, true>(x, C, m, w, e, sumexp, wsum);
    else row_sums_vec<true, true, false>(x, C, m, w, e, sumexp, wsum);
  } else {
    if (!smooth) row_sums_vec<false, false, false>(x, C, m, w, e, sumexp, wsum);
    else if (w) row_sums_vec<false, true, true>(x, C, m, w, e, sumexp, wsum);
    else row_sums_vec<false, true, false>(x, C, m, w, e, sumexp, wsum);
  }
#else
  double se = 0, sw = 0;
  for (int64_t j = 0; j < C; ++j) {
    const double d = static_cast<double>(x[j]) - m_;
    const double ej = std::exp(d);
    if (e) e[j] = static_cast<float>(ej);
    se += ej;
    if (smooth) sw += (w ? static_cast<double>(w[j]) : 1.0) * d;
  }
  *sumexp = se;
  *wsum = sw;
#endif
}

// e_j <- a e_j - b w_j (w_j = 1 without class weights); with b = 0 the w_j term is left out
// altogether, so that a NaN or infinite class weight does not reach the gradient through 0 * w_j.
inline void row_finish(float* e, int64_t C, double a_, double b_, const float* w) {
  if (b_ == 0.0) w = nullptr;
#if PYENGINE_HAS_AVX2
  const float a = static_cast<float>(a_), b = static_cast<float>(b_);
  const VF::T va = VF::set1(a), vb = VF::set1(b);
  int64_t j = 0;
  if (w) {
    for (; j + VF::W <= C; j += VF::W) {
      VF::store(e + j, VF::fnmadd(vb, VF::load(w + j), VF::mul(va, VF::load(e + j))));
    }
  } else {
    for (; j + VF::W <= C; j += VF::W) {
      VF::store(e + j, VF::sub(VF::mul(va, VF::load(e + j)), vb));
    }
  }
  for (; j < C; ++j) e[j] = a * e[j] - b * (w ? w[j] : 1.0f);
#else
  for (int64_t j = 0; j < C; ++j) {
    e[j] = static_cast<float>(a_ * static_cast<double>(e[j]) -
                              b_ * (w ? static_cast<double>(w[j]) : 1.0));
  }
#endif
}

}  // namespace ce

// This instruction set's CrossEntropyKernels.
inline CrossEntropyKernels cross_entropy_kernels() {
  return {&ce::row_max, &ce::row_sums, &ce::row_finish};
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
