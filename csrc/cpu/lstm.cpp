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

#include <omp.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/lstm_cell.h"
#include "cpu/vec_math.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

// ---- pointwise kernels over one row (one sequence of the batch) -------------------------------

// Rows per parallel chunk: enough work per thread to pay for the fork.
// Where the fused path wins over per-step library GEMMs (bench/tune_lstm_path.py on a 2-core
// AVX-512 machine): whenever w_hh fits in about 1 MiB (H <= 256, every batch tried up to 64), and
// for larger H only while the batch is tiny; beyond that MKL's blocking of the big recurrent GEMM
// beats our register tiles streaming a weight that no longer fits in cache.
// Both paths re-lay w_hh once per call, which only pays off over several steps: a short call
// (generation feeds one token at a time) takes the GEMM path on the plain view (measured at T=1:
// equal at H=64, 1.5x faster at H=128, 3x at H=256, 4.6x at H=512).
constexpr int64_t kFusedMaxWeightBytes = int64_t(1) << 20;
constexpr int64_t kFusedMaxBatchTimesHidden = 2048;
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

// The state a row starts step t from: written by the step processed just before (if the row was
// active there), else the initial state.  states: [T,N,X]  init: [N,X].
template <typename T>
inline const T* prev_row(const T* states, const T* init,
                             const std::vector<int64_t>& rows, int64_t t, int64_t n, int64_t steps,
                             int64_t N, int64_t X, bool reverse) {
  const int64_t tp = reverse ? t + 1 : t - 1;
  if (tp >= 0 && tp < steps && n < rows[tp]) return states + (tp * N + n) * X;
  return init + n * X;
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

// ---- fused small-batch path (float32, AVX2 or AVX-512, no projection, H % kUnits == 0) ---------
//
// For small batches the per-step GEMM is a few microseconds of work, so a library call, a tensor
// view and a thread fork per step cost more than the arithmetic. This path runs the whole time
// loop inside one OpenMP region: each thread owns a contiguous range of unit tiles (kUnits hidden
// units each) and, per step, computes the recurrent GEMM for the four gates of its tiles in
// registers and applies the pointwise update right away; one barrier per step publishes the new
// hidden state. Built with AVX-512 where the build machine has it (twice the FMA width and
// registers), AVX2 otherwise.

#if PYENGINE_HAS_AVX2

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
};
constexpr int kTileRows = 4;  // 4 rows x 4 vectors = 16 accumulators of 32 registers
#else
struct Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
};
constexpr int kTileRows = 3;  // 3 rows x 4 vectors = 12 accumulators of 16 registers
#endif
constexpr int kUnits = Vec::W;  // hidden units per tile: one vector of each gate

