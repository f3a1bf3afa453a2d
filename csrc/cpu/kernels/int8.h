// The int8 matmul on the CPU: a kernel body (csrc/cpu/isa/), compiled once per instruction set;
// Int8Kernels::matmul (csrc/cpu/kernels.h). The packed weight layout, the saturation-free
// integer schemes and the blocking are described in csrc/cpu/int8.cpp, which holds the ops.
// Per instruction set: AVX-512 (with VNNI) runs vpdpbusd for W8A8 and the 6-row FMA kernel (4+
// rows) or the single-pass AVX2 kernel for weight-only; AVX2 runs vpmaddwd and the AVX2
// weight-only passes; the baseline runs the portable scalar loops. All give the same int32
// accumulators bit for bit.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/kernels/vec_math.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace int8 {

constexpr int64_t kPanel = 16;       // output columns per packed panel
constexpr int64_t kGroup = 4;        // consecutive k per packed group
constexpr int64_t kMaxK = 65536;     // int32 accumulation is exact up to here on every path

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(group) for group in [0, groups) on torch's thread count with dynamic scheduling: on a
// shared machine a static split waits for the slowest (preempted) thread.
// `work` (multiply-adds) below about 2^21 per thread is not worth waking a thread for.
template <typename F>
void parallel_groups(int64_t groups, int64_t work, const F& fn) {
  const int64_t useful = std::max<int64_t>(1, work >> 21);
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), groups, useful})));
  if (threads == 1) {
    for (int64_t g = 0; g < groups; ++g) fn(g);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t g = 0; g < groups; ++g) fn(g);
}

// ---- dynamic quantization of the rows of x --------------------------------------------------

// Row m of x (K floats) -> sx[m] and Kp quantized values (padding 0): stored as u8 = xq + 128 for
// VNNI, as int16 otherwise. Division (not multiplication by 127/max) so that the values equal the
// reference's round(x / sx) exactly.
template <typename Q>
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, Q* q, float* sx) {
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(K, 1)),
                   [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = x + m * K;
      float amax = 0.f;
      bool nan = false;
      int64_t k = 0;
#if PYENGINE_HAS_AVX2
      __m256 vmax = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(r + k);
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      alignas(32) float t[8];
      _mm256_store_ps(t, vmax);
      for (int i = 0; i < 8; ++i) amax = std::max(amax, t[i]);
      nan = _mm256_movemask_ps(unordered) != 0;
#endif
      for (; k < K; ++k) {
        nan = nan || std::isnan(r[k]);
        amax = std::max(amax, std::fabs(r[k]));
      }
      Q* out = q + m * Kp;
      if (nan || std::isinf(amax)) {  // a diverged row stays diverged: NaN through the epilogue
        sx[m] = std::numeric_limits<float>::quiet_NaN();
        std::fill(out, out + Kp, std::is_same_v<Q, uint8_t> ? Q(128) : Q(0));
        continue;
      }
      const float s = amax > 0.f ? amax / 127.0f : 1.0f;
      sx[m] = s;
      k = 0;
#if PYENGINE_HAS_AVX2
      // Same arithmetic as the scalar loop: IEEE division, round half to even, clamp.
      const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
      for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(r + k), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i iv = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
        if constexpr (std::is_same_v<Q, uint8_t>) {
          iv = _mm256_add_epi32(iv, _mm256_set1_epi32(128));
          const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(iv),
                                               _mm256_extracti128_si256(iv, 1));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packus_epi16(p16, p16));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                           _mm_packs_epi32(_mm256_castsi256_si128(iv),
                                           _mm256_extracti128_si256(iv, 1)));
        }
      }
#endif
      for (; k < K; ++k) {
        float v = std::nearbyint(r[k] / s);
        v = std::min(127.f, std::max(-127.f, v));
        const int iv = static_cast<int>(v);
        if constexpr (std::is_same_v<Q, uint8_t>)
          out[k] = static_cast<uint8_t>(iv + 128);
        else
          out[k] = static_cast<Q>(iv);
      }
      for (; k < Kp; ++k) out[k] = std::is_same_v<Q, uint8_t> ? Q(128) : Q(0);
    }
  });
}

// Epilogue for one row m and columns [n0, n0+cnt): raw int32, or float dequant + bias.
struct Epilogue {
  const int32_t* wsum;     // per column, used by VNNI (offset correction) only
  const float* sw;         // [N]
  const float* bias;       // [N] or nullptr
  const float* sx;         // [M]
  float* out;              // [M,N] float (raw == false)
  int32_t* out_raw;        // [M,N] int32 (raw == true)
  int64_t N;
  bool raw;

