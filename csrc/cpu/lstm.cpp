// Fused LSTM layer on the CPU: one direction of one layer over a whole sequence.
//
// Forward: the input projection of all T steps is one GEMM into `gates`; each step then adds the
// recurrent GEMM into its slice of `gates` and runs one fused pointwise pass that activates the
// gates in place and writes the new cell and hidden state. `gates` (activated) and `cells` are all
// that backward needs; tanh(c) is recomputed there.
// Backward: one reverse sweep of pointwise pass + recurrent GEMM per step that fills `dgates`;
// then the gradients of input, w_ih, w_hh and the bias are one GEMM (or reduction) each.
//
// Packed sequences: `batch_sizes[t]` rows are active at step t (a non-increasing prefix of the
// batch, as in torch's PackedSequence). Inactive rows keep their state, so the final state of each
// sequence is the state after its own last step in either direction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/lstm_rows.h"
#include "cpu/recent_blocks.h"
#include "cpu/settings.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

// ---- pointwise kernels over one row (one sequence of the batch) -------------------------------

// Rows per parallel chunk: enough work per thread to pay for the fork.
// Where the fused path wins over per-step library GEMMs (bench/tune_lstm_path.py on 2-core
// AVX-512 machines): on an Intel Xeon (MKL GEMMs) whenever w_hh fits in about 1 MiB (H <= 256,
// every batch tried up to 64), and for larger H only while the batch is tiny; beyond that MKL's
// blocking of the big recurrent GEMM beats our register tiles streaming a weight that no longer
// fits in cache. On an AMD EPYC (oneDNN GEMMs, csrc/cpu/gemm.h) the fused path won at every
// size tried up to batch x hidden = 32768 (H=512: 1.39x at N=32, 1.20x at N=64; H=1024: 1.44x at
// N=32), and beyond that the two traded places within the noise (H=512 N=128: 0.88x; H=1024
// N=128: 1.13x); other non-Intel x86 processors take the AMD limit.
// Both paths re-lay w_hh once per call, which only pays off over several steps: a short call
// (generation feeds one token at a time) takes the GEMM path on the plain view (measured at T=1:
// equal at H=64, 1.5x faster at H=128, 3x at H=256, 4.6x at H=512).
constexpr int64_t kFusedMaxWeightBytes = int64_t(1) << 20;
constexpr int64_t kFusedMaxBatchTimesHidden = 2048;
constexpr int64_t kFusedMaxBatchTimesHiddenNonIntel = 32768;
constexpr int64_t kMinStepsToRelayout = 8;

inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)); }

// ---- argument checks (the Python layer validates first; these guard the raw pointers) ---------

struct Dims {
  int64_t T, N, I, H, P;
};

Dims check_layer_args(const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                      const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                      const std::optional<Tensor>& batch_sizes) {
  TORCH_CHECK(input.dim() == 3, "lstm: input must be [T,N,I], got ", input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, "lstm: w_ih must be [4H,I], got ",
              w_ih.sizes());
  Dims d{input.size(0), input.size(1), input.size(2), w_ih.size(0) / 4, w_ih.size(0) / 4};
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == d.H, "lstm: w_hr must be [P,", d.H, "], got ",
                w_hr->sizes());
    d.P = w_hr->size(0);
  }
  TORCH_CHECK(d.T >= 1, "lstm: the sequence must have at least one step");
  TORCH_CHECK(w_ih.size(1) == d.I, "lstm: w_ih must be [", 4 * d.H, ",", d.I, "], got ",
              w_ih.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * d.H && w_hh.size(1) == d.P,
              "lstm: w_hh must be [", 4 * d.H, ",", d.P, "], got ", w_hh.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == d.N && h0.size(1) == d.P, "lstm: h0 must be [", d.N,
              ",", d.P, "], got ", h0.sizes());
  TORCH_CHECK(c0.dim() == 2 && c0.size(0) == d.N && c0.size(1) == d.H, "lstm: c0 must be [", d.N,
              ",", d.H, "], got ", c0.sizes());
  for (const Tensor* t : {&h0, &c0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), "lstm: all tensors must have dtype ",
                input.scalar_type(), ", got ", t->scalar_type());
  }
  if (batch_sizes.has_value()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.size(0) == d.T && bs.scalar_type() == at::kLong && bs.is_cpu(),
                "lstm: batch_sizes must be a CPU int64 tensor of shape [", d.T, "]");
    auto acc = bs.contiguous();
    const int64_t* p = acc.data_ptr<int64_t>();
    for (int64_t t = 0; t < d.T; ++t) {
      TORCH_CHECK(p[t] >= 1 && p[t] <= d.N, "lstm: batch_sizes[", t, "]=", p[t],
                  " must be in [1, ", d.N, "]");
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1], "lstm: batch_sizes must be non-increasing");
    }
  }
  return d;
}

