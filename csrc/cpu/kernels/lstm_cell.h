// The LSTM cell's pointwise step over one row, forward and backward, shared by the float LSTM
// (lstm.cpp) and the int8 LSTM (int8_lstm.cpp) through the kernel table (csrc/cpu/kernels.h).
// One body per direction, written against a small vector interface and run 16 floats at a time
// (AVX-512), then 8 (AVX2), then one at a time (any type), so every width computes the same
// formula. A kernel body: compiled once per instruction set (csrc/cpu/isa/).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/kernels/vec_math.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace pointwise {

template <typename S>
struct Scalar {  // one value of any floating type
  using T = S;
  static constexpr int W = 1;
  static T load(const S* p) { return *p; }
  static void store(S* p, T v) { *p = v; }
  static T set1(S v) { return v; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  static T fmadd(T a, T b, T c) { return a * b + c; }
  static T fnmadd(T a, T b, T c) { return c - a * b; }
  static T sig(T x) { return sigmoid(x); }
  static T th(T x) { return tanh_(x); }
};

#if PYENGINE_HAS_AVX2
using Avx2 = Avx2F32;
#endif
#if PYENGINE_HAS_AVX512
using Avx512 = Avx512F32;
#endif

// Units [j, count) in steps of V::W while a whole vector fits; returns where it stopped.
template <typename V, typename S>
inline int64_t forward(S* g, S* c, S* cell, S* m, int64_t H, int64_t j, int64_t count) {
  for (; j + V::W <= count; j += V::W) {
    auto i = V::sig(V::load(g + j)), f = V::sig(V::load(g + H + j));
    auto z = V::th(V::load(g + 2 * H + j)), o = V::sig(V::load(g + 3 * H + j));
    auto cn = V::fmadd(f, V::load(c + j), V::mul(i, z));
    V::store(g + j, i);
    V::store(g + H + j, f);
    V::store(g + 2 * H + j, z);
    V::store(g + 3 * H + j, o);
    V::store(c + j, cn);
    V::store(cell + j, cn);
    V::store(m + j, V::mul(o, V::th(cn)));
  }
  return j;
}

template <typename V, typename S>
inline int64_t backward(const S* act, const S* cell, const S* cprev, const S* dm, S* dc, S* dg,
                        int64_t H, int64_t j, int64_t count) {
  const auto one = V::set1(S(1));
  for (; j + V::W <= count; j += V::W) {
    auto i = V::load(act + j), f = V::load(act + H + j);
    auto z = V::load(act + 2 * H + j), o = V::load(act + 3 * H + j);
    auto tc = V::th(V::load(cell + j));
    auto dmv = V::load(dm + j);
    // dct = dc + dm * o * (1 - tc^2)
    auto dct = V::fmadd(V::mul(dmv, o), V::fnmadd(tc, tc, one), V::load(dc + j));
    V::store(dg + j, V::mul(V::mul(dct, z), V::mul(i, V::sub(one, i))));
    V::store(dg + H + j, V::mul(V::mul(dct, V::load(cprev + j)), V::mul(f, V::sub(one, f))));
    V::store(dg + 2 * H + j, V::mul(V::mul(dct, i), V::fnmadd(z, z, one)));
    V::store(dg + 3 * H + j, V::mul(V::mul(dmv, tc), V::mul(o, V::sub(one, o))));
    V::store(dc + j, V::mul(dct, f));
  }
  return j;
}

}  // namespace pointwise

// Units [0, count) of one row. Gate q of unit j sits at g[q*H + j] (torch's i,f,g,o blocks).
// g: pre-activations in, activations out.  c: c_{t-1} in, c_t out.  cell: copy of c_t kept for
// backward (may be c itself).  m: o * tanh(c_t).
template <typename T>
inline void forward_units(T* g, T* c, T* cell, T* m, int64_t H, int64_t count) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
#if PYENGINE_HAS_AVX512
    j = pointwise::forward<pointwise::Avx512>(g, c, cell, m, H, j, count);
#endif
#if PYENGINE_HAS_AVX2
    j = pointwise::forward<pointwise::Avx2>(g, c, cell, m, H, j, count);
#endif
  }
  pointwise::forward<pointwise::Scalar<T>>(g, c, cell, m, H, j, count);
}

// Units [0, count) of one row, gates at stride H as above. act: activated gates of step t.
// cell: c_t.  cprev: c_{t-1}.  dm: gradient w.r.t. o*tanh(c_t).  dc: gradient w.r.t. c_t in,
// w.r.t. c_{t-1} out.  dg: gradient w.r.t. the pre-activation gates.
template <typename T>
inline void backward_units(const T* act, const T* cell, const T* cprev, const T* dm, T* dc, T* dg,
                           int64_t H, int64_t count) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
#if PYENGINE_HAS_AVX512
    j = pointwise::backward<pointwise::Avx512>(act, cell, cprev, dm, dc, dg, H, j, count);
#endif
#if PYENGINE_HAS_AVX2
    j = pointwise::backward<pointwise::Avx2>(act, cell, cprev, dm, dc, dg, H, j, count);
#endif
  }
  pointwise::backward<pointwise::Scalar<T>>(act, cell, cprev, dm, dc, dg, H, j, count);
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
