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

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/lstm_cell.h"
#include "cpu/recent_blocks.h"
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
// loop inside one OpenMP region. Each step is a small register-tiled GEMM over the thread's share
// of the step (its rows, or its hidden units when the batch is too small to split), followed by
// one pointwise sweep over the same share. Keeping the two apart matters: the gate math is long
// dependency chains (exp, reciprocal), and a sweep over whole rows lets the core overlap many of
// them, where interleaving them one vector at a time with GEMM tiles left it waiting on each.
// Built with AVX-512 where the build machine has it (twice the FMA width and registers), AVX2
// otherwise.

#if PYENGINE_HAS_AVX2

#if defined(__AVX512F__)
using Vec = Avx512F32;
constexpr int kMaxTileRows = 8;
// Vectors per tile row for a tile of R rows: the widest whose R*V accumulators, V weight vectors
// and one broadcast fit the register file (measured best: 4x4, 6x4, 8x3).
constexpr int tile_vectors(int R) { return R <= 6 ? 4 : 3; }
#else
using Vec = Avx2F32;
constexpr int kMaxTileRows = 3;
constexpr int tile_vectors(int) { return 4; }
#endif
constexpr int kUnits = Vec::W;  // hidden units per vector

// out[r][0 : W*V] = (in[r][0 : W*V] + add) + sum_k a[r][k] * b[k*ldb + 0 : W*V] for r < R, or
// without kAccumulate just the sum.  a: R row pointers, each [K].  b: [K, ldb] row-major.
// in, out: R row pointers, each [W*V] (in may be out: the input projection already there).
// add: [W*V] (the bias) or null.
// noinline: compiled on its own, the tile keeps every accumulator in a register; inlined into the
// big loop body the register allocator spilled them.
template <int R, int V, bool kAccumulate>
__attribute__((noinline)) void gemm_tile(const float* const* a, int64_t K, const float* b,
                                         int64_t ldb, const float* const* in, float* const* out,
                                         const float* add) {
  typename Vec::T acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      acc[r][v] = kAccumulate ? Vec::load(in[r] + Vec::W * v) : Vec::zero();
      if (kAccumulate && add) acc[r][v] = Vec::add(acc[r][v], Vec::load(add + Vec::W * v));
    }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    if constexpr (R * V + V + 1 <= Vec::kRegisters) {  // all V weight vectors held at once
      typename Vec::T bv[V];
      for (int v = 0; v < V; ++v) bv[v] = Vec::load(bk + Vec::W * v);
      for (int r = 0; r < R; ++r) {
        const typename Vec::T av = Vec::broadcast(a[r] + k);
        for (int v = 0; v < V; ++v) acc[r][v] = Vec::fmadd(av, bv[v], acc[r][v]);
      }
    } else {  // all R broadcasts held at once
      typename Vec::T av[R];
      for (int r = 0; r < R; ++r) av[r] = Vec::broadcast(a[r] + k);
      for (int v = 0; v < V; ++v) {
        const typename Vec::T bv = Vec::load(bk + Vec::W * v);
        for (int r = 0; r < R; ++r) acc[r][v] = Vec::fmadd(av[r], bv, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Vec::store(out[r] + Vec::W * v, acc[r][v]);
}

template <int R, bool kAccumulate>
inline void gemm_tile_vectors(int V, const float* const* a, int64_t K, const float* b, int64_t ldb,
                              const float* const* in, float* const* out, const float* add) {
  switch (V) {
    case 4: gemm_tile<R, 4, kAccumulate>(a, K, b, ldb, in, out, add); break;
    case 3: gemm_tile<R, 3, kAccumulate>(a, K, b, ldb, in, out, add); break;
    case 2: gemm_tile<R, 2, kAccumulate>(a, K, b, ldb, in, out, add); break;
    default: gemm_tile<R, 1, kAccumulate>(a, K, b, ldb, in, out, add); break;
  }
}

template <bool kAccumulate>
inline void gemm_tile_any(int R, int V, const float* const* a, int64_t K, const float* b,
                          int64_t ldb, const float* const* in, float* const* out,
                          const float* add) {
  switch (R) {
#if defined(__AVX512F__)
    case 8: gemm_tile_vectors<8, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
    case 7: gemm_tile_vectors<7, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
    case 6: gemm_tile_vectors<6, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
    case 5: gemm_tile_vectors<5, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
    case 4: gemm_tile_vectors<4, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
#endif
    case 3: gemm_tile_vectors<3, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
    case 2: gemm_tile_vectors<2, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
    default: gemm_tile_vectors<1, kAccumulate>(V, a, K, b, ldb, in, out, add); break;
  }
}

// The right-hand side of the per-step products is packed once per call into panels: the columns
// [c0, c1) are cut into panels of `panel_vectors` vectors, and the panel starting at column c
// is stored at packed + c*K as [K, its width] row-major. A tile then reads its K x W*V block
// sequentially (one stream the prefetchers follow, no cache-set conflicts), where the plain
// layout put consecutive k a whole weight row apart.

// Width in vectors of the panel starting `left` vectors before the end of its column range:
// V, except that one more than V splits as V-1 and 2 (never a panel of one, which would pay a
// pass over K for one vector of FMAs per row).
inline int panel_vectors(int64_t left, int V) {
  return static_cast<int>(left <= V ? left : left == V + 1 ? V - 1 : V);
}

// dst[k*ld_dst + j] = src[j*ld_src + k] for j, k < 16: one 16x16 block transposed in registers
// (a scalar element-by-element transpose made packing the forward's weights cost 15% of a small
// layer's forward).
#if defined(__AVX512F__)
inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], a[16], b[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  // a[2i], a[2i+1]: rows 2i and 2i+1 interleaved by element, within each 128-bit lane.
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // b[4i+m], lane l: element 4l+m of rows 4i..4i+3.
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(a[4 * i]), a1 = _mm512_castps_pd(a[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(a[4 * i + 2]), a3 = _mm512_castps_pd(a[4 * i + 3]);
    b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  // Element 4l+m of all 16 rows: lane l of b[m], b[4+m], b[8+m], b[12+m].
  for (int m = 0; m < 4; ++m) {
    const __m512 lo0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x44);
    const __m512 lo1 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x44);
    const __m512 hi0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xEE);
    const __m512 hi1 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xEE);
    _mm512_storeu_ps(dst + m * ld_dst, _mm512_shuffle_f32x4(lo0, lo1, 0x88));
    _mm512_storeu_ps(dst + (4 + m) * ld_dst, _mm512_shuffle_f32x4(lo0, lo1, 0xDD));
    _mm512_storeu_ps(dst + (8 + m) * ld_dst, _mm512_shuffle_f32x4(hi0, hi1, 0x88));
    _mm512_storeu_ps(dst + (12 + m) * ld_dst, _mm512_shuffle_f32x4(hi0, hi1, 0xDD));
  }
}
#endif