std::vector<int64_t> active_rows(const std::optional<Tensor>& batch_sizes, int64_t T, int64_t N) {
  std::vector<int64_t> rows(T, N);
  if (batch_sizes.has_value()) {
    auto bs = batch_sizes->contiguous();
    const int64_t* p = bs.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) rows[t] = p[t];
  }
  return rows;
}

// prev[t] = the state each active row of step t started from: the state written by the step
// processed just before it (if the row was active there) or the initial state.
Tensor previous_states(const Tensor& states, const Tensor& init, const std::vector<int64_t>& rows,
                       bool reverse) {
  const int64_t T = states.size(0);
  Tensor prev = at::zeros_like(states);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t tp = reverse ? t + 1 : t - 1;
    const bool has_prev = tp >= 0 && tp < T;
    const int64_t from_prev = has_prev ? std::min(rows[t], rows[tp]) : 0;
    if (from_prev > 0) prev[t].narrow(0, 0, from_prev).copy_(states[tp].narrow(0, 0, from_prev));
    if (rows[t] > from_prev)
      prev[t].narrow(0, from_prev, rows[t] - from_prev)
          .copy_(init.narrow(0, from_prev, rows[t] - from_prev));
  }
  return prev;
}

// Scratch memory kept across calls on the calling thread (slot: one per concurrent use). The
// fused path's packed weights are rewritten by every call, but fresh pages would be faulted in
// each time, which costs as much as the packing itself for a small LSTM. Requests above 16 MiB
// are not kept: they are allocated into `holder` for this call only. 64-byte aligned.
float* scratch_floats(int slot, int64_t n, Tensor& holder) {
  constexpr int64_t kKeepMax = int64_t(1) << 22;
  constexpr int64_t kAlign = 16;  // floats
  if (n > kKeepMax) {
    holder = at::empty({n}, at::kFloat);
    return holder.data_ptr<float>();
  }
  thread_local std::vector<float> kept[4];
  std::vector<float>& buffer = kept[slot];
  if (static_cast<int64_t>(buffer.size()) < n + kAlign) buffer.resize(n + kAlign);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  const auto aligned = (address + kAlign * sizeof(float) - 1) & ~(kAlign * sizeof(float) - 1);
  return reinterpret_cast<float*>(aligned);
}

// Which path a call takes: the fused small-batch path (csrc/cpu/kernels/lstm.h; float32, no
// projection, H a multiple of the vector width, an instruction set that has it) or per-step ATen
// GEMMs; pyengine.backends.cpu.lstm_path forces one where both apply (benchmarks and tests
// compare them), else the sizes decide.
bool use_fused_path(const Tensor& input, bool has_proj, int64_t T, int64_t N, int64_t H) {
  const int64_t units = kernels().lstm.fused_units;
  if (units == 0 || input.scalar_type() != at::kFloat || has_proj || H % units != 0) return false;
  switch (lstm_path()) {
    case LstmPath::kFused: return true;
    case LstmPath::kGemm: return false;
    default: break;
  }
  if (T < kMinStepsToRelayout) return false;
  const int64_t max_batch_hidden =
      intel_processor() ? kFusedMaxBatchTimesHidden : kFusedMaxBatchTimesHiddenNonIntel;
  return 16 * H * H <= kFusedMaxWeightBytes || N * H <= max_batch_hidden;
}

// The pointwise cell over `count` units of one row, through the kernel table (float32) or its
// float64 entry.
inline void cell_forward(float* g, float* c, float* cell, float* m, int64_t H, int64_t count) {
  kernels().lstm.forward_units_f32(g, c, cell, m, H, count);
}
inline void cell_forward(double* g, double* c, double* cell, double* m, int64_t H, int64_t count) {
  kernels().lstm.forward_units_f64(g, c, cell, m, H, count);
}
inline void cell_backward(const float* act, const float* cell, const float* cprev, const float* dm,
                          float* dc, float* dg, int64_t H, int64_t count) {
  kernels().lstm.backward_units_f32(act, cell, cprev, dm, dc, dg, H, count);
}
inline void cell_backward(const double* act, const double* cell, const double* cprev,
                          const double* dm, double* dc, double* dg, int64_t H, int64_t count) {
  kernels().lstm.backward_units_f64(act, cell, cprev, dm, dc, dg, H, count);
}

// ---- forward ------------------------------------------------------------------------------------

