// The int8 matmul of csrc/cpu/int8.cpp on raw pointers, for other CPU kernels (the int8 LSTM).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pyengine {
namespace cpu {

// out[M,N] = dequant(x[M,K] . W^T) + bias: x contiguous float32; (packed, wsum) from
// int8_pack_weight(W int8 [N,K]); scale [N] float32; bias [N] or nullptr; act 0 = dynamic (W8A8),
// 1 = weight-only. Threads itself when the product is large enough. No checks.
void int8_matmul(const float* x, int64_t M, int64_t K, const int8_t* packed, const int32_t* wsum,
                 const float* scale, const float* bias, int64_t N, int64_t act, float* out);

// TORCH_CHECKs that (packed, wsum, scale) is a packed int8 weight of shape [N,K]; messages start
// with "<op>: <name>" (name: e.g. "w_hh " or "").
void check_packed_weight(const at::Tensor& packed, const at::Tensor& wsum, const at::Tensor& scale,
                         int64_t N, int64_t K, const char* op, const char* name);

}  // namespace cpu
}  // namespace pyengine