// Packs columns [c0, c1) of the K x C matrix whose element (k, c) is src[k*sk + c*sc].
// Panels with index % stride == first only, so that threads can share the packing.
void pack_panels(const float* src, int64_t sk, int64_t sc, int64_t K, int64_t c0, int64_t c1,
                 int V, float* packed, int first = 0, int stride = 1) {
  int index = 0;
  for (int64_t c = c0; c < c1; ++index) {
    const int64_t width = Vec::W * panel_vectors((c1 - c) / Vec::W, V);
    if (index % stride == first) {
      float* dst = packed + c * K;
      if (sc == 1) {  // rows of src are rows of the panel
        for (int64_t k = 0; k < K; ++k)
          std::memcpy(dst + k * width, src + k * sk + c, width * sizeof(float));
      } else {  // columns of src are rows of the panel: transpose
        int64_t k = 0;
#if defined(__AVX512F__)
        if (sk == 1) {  // 16x16 blocks (width is a multiple of 16 here)
          for (; k + 16 <= K; k += 16)
            for (int64_t j = 0; j < width; j += 16)
              transpose_16x16(src + k + (c + j) * sc, sc, dst + k * width + j, width);
        }
#endif
        for (int64_t j = 0; j < width; ++j)
          for (int64_t kk = k; kk < K; ++kk) dst[kk * width + j] = src[kk * sk + (c + j) * sc];
      }
    }
    c += width;
  }
}

