// Int8 LSTM layer on the CPU (inference): one layer, one direction, the whole sequence, with every
// matmul in int8 (csrc/cpu/int8.cpp) and the cell's pointwise step fused in float32.
//
//   gates_x = int8(x[T*N,I] . w_ih^T) + (b_ih + b_hh)       one int8 GEMM for all steps
//   per step t (reverse: t = T-1 .. 0), rows [0, B_t) active:
//     gates  = gates_x[t] + int8(h[B_t,P] . w_hh^T)          int8 GEMM, h quantized per row
//     c, m   = cell(gates, c)                                 fused pointwise (kernels/lstm_cell.h)
//     h      = int8(m . w_hr^T)  (projection)  or  m
//
// With act = 0 (dynamic, W8A8) the rows of x, h and m are quantized on the fly (symmetric, per
// row) and multiplied int8 x int8 with exact int32 accumulation; act = 1 keeps them float and
// dequantizes the weight inside the kernel (weight-only). Rows past B_t (packed sequences) keep
// their state untouched, so h_n / c_n hold each sequence's last step in either direction, and
// their output is 0. Nothing is saved for backward: inference only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/int8.h"
#include "cpu/kernels.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

// A packed int8 weight [N,K]: the three tensors int8_pack_weight / quantize_per_channel give.
struct PackedWeight {
  const int8_t* packed;
  const int32_t* wsum;
  const float* scale;
  int64_t N, K;

  void matmul(const float* x, int64_t M, const float* bias, int64_t act, float* out) const {
    int8_matmul(x, M, K, packed, wsum, scale, bias, N, act, out);
  }
};

PackedWeight packed_weight(const Tensor& packed, const Tensor& wsum, const Tensor& scale,
                           int64_t N, int64_t K, const char* name) {
  check_packed_weight(packed, wsum, scale, N, K, "int8_lstm_layer", name);
  TORCH_CHECK(scale.is_contiguous(), "int8_lstm_layer: ", name, "scale must be contiguous");
  return {packed.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(), scale.data_ptr<float>(), N, K};
}

void check_float(const Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "int8_lstm_layer: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "int8_lstm_layer: ", name, " must be ", dims, "-D, got ", t.dim(),
              "-D");
}

std::tuple<Tensor, Tensor, Tensor> int8_lstm_layer(
    const Tensor& input_, const Tensor& h0, const Tensor& c0, const Tensor& packed_ih,
    const Tensor& wsum_ih, const Tensor& scale_ih, const Tensor& packed_hh, const Tensor& wsum_hh,
    const Tensor& scale_hh, const std::optional<Tensor>& bias_,
    const std::optional<Tensor>& packed_hr, const std::optional<Tensor>& wsum_hr,
    const std::optional<Tensor>& scale_hr, const std::optional<Tensor>& batch_sizes,
    bool reverse, int64_t act) {
  check_float(input_, "input", 3);
  check_float(h0, "h0", 2);
  check_float(c0, "c0", 2);
  TORCH_CHECK(act == 0 || act == 1, "int8_lstm_layer: act must be 0 (dynamic) or 1 (none), got ",
              act);
  const int64_t T = input_.size(0), N = input_.size(1), I = input_.size(2);
  TORCH_CHECK(scale_ih.dim() == 1 && scale_ih.size(0) % 4 == 0,
              "int8_lstm_layer: scale_ih must be [4*hidden_size]");
  const int64_t H = scale_ih.size(0) / 4;
  const bool proj = packed_hr.has_value();
  TORCH_CHECK(proj == wsum_hr.has_value() && proj == scale_hr.has_value(),
              "int8_lstm_layer: packed_hr, wsum_hr and scale_hr must be given together");
  const int64_t P = proj ? scale_hr->size(0) : H;
  TORCH_CHECK(h0.size(0) == N && h0.size(1) == P, "int8_lstm_layer: h0 must be [", N, ", ", P,
              "], got ", h0.sizes());
  TORCH_CHECK(c0.size(0) == N && c0.size(1) == H, "int8_lstm_layer: c0 must be [", N, ", ", H,
              "], got ", c0.sizes());
  const PackedWeight w_ih = packed_weight(packed_ih, wsum_ih, scale_ih, 4 * H, I, "w_ih ");
  const PackedWeight w_hh = packed_weight(packed_hh, wsum_hh, scale_hh, 4 * H, P, "w_hh ");
  PackedWeight w_hr{};
  if (proj) w_hr = packed_weight(*packed_hr, *wsum_hr, *scale_hr, P, H, "w_hr ");
  Tensor bias;
  if (bias_.has_value()) {
    TORCH_CHECK(bias_->scalar_type() == at::kFloat && bias_->dim() == 1 &&
                    bias_->size(0) == 4 * H,
                "int8_lstm_layer: bias must be float32 [", 4 * H, "]");
    bias = bias_->contiguous();
  }
  std::vector<int64_t> rows(T, N);
  if (batch_sizes.has_value()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.size(0) == T && bs.scalar_type() == at::kLong && bs.is_cpu(),
                "int8_lstm_layer: batch_sizes must be a CPU int64 tensor of shape [", T, "]");
    const Tensor acc = bs.contiguous();
    const int64_t* p = acc.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p[t] >= 1 && p[t] <= N, "int8_lstm_layer: batch_sizes[", t, "]=", p[t],
                  " must be in [1, ", N, "]");
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1],
                  "int8_lstm_layer: batch_sizes must be non-increasing");
      rows[t] = p[t];
    }
  }

  const auto opts = input_.options();
  const Tensor input = input_.contiguous();
  Tensor gates = at::empty({T, N, 4 * H}, opts);
  Tensor output = batch_sizes.has_value() ? at::zeros({T, N, P}, opts)
                                          : at::empty({T, N, P}, opts);
  Tensor h = h0.contiguous().clone();
  Tensor c = c0.contiguous().clone();
  if (T == 0 || N == 0) return {output, h, c};

  w_ih.matmul(input.data_ptr<float>(), T * N, bias.defined() ? bias.data_ptr<float>() : nullptr,
              act, gates.data_ptr<float>());
  std::vector<float> recurrent(N * 4 * H);
  std::vector<float> m(proj ? N * H : 0);
  float* hp = h.data_ptr<float>();
  float* cp = c.data_ptr<float>();
  const LstmKernels& cell = kernels().lstm;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t B = rows[t];
    float* g = gates.data_ptr<float>() + t * N * 4 * H;
    float* out = output.data_ptr<float>() + t * N * P;
    w_hh.matmul(hp, B, nullptr, act, recurrent.data());
    // Without projection the hidden state o*tanh(c) goes straight to the output.
    float* mp = proj ? m.data() : out;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / H), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        float* gn = g + n * 4 * H;
        const float* rn = recurrent.data() + n * 4 * H;
        for (int64_t j = 0; j < 4 * H; ++j) gn[j] += rn[j];
        cell.forward_units_f32(gn, cp + n * H, cp + n * H, mp + n * H, H, H);
      }
    });
    if (proj) w_hr.matmul(m.data(), B, nullptr, act, out);
    std::memcpy(hp, out, B * P * sizeof(float));
  }
  return {output, h, c};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("int8_lstm_layer", &int8_lstm_layer); }

}  // namespace cpu
}  // namespace pyengine