  inline void store(int64_t m, int64_t n0, int64_t cnt, const int32_t* acc) const {
    if (raw) {
      std::memcpy(out_raw + m * N + n0, acc, cnt * sizeof(int32_t));
      return;
    }
    const float s = sx[m];
    float* o = out + m * N + n0;
    for (int64_t c = 0; c < cnt; ++c) {
      const float v = static_cast<float>(acc[c]) * (s * sw[n0 + c]);
      o[c] = bias ? v + bias[n0 + c] : v;
    }
  }
};

// ---- dynamic GEMM paths -----------------------------------------------------------------------

// Portable: xq int16 [M,Kp], packed weight, columns of panel nb.
void gemm_scalar(const int16_t* xq, const int8_t* w, int64_t M, int64_t N, int64_t Kp,
                 int64_t nb0, int64_t nb1, const Epilogue& ep) {
  const int64_t KB = Kp / kGroup;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* panel = w + nb * KB * 64;
    const int64_t n0 = nb * kPanel, cnt = std::min(kPanel, N - n0);
    for (int64_t m = 0; m < M; ++m) {
      int32_t acc[kPanel] = {0};
      const int16_t* xr = xq + m * Kp;
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int8_t* g = panel + kb * 64;
        const int16_t* xk = xr + kb * kGroup;
        for (int c = 0; c < kPanel; ++c)
          for (int j = 0; j < kGroup; ++j) acc[c] += int32_t(xk[j]) * int32_t(g[c * kGroup + j]);
      }
      ep.store(m, n0, cnt, acc);
    }
  }
}

#if PYENGINE_HAS_AVX2 && !PYENGINE_HAS_AVX512
// 8 int32 lanes [c0a,c0b,c1a,c1b | c2a,c2b,c3a,c3b] x2 (columns 0-3, 4-7) -> columns 0..7.
inline __m256i fold_pairs(__m256i lo, __m256i hi) {
  __m256i h = _mm256_hadd_epi32(lo, hi);  // [c0,c1,c4,c5 | c2,c3,c6,c7]
  return _mm256_permute4x64_epi64(h, _MM_SHUFFLE(3, 1, 2, 0));
}

// AVX2: two rows per step, one panel (16 columns) at a time: vpmovsxbw + vpmaddwd.
void gemm_avx2(const int16_t* xq, const int8_t* w, int64_t M, int64_t N, int64_t Kp, int64_t nb0,
               int64_t nb1, const Epilogue& ep) {
  const int64_t KB = Kp / kGroup;
  constexpr int MR = 2;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* panel = w + nb * KB * 64;
    const int64_t n0 = nb * kPanel, cnt = std::min(kPanel, N - n0);
    for (int64_t m = 0; m < M; m += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, M - m));
      __m256i acc[MR][4];
      for (int r = 0; r < MR; ++r)
        for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_si256();
      const int16_t* x0 = xq + m * Kp;
      const int16_t* x1 = rows > 1 ? x0 + Kp : x0;
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int8_t* g = panel + kb * 64;
        __m256i wv[4];
        for (int q = 0; q < 4; ++q)
          wv[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16 * q)));
        int64_t a, b;
        std::memcpy(&a, x0 + kb * kGroup, 8);
        std::memcpy(&b, x1 + kb * kGroup, 8);
        const __m256i xa = _mm256_set1_epi64x(a), xb = _mm256_set1_epi64x(b);
        for (int q = 0; q < 4; ++q) {
          acc[0][q] = _mm256_add_epi32(acc[0][q], _mm256_madd_epi16(xa, wv[q]));
          acc[1][q] = _mm256_add_epi32(acc[1][q], _mm256_madd_epi16(xb, wv[q]));
        }
      }
      for (int r = 0; r < rows; ++r) {
        alignas(32) int32_t res[kPanel];
        _mm256_store_si256(reinterpret_cast<__m256i*>(res), fold_pairs(acc[r][0], acc[r][1]));
        _mm256_store_si256(reinterpret_cast<__m256i*>(res + 8), fold_pairs(acc[r][2], acc[r][3]));
        ep.store(m + r, n0, cnt, res);
      }
    }
  }
}
#endif

