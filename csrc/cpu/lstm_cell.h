// The LSTM cell's pointwise step over one row, shared by the float LSTM (lstm.cpp) and the int8
// LSTM (int8_lstm.cpp): AVX-512 / AVX2 where compiled in, scalar otherwise.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/vec_math.h"

namespace pyengine {
namespace cpu {

// Units [0, count) of one row. Gate q of unit j sits at g[q*H + j] (torch's i,f,g,o blocks).
// g: pre-activations in, activations out.  c: c_{t-1} in, c_t out.  cell: copy of c_t kept for
// backward.  m: o * tanh(c_t).
template <typename T>
inline void forward_units(T* g, T* c, T* cell, T* m, int64_t H, int64_t count) {
  int64_t j = 0;
#if PYENGINE_HAS_AVX512
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 16 <= count; j += 16) {
      __m512 i = sigmoid512(_mm512_loadu_ps(g + j));
      __m512 f = sigmoid512(_mm512_loadu_ps(g + H + j));
      __m512 z = tanh512(_mm512_loadu_ps(g + 2 * H + j));
      __m512 o = sigmoid512(_mm512_loadu_ps(g + 3 * H + j));
      __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(c + j), _mm512_mul_ps(i, z));
      _mm512_storeu_ps(g + j, i);
      _mm512_storeu_ps(g + H + j, f);
      _mm512_storeu_ps(g + 2 * H + j, z);
      _mm512_storeu_ps(g + 3 * H + j, o);
      _mm512_storeu_ps(c + j, cn);
      _mm512_storeu_ps(cell + j, cn);
      _mm512_storeu_ps(m + j, _mm512_mul_ps(o, tanh512(cn)));
    }
  }
#endif
#if PYENGINE_HAS_AVX2
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 8 <= count; j += 8) {
      __m256 i = sigmoid256(_mm256_loadu_ps(g + j));
      __m256 f = sigmoid256(_mm256_loadu_ps(g + H + j));
      __m256 z = tanh256(_mm256_loadu_ps(g + 2 * H + j));
      __m256 o = sigmoid256(_mm256_loadu_ps(g + 3 * H + j));
      __m256 cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(c + j), _mm256_mul_ps(i, z));
      _mm256_storeu_ps(g + j, i);
      _mm256_storeu_ps(g + H + j, f);
      _mm256_storeu_ps(g + 2 * H + j, z);
      _mm256_storeu_ps(g + 3 * H + j, o);
      _mm256_storeu_ps(c + j, cn);
      _mm256_storeu_ps(cell + j, cn);
      _mm256_storeu_ps(m + j, _mm256_mul_ps(o, tanh256(cn)));
    }
  }
#endif
  for (; j < count; ++j) {
    T i = sigmoid(g[j]), f = sigmoid(g[H + j]), z = tanh_(g[2 * H + j]), o = sigmoid(g[3 * H + j]);
    T cn = f * c[j] + i * z;
    g[j] = i;
    g[H + j] = f;
    g[2 * H + j] = z;
    g[3 * H + j] = o;
    c[j] = cn;
    cell[j] = cn;
    m[j] = o * tanh_(cn);
  }
}

}  // namespace cpu
}  // namespace pyengine