// out[r][0 : W*V] = sum_k a[r][k] * b[k*ldb + 0 : W*V] for r < R.  a: R row pointers, each [K].
// b: [K, ldb] row-major.  out: [R, W*V]. The R*V accumulators, R broadcasts and one vector of b
// fit in the register file (no spills).
// noinline: compiled on its own, the tile keeps every accumulator in a register; inlined into the
// big loop body the register allocator spilled them.
template <int R, int V>
__attribute__((noinline)) void gemm_tile(const float* const* a, int64_t K, const float* b, int64_t ldb, float* out) {
  typename Vec::T acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename Vec::T av[R];
    for (int r = 0; r < R; ++r) av[r] = Vec::broadcast(a[r] + k);
    const float* bk = b + k * ldb;
    for (int v = 0; v < V; ++v) {
      const typename Vec::T bv = Vec::load(bk + Vec::W * v);
      for (int r = 0; r < R; ++r) acc[r][v] = Vec::fma(av[r], bv, acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Vec::store(out + (r * V + v) * Vec::W, acc[r][v]);
}

template <int V>
inline void gemm_tile_rows(int R, const float* const* a, int64_t K, const float* b, int64_t ldb,
                           float* out) {
  switch (R) {
#if defined(__AVX512F__)
    case 4: gemm_tile<4, V>(a, K, b, ldb, out); break;
#endif
    case 3: gemm_tile<3, V>(a, K, b, ldb, out); break;
    case 2: gemm_tile<2, V>(a, K, b, ldb, out); break;
    default: gemm_tile<1, V>(a, K, b, ldb, out); break;
  }
}

inline void gemm_tile_any(int R, int V, const float* const* a, int64_t K, const float* b,
                          int64_t ldb, float* out) {
  switch (V) {
    case 4: gemm_tile_rows<4>(R, a, K, b, ldb, out); break;
    case 3: gemm_tile_rows<3>(R, a, K, b, ldb, out); break;
    case 2: gemm_tile_rows<2>(R, a, K, b, ldb, out); break;
    default: gemm_tile_rows<1>(R, a, K, b, ldb, out); break;
  }
}

// Thread `tid` of `nt` owns unit tiles [u0, u1).
inline void tile_range(int64_t tiles, int tid, int nt, int64_t& u0, int64_t& u1) {
  u0 = tiles * tid / nt;
  u1 = tiles * (tid + 1) / nt;
}

// How the threads of the fused path share the work. With enough rows, each thread takes whole
// rows (sequences) and all units: rows never interact, so the time loop needs no barrier and no
// hidden state crosses cores. With few rows (generation, batch 1), threads split the unit tiles
// instead and meet at one barrier per step.
struct Split {
  int threads;
  bool by_rows;
};

inline Split fused_split(int64_t N, int64_t tiles) {
  const int64_t available = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_blocks = (N + kTileRows - 1) / kTileRows;
  if (row_blocks >= 2 && available > 1)
    return {static_cast<int>(std::min(available, row_blocks)), true};
  return {static_cast<int>(std::max<int64_t>(1, std::min(available, tiles))), false};
}

// This thread's unit tiles [u0, u1) and rows [n0, n1) under `split`.
struct Share {
  int64_t u0, u1, n0, n1;
};

inline Share thread_share(const Split& split, int64_t N, int64_t tiles, int tid, int nt) {
  if (split.by_rows) {
    const int64_t blocks = (N + kTileRows - 1) / kTileRows;
    return {0, tiles, std::min(N, blocks * tid / nt * kTileRows),
            std::min(N, blocks * (tid + 1) / nt * kTileRows)};
  }
  int64_t u0, u1;
  tile_range(tiles, tid, nt, u0, u1);
  return {u0, u1, 0, N};
}

// w_hh: [4H,H]  gates: [T,N,4H] input projections in, activated gates out  output: [T,N,H]
// cells: [T,N,H]  h0: [N,H]  h_state: [N,H] final h out  c_state: [N,H] c0 in, final c out.
void fused_forward_f32(const float* w_hh, float* gates, float* output, float* cells,
                       const float* h0, float* h_state, float* c_state,
                       const std::vector<int64_t>& rows, int64_t T, int64_t N, int64_t H,
                       bool reverse) {
  constexpr int W = kUnits;
  const int64_t G = 4 * H, tiles = H / W;
  // w_hh^T packed so the 4 gates of a tile are 4W adjacent columns: wp[k, u*4W + q*W + l]
  // = w_hh[q*H + u*W + l, k]. The threads pack a share of the tiles each.
  Tensor wp_buffer = at::empty({H * G}, at::kFloat);  // every element is written below
  float* wp = wp_buffer.data_ptr<float>();
  const Split split = fused_split(N, tiles);
#pragma omp parallel num_threads(split.threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t p0, p1;
    tile_range(tiles, tid, nt, p0, p1);
    for (int64_t u = p0; u < p1; ++u)
      for (int64_t q = 0; q < 4; ++q) {
        const float* src = w_hh + (q * H + u * W) * H;  // W rows of H
        float* dst = wp + u * 4 * W + q * W;
        for (int64_t k = 0; k < H; ++k)
          for (int l = 0; l < W; ++l) dst[k * G + l] = src[l * H + k];
      }
#pragma omp barrier
    const Share my = thread_share(split, N, tiles, tid, nt);
    alignas(64) float tmp[kTileRows * 4 * W];
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n_end = std::min(my.n1, rows[t]);
      for (int64_t u = my.u0; u < my.u1; ++u) {
        for (int64_t r0 = my.n0; r0 < n_end; r0 += kTileRows) {
          const int R = static_cast<int>(std::min<int64_t>(kTileRows, n_end - r0));
          const float* a[kTileRows];
          for (int r = 0; r < R; ++r)
            a[r] = prev_row(output, h0, rows, t, r0 + r, T, N, H, reverse);
          gemm_tile_any(R, 4, a, H, wp + u * 4 * W, G, tmp);
          for (int r = 0; r < R; ++r) {
            const int64_t row = t * N + r0 + r;
            float* g = gates + row * G + u * W;
            for (int q = 0; q < 4; ++q)
              Vec::store(g + q * H, Vec::add(Vec::load(g + q * H), Vec::load(tmp + (r * 4 + q) * W)));
            float* h = output + row * H + u * W;
            forward_units<float>(g, c_state + (r0 + r) * H + u * W, cells + row * H + u * W, h, H, W);
            Vec::store(h_state + (r0 + r) * H + u * W, Vec::load(h));
          }
        }
      }
      if (!split.by_rows) {
#pragma omp barrier
      }
    }
  }
}