#if PYENGINE_HAS_AVX512
// VNNI: MR (<= 6) rows x NP (<= 4) panels (16 columns each) of int32 accumulators held in zmm registers for the
// whole K loop, written to res[r*64 + p*16 ...] at the end.
template <int MR, int NP>
inline void vnni_tile(const uint8_t* xu, int64_t Kp, const int8_t* const* panels, int64_t kb0,
                      int64_t kb1, bool accumulate, int32_t* res) {
  __m512i acc[MR][NP];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p)
      acc[r][p] = accumulate ? _mm512_load_si512(res + r * 64 + p * 16) : _mm512_setzero_si512();
  const int8_t* w[NP];
  for (int p = 0; p < NP; ++p) w[p] = panels[p];
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    __m512i wv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      wv[p] = _mm512_loadu_si512(w[p] + kb * 64);
      // The first row tile of a K block streams the weight from memory: fetch ahead (for
      // the other tiles these lines are already in L1 and the hint is nearly free).
      _mm_prefetch(reinterpret_cast<const char*>(w[p] + (kb + 16) * 64), _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512i xb =
          _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xu + r * Kp + kb * kGroup));
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], xb, wv[p]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) _mm512_store_si512(res + r * 64 + p * 16, acc[r][p]);
}

template <int NP>
inline void vnni_rows(int mr, const uint8_t* xu, int64_t Kp, const int8_t* const* panels,
                      int64_t kb0, int64_t kb1, bool accumulate, int32_t* res) {
  switch (mr) {
    case 6: vnni_tile<6, NP>(xu, Kp, panels, kb0, kb1, accumulate, res); break;
    case 5: vnni_tile<5, NP>(xu, Kp, panels, kb0, kb1, accumulate, res); break;
    case 4: vnni_tile<4, NP>(xu, Kp, panels, kb0, kb1, accumulate, res); break;
    case 3: vnni_tile<3, NP>(xu, Kp, panels, kb0, kb1, accumulate, res); break;
    case 2: vnni_tile<2, NP>(xu, Kp, panels, kb0, kb1, accumulate, res); break;
    default: vnni_tile<1, NP>(xu, Kp, panels, kb0, kb1, accumulate, res); break;
  }
}

// Cache blocking: each task owns 4 panels (64 columns). With more than one row tile, K is cut
// into blocks of kKBlock groups (4 panels x 128 x 64 B = 32 KB of weight, L1-resident) and every
// row tile runs over that block, its accumulators parked in `acc` (M x 64 int32) in between.
constexpr int64_t kKBlock = 128;

void gemm_vnni(const uint8_t* xu, const int8_t* w, int64_t M, int64_t N, int64_t Kp,
               int64_t nb0, int64_t nb1, const Epilogue& ep) {
  const int64_t KB = Kp / kGroup;
  constexpr int NPMAX = 4, MR = 6;  // 24 accumulators + 4 weight vectors + 1 broadcast
  const int64_t tiles = ceil_div(M, MR);
  const int64_t kstep = tiles > 1 ? kKBlock : std::max<int64_t>(KB, 1);
  int32_t* acc = static_cast<int32_t*>(std::aligned_alloc(64, tiles * MR * 64 * sizeof(int32_t)));
  TORCH_CHECK(acc != nullptr, "int8_linear: out of memory");
  for (int64_t nb = nb0; nb < nb1; nb += NPMAX) {
    const int np = static_cast<int>(std::min<int64_t>(NPMAX, nb1 - nb));
    const int8_t* panels[NPMAX];
    for (int p = 0; p < NPMAX; ++p) panels[p] = w + (nb + std::min(p, np - 1)) * KB * 64;
    for (int64_t kb0 = 0; kb0 < KB; kb0 += kstep) {
      const int64_t kb1 = std::min(KB, kb0 + kstep);
      // Balanced row tiles (M = 32: 6,6,5,5,5,5 rather than 6,6,6,6,6,2).
      const int64_t base = M / tiles, extra = M % tiles;
      for (int64_t t = 0, m = 0; t < tiles; ++t) {
        const int mr = static_cast<int>(base + (t < extra ? 1 : 0));
        const uint8_t* xm = xu + m * Kp;
        int32_t* res = acc + m * 64;
        m += mr;
        const bool more = kb0 > 0;
        switch (np) {
          case 4: vnni_rows<4>(mr, xm, Kp, panels, kb0, kb1, more, res); break;
          case 3: vnni_rows<3>(mr, xm, Kp, panels, kb0, kb1, more, res); break;
          case 2: vnni_rows<2>(mr, xm, Kp, panels, kb0, kb1, more, res); break;
          default: vnni_rows<1>(mr, xm, Kp, panels, kb0, kb1, more, res); break;
        }
      }
    }
    for (int p = 0; p < np; ++p) {
      const int64_t n0 = (nb + p) * kPanel, cnt = std::min(kPanel, N - n0);
      const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
      const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(ep.wsum + n0), 7);  // 128*wsum
      const __m512 sw = _mm512_maskz_loadu_ps(mask, ep.sw + n0);
      const __m512 bias = ep.bias ? _mm512_maskz_loadu_ps(mask, ep.bias + n0) : _mm512_setzero_ps();
      for (int64_t row = 0; row < M; ++row) {
        const __m512i v = _mm512_sub_epi32(_mm512_load_si512(acc + row * 64 + p * 16), corr);
        if (ep.raw) {
          _mm512_mask_storeu_epi32(ep.out_raw + row * N + n0, mask, v);
        } else {
          const __m512 s = _mm512_mul_ps(_mm512_set1_ps(ep.sx[row]), sw);
          __m512 o = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
          if (ep.bias) o = _mm512_add_ps(o, bias);
          _mm512_mask_storeu_ps(ep.out + row * N + n0, mask, o);
        }
      }
    }
  }
  std::free(acc);
}
#endif