// out[i][c0:c1] = (with kAccumulate: in[i][c0:c1] + add[c0:c1]) + sum_k a[i][k] * B[k, c0:c1]
// for the `rows` rows given as pointers, B packed by pack_panels with the same V.
// a: [rows] pointers to [K]  in, out: [rows] pointers to rows of at least c1 floats (in null:
// out itself)  add: null, or a row added to every output row.  Panels outside, row blocks
// inside: each panel comes from L2 once and is reused from L1 by every row block.
template <bool kAccumulate>
void small_gemm(const float* const* a, float* const* out, int64_t rows, int64_t K,
                const float* packed, int64_t c0, int64_t c1, int V, const float* add = nullptr,
                const float* const* in = nullptr) {
  float* out_block[kMaxTileRows];
  const float* in_block[kMaxTileRows];
  for (int64_t c = c0; c < c1;) {
    const int v = panel_vectors((c1 - c) / Vec::W, V);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxTileRows) {
      const int R = static_cast<int>(std::min<int64_t>(kMaxTileRows, rows - r0));
      for (int r = 0; r < R; ++r) {
        out_block[r] = out[r0 + r] + c;
        in_block[r] = (in ? in[r0 + r] : out[r0 + r]) + c;
      }
      gemm_tile_any<kAccumulate>(R, v, a + r0, K, packed + c * K, Vec::W * v, in_block,
                                 out_block, add ? add + c : nullptr);
    }
    c += Vec::W * v;
  }
}

// Scratch memory kept across calls on the calling thread (slot: one per concurrent use). The
// packed weights are rewritten by every call, but fresh pages would be faulted in each time,
// which costs as much as the packing itself for a small LSTM. Requests above 16 MiB are not
// kept: they are allocated into `holder` for this call only. 64-byte aligned.
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

// How the threads of the fused path share the work. With enough rows, each thread takes whole
// rows (sequences) and all units: rows never interact, so the time loop needs no barrier and no
// hidden state crosses cores. With few rows (generation, batch 1), threads split the hidden
// units instead and meet at one barrier per step.
constexpr int64_t kMinRowsPerThread = 4;

struct Split {
  int threads;
  bool by_rows;
};

inline Split fused_split(int64_t N, int64_t units) {
  const int64_t available = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_rows = std::min(available, N / kMinRowsPerThread);
  if (by_rows >= 2) return {static_cast<int>(by_rows), true};
  return {static_cast<int>(std::max<int64_t>(1, std::min(available, units))), false};
}

// A thread's hidden units [u0, u1) (in vectors of kUnits) and rows [n0, n1) under a split, and
// the tile width V every thread packs and reads with (from the most rows any thread has, so
// that its tiles fit the registers of every thread's row blocks).
struct Share {
  int64_t u0, u1, n0, n1;
  int V;
};

inline Share thread_share(const Split& split, int64_t N, int64_t units, int tid, int nt) {
  const int64_t most_rows = split.by_rows ? (N + nt - 1) / nt : N;
  const int V = tile_vectors(static_cast<int>(std::min<int64_t>(kMaxTileRows, most_rows)));
  if (split.by_rows) return {0, units, N * tid / nt, N * (tid + 1) / nt, V};
  return {units * tid / nt, units * (tid + 1) / nt, 0, N, V};
}