// The recurrence of one layer-direction, shared by the layer op and the embedding-fed op.
// gates: [T,N,4H] input projections in, activated gates out; the bias is already in them, or
// is `tile_bias` ([4H]), which only the fused path takes (added in its first step tile).
// Returns output [T,N,P], h_n [N,P], c_n [N,H], cells [T,N,H].
std::tuple<Tensor, Tensor, Tensor, Tensor> recurrence_forward(
    Tensor& gates, const Tensor& tile_bias, const Tensor& h0_, const Tensor& c0_,
    const Tensor& w_hh_, const std::optional<Tensor>& w_hr_, const std::vector<int64_t>& rows,
    const Dims& d, bool packed, bool fused, bool reverse, const Tensor& table = Tensor(),
    const Tensor& tokens = Tensor()) {
  const auto opts = gates.options();
  Tensor output = recent_empty({d.T, d.N, d.P}, gates.scalar_type());
  Tensor cells = recent_empty({d.T, d.N, d.H}, gates.scalar_type());
  if (packed) {
    output.zero_();
    cells.zero_();
  }
  Tensor h = h0_.contiguous().clone();
  Tensor c = c0_.contiguous().clone();
  const int64_t H = d.H;

  if (fused) {
    Tensor w_hh = w_hh_.contiguous();
    Tensor h0 = h0_.contiguous();
    Tensor holder;
    float* packed = scratch_floats(0, fused_packed_floats(H), holder);
    kernels().lstm.fused_forward(
        w_hh.data_ptr<float>(), tile_bias.defined() ? tile_bias.data_ptr<float>() : nullptr,
        gates.data_ptr<float>(), output.data_ptr<float>(), cells.data_ptr<float>(),
        h0.data_ptr<float>(), h.data_ptr<float>(), c.data_ptr<float>(), rows.data(), d.T, d.N,
        d.H, reverse, table.defined() ? table.data_ptr<float>() : nullptr,
        tokens.defined() ? tokens.data_ptr<int64_t>() : nullptr, packed);
    return {output, h, c, cells};
  }
  TORCH_CHECK(!tile_bias.defined(), "lstm: internal error, bias left for a path without tiles");
  TORCH_CHECK(!table.defined(), "lstm: internal error, table left for a path without tiles");

  Tensor m = w_hr_.has_value() ? at::empty({d.N, d.H}, opts) : Tensor();
  // [P,4H] row-major copy: MKL runs the per-step GEMM ~1.5x faster on it than on the transposed
  // view (measured at N=32, H=512), and the copy is paid once per sequence.
  const bool relayout = d.T >= kMinStepsToRelayout;
  Tensor w_hh_t = relayout ? w_hh_.t().contiguous() : w_hh_.t();
  Tensor w_hr_t = !w_hr_.has_value() ? Tensor() : relayout ? w_hr_->t().contiguous() : w_hr_->t();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_recurrence_forward", [&] {
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t t = reverse ? d.T - 1 - s : s;
      const int64_t B = rows[t];
      Tensor g_t = gates[t].narrow(0, 0, B);
      gemm_accumulate(g_t, h.narrow(0, 0, B), w_hh_t);
      Tensor out_t = output[t].narrow(0, 0, B);
      // Without projection the hidden state is o*tanh(c) itself: write it straight to output.
      Tensor m_t = w_hr_.has_value() ? m.narrow(0, 0, B) : out_t;
      scalar_t* g = g_t.data_ptr<scalar_t>();
      scalar_t* cp = c.data_ptr<scalar_t>();
      scalar_t* cell = cells[t].data_ptr<scalar_t>();
      scalar_t* mp = m_t.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          cell_forward(g + n * 4 * H, cp + n * H, cell + n * H, mp + n * H, H, H);
      });
      if (w_hr_.has_value()) gemm_into(out_t, m_t, w_hr_t);
      h.narrow(0, 0, B).copy_(out_t);
    }
  });
  return {output, h, c, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input_, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse) {
  at::NoGradGuard no_grad;  // the kernel is the derivative; autograd is handled above it
  const Dims d = check_layer_args(input_, h0, c0, w_ih, w_hh, w_hr, batch_sizes);
  const auto rows = active_rows(batch_sizes, d.T, d.N);
  const auto opts = input_.options();
  Tensor input = input_.contiguous();

  Tensor bias;
  if (b_ih.has_value() || b_hh.has_value()) {
    bias = b_ih.has_value() ? *b_ih : at::zeros({4 * d.H}, opts);
    if (b_hh.has_value()) bias = bias + *b_hh;
    TORCH_CHECK(bias.numel() == 4 * d.H, "lstm: biases must have ", 4 * d.H, " elements");
    bias = bias.contiguous();
  }
  const bool fused = use_fused_path(input, w_hr.has_value(), d.T, d.N, d.H);

  // Input projection of every step: gates = x @ w_ih^T + (b_ih + b_hh), one GEMM. The fused
  // path adds the bias in its first step tile instead (saving a pass over gates).
  Tensor gates = recent_empty({d.T, d.N, 4 * d.H}, input.scalar_type());
  Tensor gates2d = gates.view({d.T * d.N, 4 * d.H});
  Tensor x2d = input.view({d.T * d.N, d.I});
  if (bias.defined() && !fused) {
    gemm_bias_into(gates2d, bias, x2d, w_ih.t());
  } else {
    gemm_into(gates2d, x2d, w_ih.t());
  }
  auto [output, h, c, cells] = recurrence_forward(gates, fused ? bias : Tensor(), h0, c0, w_hh, w_hr,
                                                  rows, d, batch_sizes.has_value(), fused, reverse);
  return {output, h, c, gates, cells};
}