// ---- weight-only (act = none) ------------------------------------------------------------------

// xf: float [M,Kp] (zero-padded). acc[c] = sum_k x[m,k] * w[n0+c,k] in float, then * sw + bias.
void weight_only(const float* xf, const int8_t* w, int64_t M, int64_t N, int64_t Kp,
                 int64_t nb0, int64_t nb1, const float* sw, const float* bias, float* out) {
  const int64_t KB = Kp / kGroup;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* panel = w + nb * KB * 64;
    const int64_t n0 = nb * kPanel, cnt = std::min(kPanel, N - n0);
    int64_t m = 0;
#if PYENGINE_HAS_AVX2
    // Four rows per pass: each 64-byte group (16 columns x 4 k) is converted to float once.
    constexpr int MR = 4;
    if (M == 1) {
      // One row (decoding): memory bound; 8 independent accumulators hide the FMA latency.
      __m256 a[4][2];
      for (int j = 0; j < 4; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int8_t* g = panel + kb * 64;
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32));
        for (int j = 0; j < 4; ++j) {
          const __m256 xb = _mm256_set1_ps(xf[kb * kGroup + j]);
          const int sh = 24 - 8 * j;
          a[j][0] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_srai_epi32(
                                            _mm256_sllv_epi32(v0, _mm256_set1_epi32(sh)), 24)),
                                    a[j][0]);
          a[j][1] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_srai_epi32(
                                            _mm256_sllv_epi32(v1, _mm256_set1_epi32(sh)), 24)),
                                    a[j][1]);
        }
      }
      alignas(32) float acc[kPanel];
      _mm256_store_ps(acc, _mm256_add_ps(_mm256_add_ps(a[0][0], a[1][0]),
                                         _mm256_add_ps(a[2][0], a[3][0])));
      _mm256_store_ps(acc + 8, _mm256_add_ps(_mm256_add_ps(a[0][1], a[1][1]),
                                             _mm256_add_ps(a[2][1], a[3][1])));
      for (int64_t c = 0; c < cnt; ++c) {
        const float v = acc[c] * sw[n0 + c];
        out[n0 + c] = bias ? v + bias[n0 + c] : v;
      }
      m = 1;
    }
    {
      for (; m < M; m += MR) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, M - m));
        __m256 a[MR][2];
        for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
        const float* xr[MR];
        for (int r = 0; r < MR; ++r) xr[r] = xf + (m + std::min(r, rows - 1)) * Kp;
        for (int64_t kb = 0; kb < KB; ++kb) {
          const int8_t* g = panel + kb * 64;
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32));
#define PYENGINE_WO_STEP(J)                                                                    \
  {                                                                                            \
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v0, 24 - 8 * J), 24)); \
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v1, 24 - 8 * J), 24)); \
    for (int r = 0; r < MR; ++r) {                                                             \
      const __m256 xb = _mm256_set1_ps(xr[r][kb * kGroup + J]);                                \
      a[r][0] = _mm256_fmadd_ps(xb, w0, a[r][0]);                                              \
      a[r][1] = _mm256_fmadd_ps(xb, w1, a[r][1]);                                              \
    }                                                                                          \
  }
          PYENGINE_WO_STEP(0) PYENGINE_WO_STEP(1) PYENGINE_WO_STEP(2) PYENGINE_WO_STEP(3)