// w_hh: [4H,H]  gates: [T,N,4H] activated  cells: [T,N,H]  c0: [N,H]
// grad_output: [T,N,H] or nullptr  dgates: [T,N,4H] out
// dh_state: [N,H] grad_h_n in, grad_h0 out  dc_state: [N,H] grad_c_n in, grad_c0 out.
void fused_backward_f32(const float* w_hh, const float* gates, const float* cells, const float* c0,
                        const float* grad_output, float* dgates, float* dh_state, float* dc_state,
                        const std::vector<int64_t>& rows, int64_t T, int64_t N, int64_t H,
                        bool reverse) {
  constexpr int W = kUnits;
  const int64_t G = 4 * H, tiles = H / W;
  const Split split = fused_split(N, tiles);
#pragma omp parallel num_threads(split.threads)
  {
    const Share my = thread_share(split, N, tiles, omp_get_thread_num(), omp_get_num_threads());
    alignas(64) float tmp[kTileRows * 4 * W];
    alignas(64) float dm[W];
    // dh_state[my rows active at t, my tiles] = dgates[t][those rows] @ w_hh[:, my tiles]
    auto recurrent_grad = [&](int64_t t) {
      const int64_t n_end = std::min(my.n1, rows[t]);
      for (int64_t u = my.u0; u < my.u1; u += 4) {
        const int V = static_cast<int>(std::min<int64_t>(4, my.u1 - u));
        for (int64_t r0 = my.n0; r0 < n_end; r0 += kTileRows) {
          const int R = static_cast<int>(std::min<int64_t>(kTileRows, n_end - r0));
          const float* a[kTileRows];
          for (int r = 0; r < R; ++r) a[r] = dgates + (t * N + r0 + r) * G;
          gemm_tile_any(R, V, a, G, w_hh + u * W, H, tmp);
          for (int r = 0; r < R; ++r)
            for (int v = 0; v < V; ++v)
              Vec::store(dh_state + (r0 + r) * H + (u + v) * W, Vec::load(tmp + (r * V + v) * W));
        }
      }
    };
    int64_t t_done = -1;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;
      if (t_done >= 0) recurrent_grad(t_done);
      const int64_t n_end = std::min(my.n1, rows[t]);
      for (int64_t n = my.n0; n < n_end; ++n) {
        const int64_t row = t * N + n;
        const float* cprev = prev_row(cells, c0, rows, t, n, T, N, H, reverse);
        for (int64_t u = my.u0; u < my.u1; ++u) {
          typename Vec::T d = Vec::load(dh_state + n * H + u * W);
          if (grad_output) d = Vec::add(d, Vec::load(grad_output + row * H + u * W));
          Vec::store(dm, d);
          backward_units<float>(gates + row * G + u * W, cells + row * H + u * W, cprev + u * W,
                                dm, dc_state + n * H + u * W, dgates + row * G + u * W, H, W);
        }
      }
      t_done = t;
      if (!split.by_rows) {
#pragma omp barrier
      }
    }
    recurrent_grad(t_done);
  }
}