// tokens: [T,N] int64  table: [V,4H] (embedding @ w_ih^T + biases)  h0, c0: [N,H]  w_hh: [4H,H]
Dims check_embedding_layer_args(const Tensor& tokens, const Tensor& table, const Tensor& h0,
                                const Tensor& c0, const Tensor& w_hh) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong,
              "embedding_lstm: tokens must be an int64 [T,N] tensor, got ", tokens.scalar_type(),
              " of shape ", tokens.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) % 4 == 0 && table.size(1) > 0,
              "embedding_lstm: table must be [V,4H], got ", table.sizes());
  Dims d{tokens.size(0), tokens.size(1), table.size(1), table.size(1) / 4, table.size(1) / 4};
  TORCH_CHECK(d.T >= 1, "embedding_lstm: the sequence must have at least one step");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * d.H && w_hh.size(1) == d.H,
              "embedding_lstm: w_hh must be [", 4 * d.H, ",", d.H, "], got ", w_hh.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == d.N && h0.size(1) == d.H, "embedding_lstm: h0 must be [",
              d.N, ",", d.H, "], got ", h0.sizes());
  TORCH_CHECK(c0.dim() == 2 && c0.size(0) == d.N && c0.size(1) == d.H, "embedding_lstm: c0 must be [",
              d.N, ",", d.H, "], got ", c0.sizes());
  for (const Tensor* t : {&h0, &c0, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == table.scalar_type(), "embedding_lstm: all tensors must have dtype ",
                table.scalar_type(), ", got ", t->scalar_type());
  }
  if (tokens.numel() > 0) {
    TORCH_CHECK(table.size(0) > 0, "embedding_lstm: the table has no rows for the tokens to index");
    const auto [min, max] = at::aminmax(tokens);
    const int64_t lo = min.item<int64_t>(), hi = max.item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < table.size(0), "embedding_lstm: tokens must be in [0, ",
                table.size(0), "), got values in [", lo, ", ", hi, "]");
  }
  TORCH_CHECK(table.size(0) > 0, "embedding_lstm: table must have at least one row");
  return d;
}

// One layer-direction fed straight from an embedding: the input projection of token v is row v
// of `table` (computed once per vocabulary entry by the caller), so the step's gates start as a
// gather instead of a GEMM over every token.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> embedding_lstm_layer_forward(
    const Tensor& tokens, const Tensor& table, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, bool reverse) {
  at::NoGradGuard no_grad;
  const Dims d = check_embedding_layer_args(tokens, table, h0, c0, w_hh);
  const std::vector<int64_t> rows(d.T, d.N);
  Tensor gates = recent_empty({d.T, d.N, 4 * d.H}, table.scalar_type());
  const bool fused = use_fused_path(table, false, d.T, d.N, d.H);
  // The fused path reads the table rows straight into each step's GEMM; the other gathers
  // them into gates first.
  Tensor table_c = table.contiguous(), tokens_c = tokens.contiguous();
  if (!fused) {
    Tensor gates2d = gates.view({d.T * d.N, 4 * d.H});
    at::index_select_out(gates2d, table_c, 0, tokens_c.reshape({-1}));
  }
  auto [output, h, c, cells] =
      recurrence_forward(gates, Tensor(), h0, c0, w_hh, std::nullopt, rows, d, false, fused,
                         reverse, fused ? table_c : Tensor(), fused ? tokens_c : Tensor());
  return {output, h, c, gates, cells};
}

// ---- backward -----------------------------------------------------------------------------------