#undef PYENGINE_WO_STEP
        }
        for (int r = 0; r < rows; ++r) {
          alignas(32) float acc[kPanel];
          _mm256_store_ps(acc, a[r][0]);
          _mm256_store_ps(acc + 8, a[r][1]);
          float* o = out + (m + r) * N + n0;
          for (int64_t c = 0; c < cnt; ++c) {
            const float v = acc[c] * sw[n0 + c];
            o[c] = bias ? v + bias[n0 + c] : v;
          }
        }
      }
    }
#endif
    for (; m < M; ++m) {
      alignas(64) float acc[kPanel] = {0.f};
      const float* xr = xf + m * Kp;
      {
        for (int64_t kb = 0; kb < KB; ++kb) {
          const int8_t* g = panel + kb * 64;
          const float* xk = xr + kb * kGroup;
          for (int j = 0; j < kGroup; ++j)
            for (int c = 0; c < kPanel; ++c) acc[c] += xk[j] * float(g[c * kGroup + j]);
        }
      }
      float* o = out + m * N + n0;
      for (int64_t c = 0; c < cnt; ++c) {
        const float v = acc[c] * sw[n0 + c];
        o[c] = bias ? v + bias[n0 + c] : v;
      }
    }
  }
}

#if PYENGINE_HAS_AVX512
// Weight-only for several rows (AVX-512F): per task (4 panels = 64 columns) and K block of
// kWoBlock groups, the int8 weight block is converted once to float (exact: small integers) in a
// [k][64] buffer, then a 6-row x 4-vector register-blocked FMA kernel runs every row over it;
// accumulators are parked in `acc` between K blocks and scaled by sw[n] (+ bias) at the end.
constexpr int64_t kWoBlock = 64;  // 256 k: a 64 KB float block

template <int MR, int NP>
inline void wo_tile(const float* x, int64_t ldx, const float* wt, int64_t kc, bool accumulate,
                    float* res) {
  __m512 acc[MR][NP];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p)
      acc[r][p] = accumulate ? _mm512_load_ps(res + r * 64 + p * 16) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 wv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) wv[p] = _mm512_load_ps(wt + k * 64 + p * 16);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_fmadd_ps(xb, wv[p], acc[r][p]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) _mm512_store_ps(res + r * 64 + p * 16, acc[r][p]);
}

template <int NP>
inline void wo_rows(int mr, const float* x, int64_t ldx, const float* wt, int64_t kc, bool acc,
                    float* res) {
  switch (mr) {
    case 6: wo_tile<6, NP>(x, ldx, wt, kc, acc, res); break;
    case 5: wo_tile<5, NP>(x, ldx, wt, kc, acc, res); break;
    case 4: wo_tile<4, NP>(x, ldx, wt, kc, acc, res); break;
    case 3: wo_tile<3, NP>(x, ldx, wt, kc, acc, res); break;
    case 2: wo_tile<2, NP>(x, ldx, wt, kc, acc, res); break;
    default: wo_tile<1, NP>(x, ldx, wt, kc, acc, res); break;
  }
}

void weight_only_512(const float* xf, const int8_t* w, int64_t M, int64_t N, int64_t Kp,
                     int64_t nb0, int64_t nb1, const float* sw, const float* bias, float* out) {
  const int64_t KB = Kp / kGroup;
  constexpr int MR = 6;
  const int np = static_cast<int>(nb1 - nb0);
  const int64_t tiles = ceil_div(M, MR);
  float* acc = static_cast<float*>(std::aligned_alloc(64, tiles * MR * 64 * sizeof(float)));
  float* wt = static_cast<float*>(std::aligned_alloc(64, kWoBlock * kGroup * 64 * sizeof(float)));
  TORCH_CHECK(acc != nullptr && wt != nullptr, "int8_linear: out of memory");
  for (int64_t kb0 = 0; kb0 < KB; kb0 += kWoBlock) {
    const int64_t kb1 = std::min(KB, kb0 + kWoBlock);
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      for (int p = 0; p < np; ++p) {
        const __m512i v = _mm512_loadu_si512(w + ((nb0 + p) * KB + kb) * 64);
        float* dst = wt + (kb - kb0) * kGroup * 64 + p * 16;
        _mm512_store_ps(dst, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)));
        _mm512_store_ps(dst + 64,
                        _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)));
        _mm512_store_ps(dst + 128,
                        _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)));
        _mm512_store_ps(dst + 192, _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)));
      }
    }
    const int64_t kc = (kb1 - kb0) * kGroup;
    const int64_t base = M / tiles, extra = M % tiles;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int mr = static_cast<int>(base + (t < extra ? 1 : 0));
      const float* x = xf + m * Kp + kb0 * kGroup;
      float* res = acc + m * 64;
      const bool more = kb0 > 0;
      switch (np) {
        case 4: wo_rows<4>(mr, x, Kp, wt, kc, more, res); break;
        case 3: wo_rows<3>(mr, x, Kp, wt, kc, more, res); break;
        case 2: wo_rows<2>(mr, x, Kp, wt, kc, more, res); break;
        default: wo_rows<1>(mr, x, Kp, wt, kc, more, res); break;
      }
      m += mr;
    }
  }
  for (int p = 0; p < np; ++p) {
    const int64_t n0 = (nb0 + p) * kPanel, cnt = std::min(kPanel, N - n0);
    const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
    const __m512 s = _mm512_maskz_loadu_ps(mask, sw + n0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int64_t row = 0; row < M; ++row) {
      __m512 o = _mm512_mul_ps(_mm512_load_ps(acc + row * 64 + p * 16), s);
      if (bias) o = _mm512_add_ps(o, b);
      _mm512_mask_storeu_ps(out + row * N + n0, mask, o);
    }
  }
  std::free(wt);
  std::free(acc);
}
#endif

