// Int8 linear layer on the CPU: out[m,n] = sx[m] * sw[n] * sum_k xq[m,k] * wq[n,k] + bias[n].
//
// Weight: quantized once (symmetric, per output row, values in [-127,127]) and packed once by
// int8_pack_weight into panels of 16 output columns x 4 consecutive k:
//     packed[((n/16) * KB + k/4) * 64 + (n%16) * 4 + k%4] = wq[n,k]      (KB = ceil(K/4))
// zero-padded in n and k, plus wsum[n] = sum_k wq[n,k] (for the unsigned-offset correction).
// One layout serves every path below, so a packed weight is valid on any build.
//
// act = 0 ("dynamic", W8A8): each row of x is quantized on the fly (symmetric, per row:
// sx = max|x| / 127, xq = round-half-even(x / sx) in [-127,127]), multiplied int8 x int8 with
// exact int32 accumulation, and dequantized in the epilogue (acc * (sx*sw[n]) + bias[n]) of the
// same kernel. raw=true returns the int32 accumulators instead (tests: they equal the integer
// reference bit for bit on every path).
// act = 1 ("none", weight-only): x stays float; 4-byte groups of the weight are sign-extended and
// converted to float in registers, accumulated with FMA, scaled by sw[n] in the epilogue.
//
// Saturation-free integer schemes (none can saturate or overflow for K <= 65536):
//  * AVX-512 VNNI: vpdpbusd multiplies u8 x s8 and adds groups
//    of 4 straight into int32 lanes with no intermediate int16 (so, unlike vpmaddubsw, no
//    saturation). x is fed as u8 = xq + 128 in [1,255]; the +128 is removed in the epilogue
//    with -128 * wsum[n]. Worst case per lane: K * 255 * 127 < 2^31 for K <= 66311.
//  * AVX2: NOT vpmaddubsw (u8 x s8 pairs reach 2*255*127 = 64770 > 32767 and saturate). xq is
//    kept as int16 and the weight is widened with vpmovsxbw; vpmaddwd multiplies int16 pairs and
//    sums each pair into an int32: |pair| <= 2*127*127 = 32258, exact (vpmaddwd itself can only
//    wrap for -32768*-32768 twice, impossible here). Lanes hold (column, k-pair) partials that are
//    folded with vphaddd at the end. Worst case: K * 127 * 127 < 2^31.
//  * Portable scalar path: the same int16 x int8 products into int32.
// act = 1 paths: one row (decoding, memory bound): a single pass over the packed weight with
// 8 independent FMA chains; several rows with AVX-512F: each 256-k block of 64 columns is
// converted to float once into an L2-resident buffer and a 6x64 register-blocked FMA kernel runs
// all rows over it; otherwise the AVX2 4-row pass or the scalar loop.
// Blocking and threads: a task is 4 panels (64 output columns); tasks are spread over torch's
// thread count with a dynamic OpenMP schedule (a static split waits for a preempted thread on a
// shared machine), single-threaded below ~2^21 multiply-adds. VNNI: a 6-row x 64-column tile of
// 24 zmm accumulators; with more than one row tile K is cut into 512-k blocks (32 KB of weight,
// L1-resident) that every row tile reuses, accumulators parked in an M x 64 int32 buffer.
// Rows of x are quantized (vectorised: IEEE division, round-half-even, clamp) into a padded
// buffer first, u8 for VNNI and int16 for AVX2/scalar; a row holding NaN or inf gets the scale
// NaN, so its outputs are NaN as F.linear's would be.
// The kernels are csrc/cpu/kernels/int8.h, one copy per instruction set: which path runs is the
// instruction set in use (pyengine.backends.cpu.capability), so tests cover every path on one
// machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cpu/int8.h"
#include "cpu/kernels.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kPanel = 16;       // output columns per packed panel
constexpr int64_t kGroup = 4;        // consecutive k per packed group
constexpr int64_t kMaxK = 65536;     // int32 accumulation is exact up to here on every path

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- packing ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> int8_pack_weight(const Tensor& qweight) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "int8_pack_weight: qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, "int8_pack_weight: qweight must be 2-D [N,K], got ",
              qweight.dim(), "-D");
  const Tensor w = qweight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K <= kMaxK, "int8_pack_weight: in_features ", K, " exceeds ", kMaxK,
              " (int32 accumulation would no longer be exact)");
  const int64_t NB = ceil_div(N, kPanel), KB = ceil_div(K, kGroup);
  Tensor packed = at::zeros({NB * KB * kPanel * kGroup}, w.options());
  Tensor wsum = at::zeros({NB * kPanel}, w.options().dtype(at::kInt));
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* ws = wsum.data_ptr<int32_t>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t cols = std::min(kPanel, N - nb * kPanel);
      int8_t* out = dst + nb * KB * 64;
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int64_t k0 = kb * kGroup, ks = std::min(kGroup, K - k0);
        for (int64_t c = 0; c < cols; ++c) {
          const int8_t* row = src + (nb * kPanel + c) * K + k0;
          for (int64_t j = 0; j < ks; ++j) out[kb * 64 + c * kGroup + j] = row[j];
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        const int8_t* row = src + (nb * kPanel + c) * K;
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += row[k];
        ws[nb * kPanel + c] = acc;
      }
    }
  });
  return {packed, wsum};
}