// The reverse sweep shared by both ops: dgates [T,N,4H], grad_h0 [N,P], grad_c0 [N,H], the bias
// gradient when `bias_grad` and the fused path summed it (else undefined), and with projection
// dh of every step [T,N,P] (for grad_w_hr).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_backward(
    const Tensor& grad_output_, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& c0,
    const Tensor& w_hh, const std::optional<Tensor>& w_hr, const std::vector<int64_t>& rows,
    const Tensor& gates, const Tensor& cells, const Dims& d, bool packed, bool fused,
    bool reverse, bool bias_grad) {
  const auto opts = gates.options();
  const bool have_grad_out = grad_output_.defined() && grad_output_.numel() > 0;
  Tensor grad_output = have_grad_out ? grad_output_.contiguous() : Tensor();
  Tensor dh = (grad_h_n.defined() && grad_h_n.numel() > 0) ? grad_h_n.contiguous().clone()
                                                           : at::zeros({d.N, d.P}, opts);
  Tensor dc = (grad_c_n.defined() && grad_c_n.numel() > 0) ? grad_c_n.contiguous().clone()
                                                           : at::zeros({d.N, d.H}, opts);
  const int64_t H = d.H;
  Tensor c0_c = c0.contiguous();
  if (fused) {
    // dgates only lives until the caller's gradient GEMMs: scratch memory kept across calls,
    // rather than megabytes of fresh pages faulted in on every backward.
    Tensor dgates_holder, packed_holder, dm_holder;
    Tensor dgates = at::from_blob(scratch_floats(3, d.T * d.N * 4 * d.H, dgates_holder),
                                  {d.T, d.N, 4 * d.H}, opts);
    if (dgates_holder.defined()) dgates = dgates_holder.view({d.T, d.N, 4 * d.H});
    if (packed) dgates.zero_();
    Tensor w_hh_c = w_hh.contiguous();
    Tensor grad_bias = bias_grad ? at::empty({4 * d.H}, opts) : Tensor();
    kernels().lstm.fused_backward(
        w_hh_c.data_ptr<float>(), gates.data_ptr<float>(), cells.data_ptr<float>(),
        c0_c.data_ptr<float>(), have_grad_out ? grad_output.data_ptr<float>() : nullptr,
        dgates.data_ptr<float>(), dh.data_ptr<float>(), dc.data_ptr<float>(), rows.data(), d.T,
        d.N, d.H, reverse, bias_grad ? grad_bias.data_ptr<float>() : nullptr,
        scratch_floats(1, fused_packed_floats(H), packed_holder),
        scratch_floats(2, d.N * d.H, dm_holder));
    return {dgates, dh, dc, grad_bias, Tensor()};
  }
  Tensor dgates = packed ? at::zeros({d.T, d.N, 4 * d.H}, opts)
                         : at::empty({d.T, d.N, 4 * d.H}, opts);
  // With projection: dm = dh @ w_hr per step, and dh of every step is kept for grad_w_hr.
  Tensor dm = w_hr.has_value() ? at::empty({d.N, d.H}, opts) : Tensor();
  Tensor dh_all = w_hr.has_value() ? at::zeros({d.T, d.N, d.P}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_recurrence_backward", [&] {
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t t = reverse ? s : d.T - 1 - s;
      const int64_t B = rows[t];
      Tensor dh_t = dh.narrow(0, 0, B);
      if (have_grad_out) dh_t.add_(grad_output[t].narrow(0, 0, B));
      Tensor dm_t = dh_t;
      if (w_hr.has_value()) {
        dh_all[t].narrow(0, 0, B).copy_(dh_t);
        dm_t = dm.narrow(0, 0, B);
        gemm_into(dm_t, dh_t, *w_hr);
      }
      const scalar_t* act = gates[t].data_ptr<scalar_t>();
      const scalar_t* cell = cells[t].data_ptr<scalar_t>();
      const scalar_t* cells_p = cells.data_ptr<scalar_t>();
      const scalar_t* c0_p = c0_c.data_ptr<scalar_t>();
      const scalar_t* dmp = dm_t.data_ptr<scalar_t>();
      scalar_t* dcp = dc.data_ptr<scalar_t>();
      scalar_t* dg = dgates[t].data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          cell_backward(act + n * 4 * H, cell + n * H,
                        prev_row(cells_p, c0_p, rows.data(), t, n, d.T, d.N, H, reverse),
                        dmp + n * H, dcp + n * H, dg + n * 4 * H, H, H);
      });
      gemm_into(dh_t, dgates[t].narrow(0, 0, B), w_hh);
    }
  });
  return {dgates, dh, dc, Tensor(), dh_all};
}

