// Which state a row of a (possibly packed) sequence starts each step from; shared by the LSTM op
// (csrc/cpu/lstm.cpp) and its fused kernel body (csrc/cpu/kernels/lstm.h).
#pragma once

#include <cstdint>

namespace pyengine {
namespace cpu {

// The state row n starts step t from: written by the step processed just before (if the row was
// active there), else the initial state. states: [steps,N,X]  init: [N,X]  rows: [steps], the
// active rows of each step (a non-increasing prefix of the batch).
template <typename T>
inline const T* prev_row(const T* states, const T* init, const int64_t* rows, int64_t t,
                         int64_t n, int64_t steps, int64_t N, int64_t X, bool reverse) {
  const int64_t tp = reverse ? t + 1 : t - 1;
  if (tp >= 0 && tp < steps && n < rows[tp]) return states + (tp * N + n) * X;
  return init + n * X;
}

}  // namespace cpu
}  // namespace pyengine