// ---- the op ------------------------------------------------------------------------------------

Tensor int8_linear(const Tensor& x, const Tensor& packed, const Tensor& wsum, const Tensor& scale,
                   const std::optional<Tensor>& bias, int64_t out_features, int64_t act,
                   bool raw) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "int8_linear: x must be 2-D [M,K], got ", x.dim(), "-D");
  TORCH_CHECK(act == 0 || act == 1, "int8_linear: act must be 0 (dynamic) or 1 (none), got ", act);
  TORCH_CHECK(!raw || act == 0, "int8_linear: raw accumulators exist only for act=dynamic");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  check_packed_weight(packed, wsum, scale, N, K, "int8_linear", "");
  const Tensor sw = scale.contiguous();
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N,
                "int8_linear: bias must be float32 [", N, "]");
    b = bias->contiguous();
  }
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({M, N}, x.options().dtype(raw ? at::kInt : at::kFloat));
  kernels().int8.matmul(xc.data_ptr<float>(), M, K, packed.data_ptr<int8_t>(),
                        wsum.data_ptr<int32_t>(), sw.data_ptr<float>(),
                        b.defined() ? b.data_ptr<float>() : nullptr, N, act, raw, out.data_ptr());
  return out;
}

}  // namespace

void int8_matmul(const float* x, int64_t M, int64_t K, const int8_t* packed, const int32_t* wsum,
                 const float* scale, const float* bias, int64_t N, int64_t act, float* out) {
  kernels().int8.matmul(x, M, K, packed, wsum, scale, bias, N, act, false, out);
}

void check_packed_weight(const Tensor& packed, const Tensor& wsum, const Tensor& scale, int64_t N,
                         int64_t K, const char* op, const char* name) {
  TORCH_CHECK(K <= kMaxK, op, ": ", name, "in_features ", K, " exceeds ", kMaxK);
  const int64_t NB = ceil_div(N, kPanel), KB = ceil_div(K, kGroup);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 1 && packed.is_contiguous(),
              op, ": ", name, "packed must be the 1-D int8 tensor from int8_pack_weight");
  TORCH_CHECK(N >= 0 && packed.numel() == NB * KB * 64, op, ": ", name, "packed has ",
              packed.numel(), " bytes, expected ", NB * KB * 64, " for N=", N, ", K=", K);
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == NB * kPanel &&
                  wsum.is_contiguous(),
              op, ": ", name, "wsum must be the int32 tensor from int8_pack_weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N, op,
              ": ", name, "scale must be float32 [", N, "]");
}

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("int8_pack_weight", &int8_pack_weight);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace cpu
}  // namespace pyengine