// Whether every element of t is zero (one pass; t is a small state tensor).
bool is_all_zero(const Tensor& t) {
  const Tensor c = t.contiguous();
  bool zero = true;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "lstm_is_all_zero", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    zero = std::all_of(p, p + c.numel(), [](scalar_t v) { return v == scalar_t(0); });
  });
  return zero;
}

// grad_w_hh = sum over steps of dgates[t]^T @ h_prev[t].  dgates: [T,N,4H]  output: [T,N,P]
Tensor recurrent_weight_grad(const Tensor& dgates, const Tensor& output, const Tensor& h0,
                             const std::vector<int64_t>& rows, const Dims& d, bool packed,
                             bool reverse) {
  Tensor dg2d = dgates.view({d.T * d.N, 4 * d.H});
  if (packed) {
    Tensor h_prev = previous_states(output, h0.contiguous(), rows, reverse);
    return gemm_new(dg2d.t(), h_prev.view({d.T * d.N, d.P}));
  }
  // Every row is active at every step: h_prev is the output shifted by one step, with h0 at
  // the first step processed. Two GEMMs on views, no copy.
  // A zero h0 (no state passed in, the usual case) adds nothing: its K=N GEMM, which still
  // writes all of grad_w_hh, is skipped.
  const int64_t first = reverse ? d.T - 1 : 0;
  Tensor grad_w_hh = recent_empty({4 * d.H, d.P}, dgates.scalar_type());
  const bool h0_zero = is_all_zero(h0);
  if (d.T == 1 || !h0_zero) gemm_into(grad_w_hh, dgates[first].t(), h0);
  if (d.T > 1) {
    Tensor out2d = output.view({d.T * d.N, d.P});
    const int64_t M = (d.T - 1) * d.N;
    Tensor dg_rest = reverse ? dg2d.narrow(0, 0, M) : dg2d.narrow(0, d.N, M);
    Tensor h_rest = reverse ? out2d.narrow(0, d.N, M) : out2d.narrow(0, 0, M);
    if (h0_zero) {
      gemm_into(grad_w_hh, dg_rest.t(), h_rest);
    } else {
      gemm_accumulate(grad_w_hh, dg_rest.t(), h_rest);
    }
  }
  return grad_w_hh;
}