#endif  // PYENGINE_HAS_AVX2

// Which path a call takes: "fused" (above), "gemm" (ATen GEMM per step), or auto by size.
// PYENGINE_LSTM_PATH=fused|gemm forces one (benchmarks and tests compare both).
bool use_fused_path(const Tensor& input, bool has_proj, int64_t T, int64_t N, int64_t H) {
#if PYENGINE_HAS_AVX2
  if (input.scalar_type() != at::kFloat || has_proj || H % kUnits != 0) return false;
  const char* forced = std::getenv("PYENGINE_LSTM_PATH");
  if (forced && std::string(forced) == "fused") return true;
  if (forced && std::string(forced) == "gemm") return false;
  if (T < kMinStepsToRelayout) return false;
  return 16 * H * H <= kFusedMaxWeightBytes || N * H <= kFusedMaxBatchTimesHidden;
#else
  (void)input; (void)has_proj; (void)T; (void)N; (void)H;
  return false;
#endif
}

// ---- forward ------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& batch_sizes, bool reverse) {
  at::NoGradGuard no_grad;  // the kernel is the derivative; autograd is handled above it
  const Dims d = check_layer_args(input_, h0_, c0_, w_ih_, w_hh_, w_hr_, batch_sizes);
  const auto rows = active_rows(batch_sizes, d.T, d.N);
  const bool packed = batch_sizes.has_value();
  const auto opts = input_.options();

  Tensor input = input_.contiguous();

  // Input projection of every step: gates = x @ w_ih^T + (b_ih + b_hh), one GEMM.
  Tensor gates = at::empty({d.T, d.N, 4 * d.H}, opts);
  Tensor gates2d = gates.view({d.T * d.N, 4 * d.H});
  Tensor x2d = input.view({d.T * d.N, d.I});
  if (b_ih.has_value() || b_hh.has_value()) {
    Tensor bias = b_ih.has_value() ? *b_ih : at::zeros({4 * d.H}, opts);
    if (b_hh.has_value()) bias = bias + *b_hh;
    TORCH_CHECK(bias.numel() == 4 * d.H, "lstm: biases must have ", 4 * d.H, " elements");
    at::addmm_out(gates2d, bias, x2d, w_ih_.t());
  } else {
    at::mm_out(gates2d, x2d, w_ih_.t());
  }

  Tensor output = packed ? at::zeros({d.T, d.N, d.P}, opts) : at::empty({d.T, d.N, d.P}, opts);
  Tensor cells = packed ? at::zeros({d.T, d.N, d.H}, opts) : at::empty({d.T, d.N, d.H}, opts);
  Tensor h = h0_.contiguous().clone();
  Tensor c = c0_.contiguous().clone();
  Tensor m = w_hr_.has_value() ? at::empty({d.N, d.H}, opts) : Tensor();
  const int64_t H = d.H;

#if PYENGINE_HAS_AVX2
  if (use_fused_path(input, w_hr_.has_value(), d.T, d.N, d.H)) {
    Tensor w_hh = w_hh_.contiguous();
    Tensor h0 = h0_.contiguous();
    fused_forward_f32(w_hh.data_ptr<float>(), gates.data_ptr<float>(), output.data_ptr<float>(),
                      cells.data_ptr<float>(), h0.data_ptr<float>(), h.data_ptr<float>(),
                      c.data_ptr<float>(), rows, d.T, d.N, d.H, reverse);
    return {output, h, c, gates, cells};
  }