// The column ranges a thread computes of a [.., 4H] gate row: [u0*W, u1*W) of each gate block,
// or all of [0, 4H) in one range when it owns every unit.
inline int gate_ranges(const Share& my, int64_t H, int64_t (&ranges)[4][2]) {
  const int64_t W = kUnits;
  if (my.u0 == 0 && my.u1 * W == H) {
    ranges[0][0] = 0;
    ranges[0][1] = 4 * H;
    return 1;
  }
  for (int q = 0; q < 4; ++q) {
    ranges[q][0] = q * H + my.u0 * W;
    ranges[q][1] = q * H + my.u1 * W;
  }
  return 4;
}

// w_hh: [4H,H]  bias: [4H] (b_ih + b_hh) or null  gates: [T,N,4H] input projections (without
// the bias) in, activated gates out  output: [T,N,H]  cells: [T,N,H]  h0: [N,H]
// h_state: [N,H] final h out  c_state: [N,H] c0 in, final c out.
// With a table ([V,4H], input projections by token) and tokens ([T,N], each checked in [0,V)),
// the input projection of row n at step t is table[tokens[t,n]], read straight into the step's
// GEMM, and gates is only written.
void fused_forward_f32(const float* w_hh, const float* bias, float* gates, float* output,
                       float* cells,
                       const float* h0, float* h_state, float* c_state,
                       const std::vector<int64_t>& rows, int64_t T, int64_t N, int64_t H,
                       bool reverse, const float* table = nullptr,
                       const int64_t* tokens = nullptr) {
  constexpr int64_t W = kUnits;
  const int64_t G = 4 * H, units = H / W;
  // B = w_hh^T [H, 4H] packed: element (k, c) = w_hh[c*H + k].
  Tensor holder;
  float* packed = scratch_floats(0, H * G, holder);  // every panel read is written below
  const Split split = fused_split(N, units);
#pragma omp parallel num_threads(split.threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const Share my = thread_share(split, N, units, tid, nt);
    int64_t ranges[4][2];
    const int n_ranges = gate_ranges(my, H, ranges);
    if (split.by_rows) {  // every thread reads every panel: pack them together
      pack_panels(w_hh, 1, H, H, 0, G, my.V, packed, tid, nt);
#pragma omp barrier
    } else {  // each thread reads only its own columns' panels
      for (int i = 0; i < n_ranges; ++i)
        pack_panels(w_hh, 1, H, H, ranges[i][0], ranges[i][1], my.V, packed);
    }
    const int64_t u0 = my.u0 * W, count = (my.u1 - my.u0) * W;
    std::vector<const float*> h_prev(my.n1 - my.n0), in_rows(my.n1 - my.n0);
    std::vector<float*> g_rows(my.n1 - my.n0);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n_end = std::min(my.n1, rows[t]), active = std::max<int64_t>(0, n_end - my.n0);
      for (int64_t i = 0; i < active; ++i) {
        h_prev[i] = prev_row(output, h0, rows, t, my.n0 + i, T, N, H, reverse);
        g_rows[i] = gates + (t * N + my.n0 + i) * G;
        in_rows[i] = table ? table + tokens[t * N + my.n0 + i] * G : g_rows[i];
      }
      for (int i = 0; i < n_ranges; ++i)
        small_gemm<true>(h_prev.data(), g_rows.data(), active, H, packed, ranges[i][0],
                         ranges[i][1], my.V, bias, in_rows.data());
      for (int64_t n = my.n0; n < n_end; ++n) {
        const int64_t row = t * N + n;
        float* h = output + row * H + u0;
        forward_units<float>(gates + row * G + u0, c_state + n * H + u0, cells + row * H + u0, h, H,
                             count);
        std::memcpy(h_state + n * H + u0, h, count * sizeof(float));
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
// Returns the bias gradient [4H] (the sum of dgates over steps and rows, taken while they are
// in cache) when `bias_grad` is set, else an undefined tensor.
Tensor fused_backward_f32(const float* w_hh, const float* gates, const float* cells,
                          const float* c0, const float* grad_output, float* dgates,
                          float* dh_state, float* dc_state, const std::vector<int64_t>& rows,
                          int64_t T, int64_t N, int64_t H, bool reverse, bool bias_grad) {
  constexpr int64_t W = kUnits;
  const int64_t G = 4 * H, units = H / W;
  // B = w_hh [4H, H] packed: element (k, c) = w_hh[k*H + c].
  Tensor holder, dm_holder;
  float* packed = scratch_floats(1, G * H, holder);  // every panel read is written below
  float* dm_all = scratch_floats(2, N * H, dm_holder);
  const Split split = fused_split(N, units);
  // One partial bias gradient per thread (its rows, or its columns), summed at the end.
  Tensor bias_partials = bias_grad ? at::zeros({split.threads, G}, at::kFloat) : Tensor();
#pragma omp parallel num_threads(split.threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const Share my = thread_share(split, N, units, tid, nt);
    const int64_t u0 = my.u0 * W, count = (my.u1 - my.u0) * W;
    if (split.by_rows) {
      pack_panels(w_hh, H, 1, G, 0, H, my.V, packed, tid, nt);
#pragma omp barrier
    } else {
      pack_panels(w_hh, H, 1, G, u0, u0 + count, my.V, packed);
    }
    std::vector<const float*> dg_rows(my.n1 - my.n0);
    std::vector<float*> dh_rows(my.n1 - my.n0);
    float* db = bias_grad ? bias_partials.data_ptr<float>() + tid * G : nullptr;
    // dh_state[my rows active at t, my units] = dgates[t][those rows] @ w_hh[:, my units]
    auto recurrent_grad = [&](int64_t t) {
      const int64_t active = std::max<int64_t>(0, std::min(my.n1, rows[t]) - my.n0);
      for (int64_t i = 0; i < active; ++i) {
        dg_rows[i] = dgates + (t * N + my.n0 + i) * G;
        dh_rows[i] = dh_state + (my.n0 + i) * H;
      }
      small_gemm<false>(dg_rows.data(), dh_rows.data(), active, G, packed, u0, u0 + count, my.V);
    };
    int64_t t_done = -1;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;
      if (t_done >= 0) recurrent_grad(t_done);
      const int64_t n_end = std::min(my.n1, rows[t]);
      for (int64_t n = my.n0; n < n_end; ++n) {
        const int64_t row = t * N + n;
        // dm = dh + grad_output: the gradient reaching o * tanh(c) of this step
        float* dm = dm_all + n * H + u0;
        const float* dh = dh_state + n * H + u0;
        const float* d_out = grad_output ? grad_output + row * H + u0 : nullptr;
        for (int64_t j = 0; j < count; j += W) {
          typename Vec::T d = Vec::load(dh + j);
          if (d_out) d = Vec::add(d, Vec::load(d_out + j));
          Vec::store(dm + j, d);
        }
        const float* cprev = prev_row(cells, c0, rows, t, n, T, N, H, reverse);
        float* dg = dgates + row * G + u0;
        backward_units<float>(gates + row * G + u0, cells + row * H + u0, cprev + u0, dm,
                              dc_state + n * H + u0, dg, H, count);
        if (db) {
          for (int64_t q = 0; q < 4; ++q)
            for (int64_t j = 0; j < count; j += W) {
              float* d = db + u0 + q * H + j;
              Vec::store(d, Vec::add(Vec::load(d), Vec::load(dg + q * H + j)));
            }
        }
      }
      t_done = t;
      if (!split.by_rows) {
#pragma omp barrier
      }
    }
    recurrent_grad(t_done);
  }
  if (!bias_grad) return Tensor();
  // The threads' partial sums, added here: a [threads, 4H] reduction is too small for ATen's
  // sum to pay its dispatch.
  Tensor grad_bias = bias_partials[0].clone();
  float* out = grad_bias.data_ptr<float>();
  for (int64_t i = 1; i < split.threads; ++i) {
    const float* partial = bias_partials.data_ptr<float>() + i * G;
    for (int64_t j = 0; j < G; ++j) out[j] += partial[j];
  }
  return grad_bias;
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

#if PYENGINE_HAS_AVX2
  if (fused) {
    Tensor w_hh = w_hh_.contiguous();
    Tensor h0 = h0_.contiguous();
    fused_forward_f32(w_hh.data_ptr<float>(),
                      tile_bias.defined() ? tile_bias.data_ptr<float>() : nullptr,
                      gates.data_ptr<float>(), output.data_ptr<float>(), cells.data_ptr<float>(),
                      h0.data_ptr<float>(), h.data_ptr<float>(), c.data_ptr<float>(), rows, d.T,
                      d.N, d.H, reverse, table.defined() ? table.data_ptr<float>() : nullptr,
                      tokens.defined() ? tokens.data_ptr<int64_t>() : nullptr);
    return {output, h, c, cells};
  }
#endif
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
    at::addmm_out(gates2d, bias, x2d, w_ih.t());
  } else {
    at::mm_out(gates2d, x2d, w_ih.t());
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
#if PYENGINE_HAS_AVX2
  if (fused) {
    // dgates only lives until the caller's gradient GEMMs: scratch memory kept across calls,
    // rather than megabytes of fresh pages faulted in on every backward.
    Tensor dgates_holder;
    Tensor dgates = at::from_blob(scratch_floats(3, d.T * d.N * 4 * d.H, dgates_holder),
                                  {d.T, d.N, 4 * d.H}, opts);
    if (dgates_holder.defined()) dgates = dgates_holder.view({d.T, d.N, 4 * d.H});
    if (packed) dgates.zero_();
    Tensor w_hh_c = w_hh.contiguous();
    Tensor grad_bias = fused_backward_f32(
        w_hh_c.data_ptr<float>(), gates.data_ptr<float>(), cells.data_ptr<float>(),
        c0_c.data_ptr<float>(), have_grad_out ? grad_output.data_ptr<float>() : nullptr,
        dgates.data_ptr<float>(), dh.data_ptr<float>(), dc.data_ptr<float>(), rows, d.T, d.N, d.H,
        reverse, bias_grad);
    return {dgates, dh, dc, grad_bias, Tensor()};
  }
#endif
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
                                   dmp + n * H, dcp + n * H, dg + n * 4 * H, H, H);
      });
      at::mm_out(dh_t, dgates[t].narrow(0, 0, B), w_hh);
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
    return at::mm(dg2d.t(), h_prev.view({d.T * d.N, d.P}));
  }
  // Every row is active at every step: h_prev is the output shifted by one step, with h0 at
  // the first step processed. Two GEMMs on views, no copy.
  // A zero h0 (no state passed in, the usual case) adds nothing: its K=N GEMM, which still
  // writes all of grad_w_hh, is skipped.
  const int64_t first = reverse ? d.T - 1 : 0;
  Tensor grad_w_hh = recent_empty({4 * d.H, d.P}, dgates.scalar_type());
  const bool h0_zero = is_all_zero(h0);
  if (d.T == 1 || !h0_zero) at::mm_out(grad_w_hh, dgates[first].t(), h0);
  if (d.T > 1) {
    Tensor out2d = output.view({d.T * d.N, d.P});
    const int64_t M = (d.T - 1) * d.N;
    Tensor dg_rest = reverse ? dg2d.narrow(0, 0, M) : dg2d.narrow(0, d.N, M);
    Tensor h_rest = reverse ? out2d.narrow(0, d.N, M) : out2d.narrow(0, 0, M);
    if (h0_zero) {
      at::mm_out(grad_w_hh, dg_rest.t(), h_rest);
    } else {
      grad_w_hh.addmm_(dg_rest.t(), h_rest);
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
    at::mm_out(grad_input2d, dg2d, w_ih);
  }
  Tensor grad_w_ih = recent_empty({4 * d.H, d.I}, opts.dtype().toScalarType());
  at::mm_out(grad_w_ih, dg2d.t(), input.view({d.T * d.N, d.I}));
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
    grad_w_hr = at::mm(dh_all.view({d.T * d.N, d.P}).t(), m_all.reshape({d.T * d.N, d.H}));
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
