// The fused small-batch LSTM path: a kernel body (csrc/cpu/isa/), compiled once per instruction
// set; entries of LstmKernels (csrc/cpu/kernels.h). The op around it is csrc/cpu/lstm.cpp.
#pragma once

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/kernels/lstm_cell.h"
#include "cpu/lstm_rows.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {

// ---- fused small-batch path (float32, AVX2 or AVX-512, no projection, H % kUnits == 0) ---------
//
// For small batches the per-step GEMM is a few microseconds of work, so a library call, a tensor
// view and a thread fork per step cost more than the arithmetic. This path runs the whole time
// loop inside one OpenMP region. Each step is a small register-tiled GEMM over the thread's share
// of the step (its rows, or its hidden units when the batch is too small to split), followed by
// one pointwise sweep over the same share. Keeping the two apart matters: the gate math is long
// dependency chains (exp, reciprocal), and a sweep over whole rows lets the core overlap many of
// them, where interleaving them one vector at a time with GEMM tiles left it waiting on each.
// AVX-512 (twice the FMA width and registers) or AVX2; none on the baseline.

#if PYENGINE_HAS_AVX2

#if PYENGINE_HAS_AVX512
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
#if PYENGINE_HAS_AVX512
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
#if PYENGINE_HAS_AVX512
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
#if PYENGINE_HAS_AVX512
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

// LstmKernels::fused_forward (csrc/cpu/kernels.h).
void fused_forward(const float* w_hh, const float* bias, float* gates, float* output, float* cells,
                   const float* h0, float* h_state, float* c_state, const int64_t* rows, int64_t T,
                   int64_t N, int64_t H, bool reverse, const float* table, const int64_t* tokens,
                   float* packed) {
  constexpr int64_t W = kUnits;
  const int64_t G = 4 * H, units = H / W;
  // B = w_hh^T [H, 4H] packed: element (k, c) = w_hh[c*H + k]; every panel read is written.
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

// LstmKernels::fused_backward (csrc/cpu/kernels.h). The bias gradient is the sum of dgates over
// steps and rows, taken while they are in cache.
void fused_backward(const float* w_hh, const float* gates, const float* cells, const float* c0,
                    const float* grad_output, float* dgates, float* dh_state, float* dc_state,
                    const int64_t* rows, int64_t T, int64_t N, int64_t H, bool reverse,
                    float* grad_bias, float* packed, float* dm_all) {
  constexpr int64_t W = kUnits;
  const int64_t G = 4 * H, units = H / W;
  // B = w_hh [4H, H] packed: element (k, c) = w_hh[k*H + c]; every panel read is written.
  const Split split = fused_split(N, units);
  // One partial bias gradient per thread (its rows, or its columns), summed at the end.
  std::vector<float> bias_partials(grad_bias ? split.threads * G : 0, 0.0f);
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
    float* db = grad_bias ? bias_partials.data() + tid * G : nullptr;
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
  if (!grad_bias) return;
  // The threads' partial sums, added here: a [threads, 4H] reduction is too small for ATen's
  // sum to pay its dispatch.
  std::copy(bias_partials.begin(), bias_partials.begin() + G, grad_bias);
  for (int64_t i = 1; i < split.threads; ++i) {
    const float* partial = bias_partials.data() + i * G;
    for (int64_t j = 0; j < G; ++j) grad_bias[j] += partial[j];
  }
}

#endif  // PYENGINE_HAS_AVX2
// This instruction set's LstmKernels.
inline LstmKernels lstm_kernels() {
  LstmKernels k{};
  k.forward_units_f32 = &forward_units<float>;
  k.forward_units_f64 = &forward_units<double>;
  k.backward_units_f32 = &backward_units<float>;
  k.backward_units_f64 = &backward_units<double>;
#if PYENGINE_HAS_AVX2
  k.fused_units = kUnits;
  k.fused_forward = &fused_forward;
  k.fused_backward = &fused_backward;
#endif
  return k;
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