#endif

  // [P,4H] row-major copy: MKL runs the per-step GEMM ~1.5x faster on it than on the transposed
  // view (measured at N=32, H=512), and the copy is paid once per sequence.
  const bool relayout = d.T >= kMinStepsToRelayout;
  Tensor w_hh_t = relayout ? w_hh_.t().contiguous() : w_hh_.t();
  Tensor w_hr_t = !w_hr_.has_value() ? Tensor() : relayout ? w_hr_->t().contiguous() : w_hr_->t();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_forward", [&] {
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t t = reverse ? d.T - 1 - s : s;
      const int64_t B = rows[t];
      Tensor g_t = gates[t].narrow(0, 0, B);
      g_t.addmm_(h.narrow(0, 0, B), w_hh_t);
      Tensor out_t = output[t].narrow(0, 0, B);
      // Without projection the hidden state is o*tanh(c) itself: write it straight to output.
      Tensor m_t = w_hr_.has_value() ? m.narrow(0, 0, B) : out_t;
      scalar_t* g = g_t.data_ptr<scalar_t>();
      scalar_t* cp = c.data_ptr<scalar_t>();
      scalar_t* cell = cells[t].data_ptr<scalar_t>();
      scalar_t* mp = m_t.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          forward_units<scalar_t>(g + n * 4 * H, cp + n * H, cell + n * H, mp + n * H, H, H);
      });
      if (w_hr_.has_value()) at::mm_out(out_t, m_t, w_hr_t);
      h.narrow(0, 0, B).copy_(out_t);
    }
  });
  return {output, h, c, gates, cells};
}