// ---- the whole product -------------------------------------------------------------------------

// Int8Kernels::matmul (csrc/cpu/kernels.h). No checks: callers validate shapes.
void matmul(const float* x, int64_t M, int64_t K, const int8_t* wp, const int32_t* wsum,
            const float* swp, const float* bp, int64_t N, int64_t act, bool raw, void* out) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: the bias alone (F.linear's answer), never unwritten memory
    for (int64_t m = 0; m < M; ++m) {
      if (raw) {
        std::fill_n(static_cast<int32_t*>(out) + m * N, N, 0);
      } else {
        float* o = static_cast<float*>(out) + m * N;
        for (int64_t n = 0; n < N; ++n) o[n] = bp ? bp[n] : 0.f;
      }
    }
    return;
  }
  const int64_t NB = ceil_div(N, kPanel), KB = ceil_div(K, kGroup), Kp = KB * kGroup;
  // Work split: groups of 4 panels (64 columns) per task; each task runs every row.
  const int64_t groups = ceil_div(NB, 4);

  if (act == 1) {
    std::vector<float> padded;
    const float* xp = x;
    if (Kp != K) {
      padded.assign(M * Kp, 0.f);
      for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * Kp], x + m * K, K * sizeof(float));
      xp = padded.data();
    }
    float* op = static_cast<float*>(out);
    parallel_groups(groups, M * N * K, [&](int64_t g) {
      const int64_t nb0 = g * 4, nb1 = std::min(NB, g * 4 + 4);
#if PYENGINE_HAS_AVX512
      if (M >= 4) {  // below 4 rows the single-pass kernel wins
        weight_only_512(xp, wp, M, N, Kp, nb0, nb1, swp, bp, op);
        return;
      }
#endif
      weight_only(xp, wp, M, N, Kp, nb0, nb1, swp, bp, op);
    });
    return;
  }

  std::vector<float> sx(M);
  Epilogue ep{wsum, swp, bp, sx.data(), raw ? nullptr : static_cast<float*>(out),
              raw ? static_cast<int32_t*>(out) : nullptr, N, raw};
#if PYENGINE_HAS_AVX512
  std::vector<uint8_t> xu(M * Kp);
  quantize_rows<uint8_t>(x, M, K, Kp, xu.data(), sx.data());
  parallel_groups(groups, M * N * K, [&](int64_t g) {
    gemm_vnni(xu.data(), wp, M, N, Kp, g * 4, std::min(NB, g * 4 + 4), ep);
  });
#else
  std::vector<int16_t> xq(M * Kp);
  quantize_rows<int16_t>(x, M, K, Kp, xq.data(), sx.data());
  parallel_groups(groups, M * N * K, [&](int64_t g) {
    const int64_t nb0 = g * 4, nb1 = std::min(NB, g * 4 + 4);
#if PYENGINE_HAS_AVX2
    gemm_avx2(xq.data(), wp, M, N, Kp, nb0, nb1, ep);
#else
    gemm_scalar(xq.data(), wp, M, N, Kp, nb0, nb1, ep);
#endif
  });
#endif
}

}  // namespace int8

// This instruction set's Int8Kernels.
inline Int8Kernels int8_kernels() { return {&int8::matmul}; }

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