void check_saved(const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
                 const Tensor& h0, const Tensor& c0, const Tensor& output, const Tensor& gates,
                 const Tensor& cells, const Dims& d) {
  TORCH_CHECK(output.sizes() == at::IntArrayRef({d.T, d.N, d.P}), "lstm backward: output shape");
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({d.T, d.N, 4 * d.H}), "lstm backward: gates shape");
  TORCH_CHECK(cells.sizes() == at::IntArrayRef({d.T, d.N, d.H}), "lstm backward: cells shape");
  TORCH_CHECK(!grad_output.defined() || grad_output.numel() == 0 ||
                  grad_output.sizes() == output.sizes(),
              "lstm backward: grad_output must be [T,N,P]");
  TORCH_CHECK(!grad_h_n.defined() || grad_h_n.numel() == 0 || grad_h_n.sizes() == h0.sizes(),
              "lstm backward: grad_h_n must be [N,P]");
  TORCH_CHECK(!grad_c_n.defined() || grad_c_n.numel() == 0 || grad_c_n.sizes() == c0.sizes(),
              "lstm backward: grad_c_n must be [N,H]");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input_, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes,
    const Tensor& output_, const Tensor& gates_, const Tensor& cells_, bool reverse, bool has_bias,
    bool compute_input_grad) {
  at::NoGradGuard no_grad;
  const Dims d = check_layer_args(input_, h0, c0, w_ih, w_hh, w_hr, batch_sizes);
  check_saved(grad_output, grad_h_n, grad_c_n, h0, c0, output_, gates_, cells_, d);
  const auto rows = active_rows(batch_sizes, d.T, d.N);
  const auto opts = input_.options();
  const bool packed = batch_sizes.has_value();
  const bool fused = use_fused_path(input_, w_hr.has_value(), d.T, d.N, d.H);
  Tensor gates = gates_.contiguous(), cells = cells_.contiguous(), output = output_.contiguous();
  auto [dgates, dh, dc, fused_grad_bias, dh_all] =
      recurrence_backward(grad_output, grad_h_n, grad_c_n, c0, w_hh, w_hr, rows, gates, cells, d,
                          packed, fused, reverse, has_bias);

  // Everything that does not depend on the recurrence: one GEMM (or reduction) each.
  Tensor dg2d = dgates.view({d.T * d.N, 4 * d.H});
  Tensor input = input_.contiguous();
  Tensor grad_input = at::empty({0}, opts);
  if (compute_input_grad) {
    grad_input = recent_empty({d.T, d.N, d.I}, opts.dtype().toScalarType());
    Tensor grad_input2d = grad_input.view({d.T * d.N, d.I});
    gemm_into(grad_input2d, dg2d, w_ih);
  }
  Tensor grad_w_ih = recent_empty({4 * d.H, d.I}, opts.dtype().toScalarType());
  gemm_into(grad_w_ih, dg2d.t(), input.view({d.T * d.N, d.I}));
  Tensor grad_w_hh = recurrent_weight_grad(dgates, output, h0, rows, d, packed, reverse);
  Tensor grad_bias = !has_bias                  ? at::empty({0}, opts)
                     : fused_grad_bias.defined() ? fused_grad_bias
                                                 : dg2d.sum(0);
  Tensor grad_w_hr = at::empty({0}, opts);
  if (w_hr.has_value()) {
    // m = o * tanh(c), recomputed for the rows that were active (zero elsewhere).
    Tensor m_all = gates.narrow(2, 3 * d.H, d.H) * at::tanh(cells);
    if (packed) {
      for (int64_t t = 0; t < d.T; ++t)
        if (rows[t] < d.N) m_all[t].narrow(0, rows[t], d.N - rows[t]).zero_();
    }
    grad_w_hr = gemm_new(dh_all.view({d.T * d.N, d.P}).t(), m_all.reshape({d.T * d.N, d.H}));
  }
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// grad_table [V,G]: row v the sum of the rows of dgates ([R,G], contiguous) whose token
// (tokens: [R] int64, contiguous, each in [0,V)) is v. The threads split the columns, so no
// two write the same element, and each zeroes its own columns just before adding into them
// (ATen's zero-fill plus index_add_ took 3-4x as long at the demo's V=256, G=1024, R=1024).
Tensor table_grad(const Tensor& dgates, const Tensor& tokens, int64_t V) {
  const int64_t R = dgates.size(0), G = dgates.size(1);
  Tensor grad = recent_empty({V, G}, dgates.scalar_type());
  const int64_t* token = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(dgates.scalar_type(), "lstm_table_grad", [&] {
    const scalar_t* src = dgates.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, G, 64, [&](int64_t c0, int64_t c1) {
      const int64_t width = c1 - c0;
      for (int64_t v = 0; v < V; ++v) std::fill_n(out + v * G + c0, width, scalar_t(0));
      for (int64_t r = 0; r < R; ++r) {
        scalar_t* __restrict__ row = out + token[r] * G + c0;
        const scalar_t* __restrict__ in = src + r * G + c0;
        for (int64_t c = 0; c < width; ++c) row[c] += in[c];
      }
    });
  });
  return grad;
}

// Gradients of embedding_lstm_layer_forward: (grad_table [V,4H], grad_h0, grad_c0, grad_w_hh).
// grad_table row v is the sum of dgates over the positions holding token v.
std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_lstm_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& tokens,
    const Tensor& table, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& output_, const Tensor& gates_, const Tensor& cells_, bool reverse) {
  at::NoGradGuard no_grad;
  const Dims d = check_embedding_layer_args(tokens, table, h0, c0, w_hh);
  check_saved(grad_output, grad_h_n, grad_c_n, h0, c0, output_, gates_, cells_, d);
  const std::vector<int64_t> rows(d.T, d.N);
  const bool fused = use_fused_path(table, false, d.T, d.N, d.H);
  Tensor gates = gates_.contiguous(), cells = cells_.contiguous(), output = output_.contiguous();
  auto [dgates, dh, dc, unused_bias, unused_dh_all] =
      recurrence_backward(grad_output, grad_h_n, grad_c_n, c0, w_hh, std::nullopt, rows, gates,
                          cells, d, false, fused, reverse, false);
  Tensor grad_table = table_grad(dgates.view({d.T * d.N, 4 * d.H}), tokens.contiguous(),
                                table.size(0));
  Tensor grad_w_hh = recurrent_weight_grad(dgates, output, h0, rows, d, false, reverse);
  return {grad_table, dh, dc, grad_w_hh};
}

// ---- the whole stack: one call per direction of travel for a plain multi-layer LSTM --------