// ---- backward -----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const Tensor& grad_output_, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input_, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes,
    const Tensor& output_, const Tensor& gates_, const Tensor& cells_, bool reverse, bool has_bias,
    bool compute_input_grad) {
  at::NoGradGuard no_grad;
  const Dims d = check_layer_args(input_, h0, c0, w_ih, w_hh, w_hr, batch_sizes);
  const auto rows = active_rows(batch_sizes, d.T, d.N);
  const auto opts = input_.options();
  TORCH_CHECK(output_.sizes() == at::IntArrayRef({d.T, d.N, d.P}), "lstm backward: output shape");
  TORCH_CHECK(gates_.sizes() == at::IntArrayRef({d.T, d.N, 4 * d.H}), "lstm backward: gates shape");
  TORCH_CHECK(cells_.sizes() == at::IntArrayRef({d.T, d.N, d.H}), "lstm backward: cells shape");
  TORCH_CHECK(!grad_output_.defined() || grad_output_.numel() == 0 ||
                  grad_output_.sizes() == output_.sizes(),
              "lstm backward: grad_output must be [T,N,P]");
  TORCH_CHECK(!grad_h_n.defined() || grad_h_n.numel() == 0 || grad_h_n.sizes() == h0.sizes(),
              "lstm backward: grad_h_n must be [N,P]");
  TORCH_CHECK(!grad_c_n.defined() || grad_c_n.numel() == 0 || grad_c_n.sizes() == c0.sizes(),
              "lstm backward: grad_c_n must be [N,H]");

  Tensor gates = gates_.contiguous(), cells = cells_.contiguous(), output = output_.contiguous();
  const bool have_grad_out = grad_output_.defined() && grad_output_.numel() > 0;
  Tensor grad_output = have_grad_out ? grad_output_.contiguous() : Tensor();
  Tensor dh = (grad_h_n.defined() && grad_h_n.numel() > 0) ? grad_h_n.contiguous().clone()
                                                           : at::zeros({d.N, d.P}, opts);
  Tensor dc = (grad_c_n.defined() && grad_c_n.numel() > 0) ? grad_c_n.contiguous().clone()
                                                           : at::zeros({d.N, d.H}, opts);
  Tensor dgates = batch_sizes.has_value() ? at::zeros({d.T, d.N, 4 * d.H}, opts)
                                          : at::empty({d.T, d.N, 4 * d.H}, opts);
  // With projection: dm = dh @ w_hr per step, and dh of every step is kept for grad_w_hr.
  Tensor dm = w_hr.has_value() ? at::empty({d.N, d.H}, opts) : Tensor();
  Tensor dh_all = w_hr.has_value() ? at::zeros({d.T, d.N, d.P}, opts) : Tensor();
  const int64_t H = d.H;
  bool fused = false;
#if PYENGINE_HAS_AVX2
  if (use_fused_path(input_, w_hr.has_value(), d.T, d.N, d.H)) {
    Tensor w_hh_c = w_hh.contiguous(), c0_c = c0.contiguous();
    fused_backward_f32(w_hh_c.data_ptr<float>(), gates.data_ptr<float>(), cells.data_ptr<float>(),
                       c0_c.data_ptr<float>(),
                       have_grad_out ? grad_output.data_ptr<float>() : nullptr,
                       dgates.data_ptr<float>(), dh.data_ptr<float>(), dc.data_ptr<float>(), rows,
                       d.T, d.N, d.H, reverse);
    fused = true;
  }
#endif
  if (!fused) {
  Tensor c0_c = c0.contiguous();

  AT_DISPATCH_FLOATING_TYPES(input_.scalar_type(), "lstm_layer_backward", [&] {
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t t = reverse ? s : d.T - 1 - s;
      const int64_t B = rows[t];
      Tensor dh_t = dh.narrow(0, 0, B);
      if (have_grad_out) dh_t.add_(grad_output[t].narrow(0, 0, B));
      Tensor dm_t = dh_t;
      if (w_hr.has_value()) {
        dh_all[t].narrow(0, 0, B).copy_(dh_t);
        dm_t = dm.narrow(0, 0, B);
        at::mm_out(dm_t, dh_t, *w_hr);
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
          backward_units<scalar_t>(act + n * 4 * H, cell + n * H,
                                   prev_row(cells_p, c0_p, rows, t, n, d.T, d.N, H, reverse),
                                   dmp + n * H,
                                   dcp + n * H, dg + n * 4 * H, H, H);
      });
      at::mm_out(dh_t, dgates[t].narrow(0, 0, B), w_hh);
    }
  });
  }

  // Everything that does not depend on the recurrence: one GEMM (or reduction) each.
  Tensor dg2d = dgates.view({d.T * d.N, 4 * d.H});
  Tensor input = input_.contiguous();
  Tensor grad_input = compute_input_grad ? at::mm(dg2d, w_ih).view({d.T, d.N, d.I})
                                         : at::empty({0}, opts);
  Tensor grad_w_ih = at::mm(dg2d.t(), input.view({d.T * d.N, d.I}));
  Tensor grad_w_hh;
  if (batch_sizes.has_value()) {
    Tensor h_prev = previous_states(output, h0.contiguous(), rows, reverse);
    grad_w_hh = at::mm(dg2d.t(), h_prev.view({d.T * d.N, d.P}));
  } else {
    // Every row is active at every step: h_prev is the output shifted by one step, with h0 at
    // the first step processed. Two GEMMs on views, no copy.
    const int64_t first = reverse ? d.T - 1 : 0;
    grad_w_hh = at::mm(dgates[first].t(), h0);
    if (d.T > 1) {
      Tensor out2d = output.view({d.T * d.N, d.P});
      const int64_t M = (d.T - 1) * d.N;
      Tensor dg_rest = reverse ? dg2d.narrow(0, 0, M) : dg2d.narrow(0, d.N, M);
      Tensor h_rest = reverse ? out2d.narrow(0, d.N, M) : out2d.narrow(0, 0, M);
      grad_w_hh.addmm_(dg_rest.t(), h_rest);
    }
  }
  Tensor grad_bias = has_bias ? dg2d.sum(0) : at::empty({0}, opts);
  Tensor grad_w_hr = at::empty({0}, opts);
  if (w_hr.has_value()) {
    // m = o * tanh(c), recomputed for the rows that were active (zero elsewhere).
    Tensor m_all = gates.narrow(2, 3 * d.H, d.H) * at::tanh(cells);
    if (batch_sizes.has_value()) {
      for (int64_t t = 0; t < d.T; ++t)
        if (rows[t] < d.N) m_all[t].narrow(0, rows[t], d.N - rows[t]).zero_();
    }
    grad_w_hr = at::mm(dh_all.view({d.T * d.N, d.P}).t(), m_all.reshape({d.T * d.N, d.H}));
  }
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward);
  m.impl("lstm_layer_backward", &lstm_layer_backward);
}

}  // namespace cpu
}  // namespace pyengine
