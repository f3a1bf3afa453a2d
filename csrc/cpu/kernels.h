// The CPU kernels whose code depends on the instruction set, as tables of function pointers.
//
// One build carries every table three times: csrc/cpu/isa/{default,avx2,avx512}.cpp compile the
// kernel bodies of csrc/cpu/kernels/ for the target's baseline (any x86-64, or any other
// machine), for AVX2 (+FMA, F16C) and for AVX-512 (F, BW, VL, DQ, VNNI). Everything else (argument
// checks, allocation, ATen GEMMs, the order of the work) is compiled once, for the baseline, and
// calls the kernels through `kernels()`: the table of the instruction set chosen at load
// (csrc/cpu/settings.cpp): a wheel built on one machine runs on any other.
//
// Every function works on raw, contiguous memory the caller owns and checked; nothing here
// allocates tensors.
#pragma once

#include <cstdint>

namespace pyengine {
namespace cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// ---- LSTM (csrc/cpu/kernels/lstm_cell.h, lstm.h) -------------------------------------------------
struct LstmKernels {
  // The cell's pointwise step over units [0, count) of one row whose gate q of unit j sits at
  // g[q*H + j]. Forward: g pre-activations in, activations out; c: c_{t-1} in, c_t out; cell: a
  // copy of c_t (may be c); m = o * tanh(c_t).
  void (*forward_units_f32)(float* g, float* c, float* cell, float* m, int64_t H, int64_t count);
  void (*forward_units_f64)(double* g, double* c, double* cell, double* m, int64_t H,
                            int64_t count);
  // Backward: act activated gates, cell c_t, cprev c_{t-1}, dm the gradient of o*tanh(c_t); dc:
  // gradient of c_t in, of c_{t-1} out; dg: gradient of the pre-activation gates.
  void (*backward_units_f32)(const float* act, const float* cell, const float* cprev,
                             const float* dm, float* dc, float* dg, int64_t H, int64_t count);
  void (*backward_units_f64)(const double* act, const double* cell, const double* cprev,
                             const double* dm, double* dc, double* dg, int64_t H, int64_t count);
  // The fused small-batch path (the whole time loop in one OpenMP region, see kernels/lstm.h):
  // hidden units per vector, H must be a multiple of it; 0 where this instruction set has none.
  int64_t fused_units;
  // w_hh [4H,H]; bias [4H] or null; gates [T,N,4H] input projections in (without the bias),
  // activated gates out; output, cells [T,N,H]; h0 [N,H]; h_state [N,H] final h out; c_state
  // [N,H] c0 in, final c out; rows [T] active rows per step. With table [V,4H] and tokens [T,N]
  // (each in [0,V)), the input projection of row n at step t is table[tokens[t,n]] and gates is
  // only written. packed: scratch of fused_packed_floats(H) floats, 64-byte aligned.
  void (*fused_forward)(const float* w_hh, const float* bias, float* gates, float* output,
                        float* cells, const float* h0, float* h_state, float* c_state,
                        const int64_t* rows, int64_t T, int64_t N, int64_t H, bool reverse,
                        const float* table, const int64_t* tokens, float* packed);
  // gates [T,N,4H] activated; cells [T,N,H]; c0 [N,H]; grad_output [T,N,H] or null; dgates
  // [T,N,4H] out; dh_state [N,H] grad_h_n in, grad_h0 out; dc_state [N,H] grad_c_n in, grad_c0
  // out; grad_bias [4H] out (the sum of dgates) or null. packed: as above; dm: N*H floats.
  void (*fused_backward)(const float* w_hh, const float* gates, const float* cells,
                         const float* c0, const float* grad_output, float* dgates,
                         float* dh_state, float* dc_state, const int64_t* rows, int64_t T,
                         int64_t N, int64_t H, bool reverse, float* grad_bias, float* packed,
                         float* dm);
};

// Floats of packed weight scratch the fused LSTM path needs for hidden size H (with padding).
inline int64_t fused_packed_floats(int64_t H) { return 4 * H * H; }

// ---- cross-entropy rows (csrc/cpu/kernels/cross_entropy.h) ----------------------------------------
struct CrossEntropyKernels {
  // max_j x_j, NaN if any x_j is NaN.
  double (*row_max)(const float* x, int64_t C);
  // *sumexp = sum_j exp(x_j - m); when smooth, *wsum = sum_j w_j (x_j - m) (w_j = 1 when w is
  // null). With e given, e_j = exp(x_j - m) is stored there (e may be x).
  void (*row_sums)(const float* x, int64_t C, double m, const float* w, bool smooth, float* e,
                   double* sumexp, double* wsum);
  // e_j <- a * e_j - b * w_j (w_j = 1 when w is null).
  void (*row_finish)(float* e, int64_t C, double a, double b, const float* w);
};

// ---- gradient clipping (csrc/cpu/kernels/clip.h) ---------------------------------------------------
enum class NormKind : int { kTwo, kOne, kInf, kNegInf, kZero, kPow };

enum class FloatType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

struct ClipKernels {
  // The partial norm of the n elements at x, of type `type`, before finishing: sum x^2 (kTwo),
  // sum |x| (kOne), max |x| (kInf), min |x| (kNegInf), count of nonzeros (kZero), sum |x|^p
  // (kPow); NaN in any element gives NaN. Accumulated in float64 (float32 lanes for blocks of
  // float32 sums where vectors are used).
  double (*reduce)(const void* x, int64_t n, FloatType type, NormKind kind, double p);
  // x *= coef, rounded as torch's mul_ (float math for float32, bfloat16 and float16).
  void (*scale)(void* x, int64_t n, FloatType type, double coef);
  // x = clamp(x, -clip, clip), NaN kept.
  void (*clamp)(void* x, int64_t n, FloatType type, double clip);
};

// ---- int8 matmul (csrc/cpu/kernels/int8.h) --------------------------------------------------------
struct Int8Kernels {
  // out[M,N] (float32, or the int32 accumulators when raw) = x[M,K] (float32, contiguous) times
  // the weight packed by int8_pack_weight (layout in csrc/cpu/int8.cpp), dequantized with
  // scale[N] (and the rows' own scales for act 0) plus bias[N] (or null). act 0: dynamic
  // per-row quantization of x (W8A8); act 1: weight-only. A row of x holding NaN or inf gives
  // a row of NaN under act 0. Threads itself when the product is large enough.
  void (*matmul)(const float* x, int64_t M, int64_t K, const int8_t* packed, const int32_t* wsum,
                 const float* scale, const float* bias, int64_t N, int64_t act, bool raw,
                 void* out);
};

struct CpuKernels {
  Isa isa;
  LstmKernels lstm;
  CrossEntropyKernels cross_entropy;
  ClipKernels clip;
  Int8Kernels int8;
};

// The kernels of the instruction set in use (csrc/cpu/settings.h says which).
const CpuKernels& kernels();

// The tables each csrc/cpu/isa/*.cpp defines (avx2 and avx512 exist on x86-64 builds only).
namespace isa_default { const CpuKernels& table(); }
namespace isa_avx2 { const CpuKernels& table(); }
namespace isa_avx512 { const CpuKernels& table(); }

}  // namespace cpu
}  // namespace pyengine