// Layers in `weights` (per layer w_ih, w_hh and, with has_bias, b_ih, b_hh).
int64_t stack_layers(at::TensorList weights, bool has_bias, const Tensor& h0, const Tensor& c0) {
  const int64_t per = has_bias ? 4 : 2;
  TORCH_CHECK(!weights.empty() && static_cast<int64_t>(weights.size()) % per == 0,
              "lstm_stack: weights must hold ", per, " tensors per layer, got ", weights.size());
  const int64_t L = static_cast<int64_t>(weights.size()) / per;
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == L, "lstm_stack: h0 must be [", L, ",N,H], got ",
              h0.sizes());
  TORCH_CHECK(c0.dim() == 3 && c0.size(0) == L, "lstm_stack: c0 must be [", L, ",N,H], got ",
              c0.sizes());
  return L;
}

std::optional<Tensor> stack_bias(at::TensorList weights, bool has_bias, int64_t layer, int64_t i) {
  if (!has_bias) return std::nullopt;
  return weights[layer * 4 + 2 + i];
}

// Layer after layer, each the layer op above. saved: per layer gates, cells and (all but the
// last) its output, the next layer's input.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_stack_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, at::TensorList weights,
    bool has_bias) {
  at::NoGradGuard no_grad;
  const int64_t L = stack_layers(weights, has_bias, h0, c0), per = has_bias ? 4 : 2;
  std::vector<Tensor> saved, h_n, c_n;
  Tensor x = input;
  for (int64_t l = 0; l < L; ++l) {
    auto [out, h, c, gates, cells] = lstm_layer_forward(
        x, h0[l], c0[l], weights[l * per], weights[l * per + 1], stack_bias(weights, has_bias, l, 0),
        stack_bias(weights, has_bias, l, 1), std::nullopt, std::nullopt, false);
    saved.push_back(gates);
    saved.push_back(cells);
    if (l < L - 1) saved.push_back(out);
    h_n.push_back(h);
    c_n.push_back(c);
    x = out;
  }
  return {x, at::stack(h_n), at::stack(c_n), saved};
}

// Gradients of lstm_stack_forward; grad_weights holds per layer grad_w_ih, grad_w_hh and (with
// has_bias) the bias gradient, which is that of b_ih and of b_hh alike.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_stack_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    const Tensor& h0, const Tensor& c0, at::TensorList weights, const Tensor& output,
    at::TensorList saved, bool has_bias, bool compute_input_grad) {
  at::NoGradGuard no_grad;
  const int64_t L = stack_layers(weights, has_bias, h0, c0), per = has_bias ? 4 : 2;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 3 * L - 1, "lstm_stack backward: saved must ",
              "hold ", 3 * L - 1, " tensors, got ", saved.size());
  const bool have_h = grad_h_n.defined() && grad_h_n.numel() > 0;
  const bool have_c = grad_c_n.defined() && grad_c_n.numel() > 0;
  TORCH_CHECK(!have_h || grad_h_n.sizes() == h0.sizes(), "lstm_stack backward: grad_h_n shape");
  TORCH_CHECK(!have_c || grad_c_n.sizes() == c0.sizes(), "lstm_stack backward: grad_c_n shape");
  const Tensor empty = at::empty({0}, input.options());
  std::vector<Tensor> grad_weights(L * (has_bias ? 3 : 2)), grad_h0(L), grad_c0(L);
  Tensor grad = grad_output;
  for (int64_t l = L - 1; l >= 0; --l) {
    const Tensor& layer_input = l == 0 ? input : saved[3 * (l - 1) + 2];
    const Tensor& layer_output = l == L - 1 ? output : saved[3 * l + 2];
    auto [g_in, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr] = lstm_layer_backward(
        grad, have_h ? grad_h_n[l] : empty, have_c ? grad_c_n[l] : empty, layer_input, h0[l], c0[l],
        weights[l * per], weights[l * per + 1], std::nullopt, std::nullopt, layer_output,
        saved[3 * l], saved[3 * l + 1], false, has_bias, l > 0 || compute_input_grad);
    const int64_t out = l * (has_bias ? 3 : 2);
    grad_weights[out] = g_w_ih;
    grad_weights[out + 1] = g_w_hh;
    if (has_bias) grad_weights[out + 2] = g_bias;
    grad_h0[l] = g_h0;
    grad_c0[l] = g_c0;
    grad = g_in;
  }
  return {compute_input_grad ? grad : empty, at::stack(grad_h0), at::stack(grad_c0), grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("lstm_stack_forward", &lstm_stack_forward);
  m.impl("lstm_stack_backward", &lstm_stack_backward);
  m.impl("lstm_layer_forward", &lstm_layer_forward);
  m.impl("lstm_layer_backward", &lstm_layer_backward);
  m.impl("embedding_lstm_layer_forward", &embedding_lstm_layer_forward);
  m.impl("embedding_lstm_layer_backward", &embedding_lstm_layer_backward);
}

}  // namespace cpu
}  // namespace pyengine
