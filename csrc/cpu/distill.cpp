// CPU kernels of the linear distillation family (schemas in csrc/ops.cpp):
//   linear_distillation_forward / linear_distillation_backward
// The derivative of the public op is attached in csrc/autograd/distill.cpp.
//
// Per row: s = student logits, t = teacher logits (both [V], computed chunk by chunk with ATen
// GEMMs, never the whole [N, V]), T the temperature, z = s / T,
//   q = softmax(s / T), log q_j = (s_j - max s) / T - lzs     lzs = log sum_j exp((s_j - max s) / T)
//   p = softmax(t / T), log p_j = (t_j - max t) / T - lzt     lzt likewise
//   kl:          D = sum_j p_j (log p_j - log q_j)            dD/dz_k = q_k - p_k
//   reverse_kl:  D = sum_j q_j (log q_j - log p_j)            dD/dz_k = q_k (log q_k - log p_k - D)
//   jsd (beta):  M = beta p + (1 - beta) q,  S = sum_j q_j (log q_j - log M_j)
//                D = beta sum_j p_j (log p_j - log M_j) + (1 - beta) S
//                dD/dz_k = (1 - beta) q_k (log q_k - log M_k - S)
//   CE = log sum_j exp(s_j) - s_target (at temperature 1)     dCE/ds_k = softmax(s)_k - [k == target]
//   loss = alpha CE + (1 - alpha) T^2 D  (with a target; T^2 D without), and
//   dloss/ds_k = alpha dCE/ds_k + (1 - alpha) T dD/dz_k (the T^2 and the 1/T of z = s/T).
// A term whose probability is exactly 0 contributes 0 (0 log 0 = 0), so a teacher logit of -inf
// (a masked token) is a zero-probability class, not a NaN; NaN anywhere in a row's inputs
// reaches its loss.
//
// The row passes (max; sums of exp; for reverse_kl and jsd the centering sum; the gradient,
// written over the student logits in place) are plain loops over a row that stays in cache,
// vectorised by the compiler (portable_math.h's exp and log), summed in the input type over
// blocks of 512 and then in double. Rows are independent: at::parallel_for. The forward keeps
// per-row statistics (the two maxima and log-sums), so the recomputing backward runs only the
// GEMMs and the gradient pass. Every target is bound-checked before any row is read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/portable_math.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

enum class Kind { kKL, kReverseKL, kJSD };
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Columns of the per-row statistics (the schema's `stats` [N, 6]).
constexpr int64_t kStudentMax = 0, kStudentLogZ = 1, kTeacherMax = 2, kTeacherLogZ = 3,
                  kStudentLogZ1 = 4, kCenter = 5, kStatColumns = 6;
constexpr int64_t kBlock = 512;  // elements summed in the input type before a double total

struct Options {
  Kind kind = Kind::kKL;
  double beta = 0.5;          // jsd only, in (0, 1) once the end points became kl/reverse_kl
  double inv_t = 1.0;         // 1 / temperature
  bool hard = false;          // a target is given: cross-entropy term, ignore_index rows
  bool separate_z1 = false;   // hard and temperature != 1: the CE needs its own log-sum
  int64_t ignore_index = -100;
  double soft_loss = 1.0;     // coefficient of D in the row loss: (1 - alpha) T^2, or T^2
  double soft_grad = 1.0;     // coefficient of dD/dz in dloss/ds: (1 - alpha) T, or T
  double hard_coef = 0.0;     // alpha with a target, else 0
};

Options make_options(c10::string_view kind, double beta, double temperature, double alpha,
                     bool has_target, int64_t ignore_index, const char* what) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "pyengine ", what,
              ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(alpha >= 0 && alpha <= 1, "pyengine ", what, ": alpha must be in [0, 1], got ",
              alpha);
  TORCH_CHECK(beta >= 0 && beta <= 1, "pyengine ", what, ": beta must be in [0, 1], got ", beta);
  Options o;
  if (kind == "kl") {
    o.kind = Kind::kKL;
  } else if (kind == "reverse_kl") {
    o.kind = Kind::kReverseKL;
  } else if (kind == "jsd") {
    o.kind = beta == 0 ? Kind::kKL : (beta == 1 ? Kind::kReverseKL : Kind::kJSD);
  } else {
    TORCH_CHECK(false, "pyengine ", what, ": kind must be 'kl', 'reverse_kl' or 'jsd', got '",
                std::string(kind), "'");
  }
  o.beta = beta;
  o.inv_t = 1.0 / temperature;
  o.hard = has_target;
  o.separate_z1 = has_target && temperature != 1.0;
  o.ignore_index = ignore_index;
  const double soft_share = has_target ? 1.0 - alpha : 1.0;
  o.soft_loss = soft_share * temperature * temperature;
  o.soft_grad = soft_share * temperature;
  o.hard_coef = has_target ? alpha : 0.0;
  return o;
}

// ---- row passes ------------------------------------------------------------------------------

template <typename T>
void row_max(const T* s, const T* t, int64_t V, T* s_max, T* t_max) {
  T a = -std::numeric_limits<T>::infinity(), b = a;
#pragma omp simd reduction(max : a, b)
  for (int64_t j = 0; j < V; ++j) {
    a = s[j] > a ? s[j] : a;  // NaN is skipped here and caught by the sums
    b = t[j] > b ? t[j] : b;
  }
  *s_max = a;
  *t_max = b;
}

struct RowSums {
  double zs = 0, zt = 0, z1 = 0, w = 0;
};

// zs = sum exp((s - ms) / T), zt likewise, z1 = sum exp(s - ms) (kZ1) and, for kl,
// w = sum exp((t - mt) / T) ((t - mt) - (s - ms)), which makes D without another pass:
// D = w / (T zt) + lzs - lzt.
template <typename T, bool kKL, bool kZ1>
RowSums row_sums(const T* s, const T* t, int64_t V, T ms, T mt, T inv_t) {
  RowSums r;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t e = std::min(V, b + kBlock);
    T as = 0, at = 0, a1 = 0, aw = 0;
#pragma omp simd reduction(+ : as, at, a1, aw)
    for (int64_t j = b; j < e; ++j) {
      const T ds = s[j] - ms, dt = t[j] - mt;
      const T et = portable::exp(dt * inv_t);
      as += portable::exp(ds * inv_t);
      at += et;
      if constexpr (kZ1) a1 += portable::exp(ds);
      if constexpr (kKL) aw += portable::select(et == T(0), T(0), et * (dt - ds));
    }
    r.zs += as;
    r.zt += at;
    r.z1 += a1;
    r.w += aw;
  }
  return r;
}

struct RowStats {  // one row's statistics, in the input type, as stored in `stats`
  double ms, lzs, mt, lzt, lz1, center;
};

// reverse_kl: returns (D, D); jsd: returns (D, S). Needs the log-sums, so a pass of its own.
template <typename T, Kind K>
std::pair<double, double> row_divergence(const T* s, const T* t, int64_t V, const RowStats& st,
                                         T inv_t, T beta) {
  const T ms = static_cast<T>(st.ms), mt = static_cast<T>(st.mt);
  const T lzs = static_cast<T>(st.lzs), lzt = static_cast<T>(st.lzt);
  const T omb = T(1) - beta;
  double d_total = 0, s_total = 0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t e = std::min(V, b + kBlock);
    T ad = 0, aq = 0;
#pragma omp simd reduction(+ : ad, aq)
    for (int64_t j = b; j < e; ++j) {
      const T lq = (s[j] - ms) * inv_t - lzs;
      const T lp = (t[j] - mt) * inv_t - lzt;
      const T q = portable::exp(lq);
      if constexpr (K == Kind::kReverseKL) {
        ad += portable::select(q == T(0), T(0), q * (lq - lp));
      } else {
        const T p = portable::exp(lp);
        const T lm = portable::log(beta * p + omb * q);
        const T tp = portable::select(p == T(0), T(0), p * (lp - lm));
        const T tq = portable::select(q == T(0), T(0), q * (lq - lm));
        ad += beta * tp + omb * tq;
        aq += tq;
      }
    }
    d_total += ad;
    s_total += aq;
  }
  if constexpr (K == Kind::kReverseKL) return {d_total, d_total};
  return {d_total, s_total};
}

// s_k <- a dD/dz_k + b softmax(s)_k over the row, in place (the caller subtracts b at the
// target). a = g (1 - alpha) T, b = g alpha, g the row's share of the upstream gradient.
template <typename T, Kind K, bool kHard, bool kZ1>
void row_grad(T* s, const T* t, int64_t V, const RowStats& st, T inv_t, T beta, T a, T b) {
  const T ms = static_cast<T>(st.ms), mt = static_cast<T>(st.mt);
  const T lzs = static_cast<T>(st.lzs), lzt = static_cast<T>(st.lzt);
  const T lz1 = static_cast<T>(st.lz1), c = static_cast<T>(st.center);
  const T omb = T(1) - beta;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const T ds = s[j] - ms;
    const T lq = ds * inv_t - lzs;
    const T q = portable::exp(lq);
    const T lp = (t[j] - mt) * inv_t - lzt;
    T soft;
    if constexpr (K == Kind::kKL) {
      soft = q - portable::exp(lp);
    } else if constexpr (K == Kind::kReverseKL) {
      soft = portable::select(q == T(0), T(0), q * ((lq - lp) - c));
    } else {
      const T lm = portable::log(beta * portable::exp(lp) + omb * q);
      soft = portable::select(q == T(0), T(0), omb * q * ((lq - lm) - c));
    }
    T g = a * soft;
    if constexpr (kHard) {
      if constexpr (kZ1) g += b * portable::exp(ds - lz1);
      else g += b * q;
    }
    s[j] = g;
  }
}

struct RowParams {
  int64_t V;
  double inv_t, beta, soft_loss, soft_grad, hard_coef;
  int64_t ignore_index;
};

// The forward of one row: statistics into st_out, the row's loss returned, and with grad the
// gradient (scaled by g) written over s. t is only read.
template <typename T, Kind K, bool kHard, bool kZ1>
double forward_row(T* s, const T* t, int64_t target, const RowParams& p, T* st_out, bool grad,
                   double g) {
  const int64_t V = p.V;
  if (kHard && target == p.ignore_index) {
    std::fill(st_out, st_out + kStatColumns, T(0));
    if (grad) std::fill(s, s + V, T(0));
    return 0.0;
  }
  const T inv_t = static_cast<T>(p.inv_t), beta = static_cast<T>(p.beta);
  T ms, mt;
  row_max(s, t, V, &ms, &mt);
  const RowSums sums = row_sums<T, K == Kind::kKL, kZ1>(s, t, V, ms, mt, inv_t);
  RowStats st;
  st.ms = ms;
  st.mt = mt;
  st.lzs = std::log(sums.zs);
  st.lzt = std::log(sums.zt);
  st.lz1 = kZ1 ? std::log(sums.z1) : (kHard ? st.lzs : 0.0);
  double divergence;
  if constexpr (K == Kind::kKL) {
    divergence = p.inv_t * sums.w / sums.zt + st.lzs - st.lzt;
    st.center = 0;
  } else {
    // the stored (rounded) statistics, so forward and backward use the same numbers
    RowStats rounded = st;
    rounded.lzs = static_cast<T>(st.lzs);
    rounded.lzt = static_cast<T>(st.lzt);
    const auto dc = row_divergence<T, K>(s, t, V, rounded, inv_t, beta);
    divergence = dc.first;
    st.center = dc.second;
  }
  double ce = 0;
  if constexpr (kHard) ce = st.lz1 - (static_cast<double>(s[target]) - static_cast<double>(ms));
  const double loss = p.hard_coef * ce + p.soft_loss * divergence;
  const double stored[kStatColumns] = {st.ms, st.lzs, st.mt, st.lzt, st.lz1, st.center};
  for (int64_t c = 0; c < kStatColumns; ++c) st_out[c] = static_cast<T>(stored[c]);
  if (grad) {
    RowStats rounded{static_cast<T>(st.ms), static_cast<T>(st.lzs), static_cast<T>(st.mt),
                     static_cast<T>(st.lzt), static_cast<T>(st.lz1), static_cast<T>(st.center)};
    const T a = static_cast<T>(g * p.soft_grad), b = static_cast<T>(g * p.hard_coef);
    row_grad<T, K, kHard, kZ1>(s, t, V, rounded, inv_t, beta, a, b);
    if (kHard) s[target] -= b;
  }
  return loss;
}

// The gradient of one row from the forward's statistics, written over s.
template <typename T, Kind K, bool kHard, bool kZ1>
void backward_row(T* s, const T* t, int64_t target, const RowParams& p, const T* st_in,
                  double g) {
  if (kHard && target == p.ignore_index) {
    std::fill(s, s + p.V, T(0));
    return;
  }
  const RowStats st{st_in[kStudentMax], st_in[kStudentLogZ], st_in[kTeacherMax],
                    st_in[kTeacherLogZ], st_in[kStudentLogZ1], st_in[kCenter]};
  const T a = static_cast<T>(g * p.soft_grad), b = static_cast<T>(g * p.hard_coef);
  row_grad<T, K, kHard, kZ1>(s, t, p.V, st, static_cast<T>(p.inv_t), static_cast<T>(p.beta), a,
                             b);
  if (kHard) s[target] -= b;
}

template <typename T>
struct RowKernels {
  double (*forward)(T*, const T*, int64_t, const RowParams&, T*, bool, double);
  void (*backward)(T*, const T*, int64_t, const RowParams&, const T*, double);
};

template <typename T, Kind K, bool kHard, bool kZ1>
RowKernels<T> kernels_for() {
  return {&forward_row<T, K, kHard, kZ1>, &backward_row<T, K, kHard, kZ1>};
}

template <typename T, Kind K>
RowKernels<T> kernels_for_kind(const Options& o) {
  if (!o.hard) return kernels_for<T, K, false, false>();
  if (o.separate_z1) return kernels_for<T, K, true, true>();
  return kernels_for<T, K, true, false>();
}

template <typename T>
RowKernels<T> pick_kernels(const Options& o) {
  switch (o.kind) {
    case Kind::kKL:
      return kernels_for_kind<T, Kind::kKL>(o);
    case Kind::kReverseKL:
      return kernels_for_kind<T, Kind::kReverseKL>(o);
    default:
      return kernels_for_kind<T, Kind::kJSD>(o);
  }
}

// ---- checks ----------------------------------------------------------------------------------

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Shapes, dtypes and devices of every input; every target bound-checked. Returns the number of
// rows the mean divides by (the non-ignored rows, or N without a target).
int64_t check_inputs(const Tensor& sh, const Tensor& sw, const std::optional<Tensor>& sb,
                     const Tensor& th, const Tensor& tw, const std::optional<Tensor>& tb,
                     const std::optional<Tensor>& target, int64_t ignore_index,
                     const char* what) {
  TORCH_CHECK(sh.dim() == 2 && sw.dim() == 2 && sh.size(1) == sw.size(1), "pyengine ", what,
              ": student_hidden [N,Hs] and student_weight [V,Hs] expected, got ", sh.sizes(),
              " and ", sw.sizes());
  TORCH_CHECK(th.dim() == 2 && tw.dim() == 2 && th.size(1) == tw.size(1), "pyengine ", what,
              ": teacher_hidden [N,Ht] and teacher_weight [V,Ht] expected, got ", th.sizes(),
              " and ", tw.sizes());
  TORCH_CHECK(sh.size(0) == th.size(0), "pyengine ", what, ": student_hidden has ", sh.size(0),
              " rows but teacher_hidden has ", th.size(0));
  TORCH_CHECK(sw.size(0) == tw.size(0), "pyengine ", what, ": the student's vocabulary (",
              sw.size(0), ") must equal the teacher's (", tw.size(0), ")");
  TORCH_CHECK(sw.size(0) > 0, "pyengine ", what, ": the heads need at least one row (class)");
  const auto dtype = sh.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pyengine ", what,
              ": CPU supports float32 and float64, got ", dtype);
  const int64_t V = sw.size(0);
  for (const Tensor* x : {&sh, &sw, &th, &tw}) {
    TORCH_CHECK(x->scalar_type() == dtype, "pyengine ", what,
                ": every hidden state, weight and bias must share one dtype, got ", dtype,
                " and ", x->scalar_type());
    TORCH_CHECK(x->device().is_cpu(), "pyengine ", what, ": every tensor must be on the CPU");
  }
  for (const auto* b : {&sb, &tb}) {
    if (!present(*b)) continue;
    TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == V && (*b)->scalar_type() == dtype &&
                    (*b)->device().is_cpu(),
                "pyengine ", what, ": a bias must be a [", V, "] CPU tensor of dtype ", dtype,
                ", got ", (*b)->sizes(), " ", (*b)->scalar_type());
  }
  const int64_t N = sh.size(0);
  if (!present(target)) return N;
  TORCH_CHECK(target->dim() == 1 && target->size(0) == N && target->scalar_type() == at::kLong &&
                  target->device().is_cpu(),
              "pyengine ", what, ": target must be a 1-D int64 CPU tensor of ", N,
              " elements, got ", target->sizes(), " ", target->scalar_type());
  const Tensor tc = target->contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (tp[i] == ignore_index) continue;
    TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "pyengine ", what, ": target ", tp[i], " at position ",
                i, " is out of range: targets must be in [0, ", V, ") or equal ignore_index (",
                ignore_index, ")");
    ++count;
  }
  return count;
}

// Rows per chunk: about 8M logits per head (32 MB in float32), 32..4096 rows, so the two logit
// buffers stay small next to the weights while each chunk's GEMMs remain large.
int64_t pick_chunk(int64_t chunk_rows, int64_t N, int64_t V) {
  int64_t c = chunk_rows;
  if (c <= 0) {
    c = std::min<int64_t>(4096, std::max<int64_t>(32, (int64_t(1) << 23) / std::max<int64_t>(V, 1)));
  }
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(N, 1)));
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// ---- the chunked pass ------------------------------------------------------------------------

struct Inputs {
  Tensor sh, sw, th, tw;  // contiguous
  std::optional<Tensor> sb, tb;
  Tensor target;          // contiguous int64, or undefined
};

struct GradOut {
  Tensor hidden, weight, bias;
};

// Runs every chunk: both heads' logits (GEMMs), then per row either the forward (stats into
// stats_out, losses into row_loss; with grads, the gradient too) or the backward (stats read
// from stats_in). With grads the student's hidden, weight and bias gradients accumulate from
// the gradient of each chunk's logits.
template <typename T>
void run_chunks(const Inputs& in, const Options& o, int64_t chunk, bool forward, bool want_grad,
                double* row_loss, T* stats_out, const T* stats_in, const double* g_rows,
                double g0, GradOut* grads) {
  const int64_t N = in.sh.size(0), V = in.sw.size(0);
  if (N == 0) return;
  const RowParams p{V, o.inv_t, o.beta, o.soft_loss, o.soft_grad, o.hard_coef, o.ignore_index};
  const RowKernels<T> k = pick_kernels<T>(o);
  const int64_t* tp = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  const int64_t rows_max = std::min(chunk, N);
  Tensor s_buf = at::empty({rows_max, V}, in.sh.options());
  Tensor t_buf = at::empty({rows_max, V}, in.sh.options());
  const Tensor swt = in.sw.t(), twt = in.tw.t();
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    const Tensor hs = in.sh.narrow(0, start, rows), ht = in.th.narrow(0, start, rows);
    Tensor sc = s_buf.narrow(0, 0, rows), tc = t_buf.narrow(0, 0, rows);
    if (present(in.sb)) gemm_bias_into(sc, *in.sb, hs, swt); else gemm_into(sc, hs, swt);
    if (present(in.tb)) gemm_bias_into(tc, *in.tb, ht, twt); else gemm_into(tc, ht, twt);
    T* s = sc.data_ptr<T>();
    const T* t = tc.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = start + r;
        const int64_t target = tp ? tp[i] : 0;
        const double g = g_rows ? g_rows[i] : g0;
        if (forward) {
          row_loss[i] = k.forward(s + r * V, t + r * V, target, p,
                                  stats_out + i * kStatColumns, want_grad, g);
        } else {
          k.backward(s + r * V, t + r * V, target, p, stats_in + i * kStatColumns, g);
        }
      }
    });
    if (want_grad) {
      Tensor gh = grads->hidden.narrow(0, start, rows);
      gemm_into(gh, sc, in.sw);
      gemm_accumulate(grads->weight, sc.t(), hs);
      if (grads->bias.defined() && grads->bias.numel() > 0) grads->bias.add_(sc.sum(0));
    }
  }
}

Inputs make_inputs(const Tensor& sh, const Tensor& sw, const std::optional<Tensor>& sb,
                   const Tensor& th, const Tensor& tw, const std::optional<Tensor>& tb,
                   const std::optional<Tensor>& target) {
  Inputs in;
  in.sh = sh.contiguous();
  in.sw = sw.contiguous();
  in.th = th.contiguous();
  in.tw = tw.contiguous();
  if (present(sb)) in.sb = sb->contiguous();
  if (present(tb)) in.tb = tb->contiguous();
  if (present(target)) in.target = target->contiguous();
  return in;
}

double grad_factor(int64_t reduction, int64_t count) {
  if (reduction == kMean) return count == 0 ? 0.0 : 1.0 / static_cast<double>(count);
  return 1.0;
}

GradOut empty_grads(const Inputs& in, bool has_bias) {
  const int64_t N = in.sh.size(0), V = in.sw.size(0), H = in.sh.size(1);
  GradOut g;
  g.hidden = at::empty({N, H}, in.sh.options());
  g.weight = at::zeros({V, H}, in.sh.options());
  g.bias = has_bias ? at::zeros({V}, in.sh.options()) : at::empty({0}, in.sh.options());
  return g;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_distillation_forward(
    const Tensor& student_hidden, const Tensor& student_weight,
    const std::optional<Tensor>& student_bias, const Tensor& teacher_hidden,
    const Tensor& teacher_weight, const std::optional<Tensor>& teacher_bias,
    const std::optional<Tensor>& target, c10::string_view kind, double beta, double temperature,
    double alpha, int64_t ignore_index, int64_t reduction, bool compute_grad,
    int64_t chunk_rows) {
  const char* what = "linear_distillation";
  // Not differentiable itself (the public op carries the derivative): ATen calls below run
  // without autograd even when an input requires grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "pyengine ", what, ": bad reduction code ",
              reduction);
  TORCH_CHECK(!(compute_grad && reduction == kNone), "pyengine ", what,
              ": compute_grad needs reduction 'mean' or 'sum'");
  TORCH_CHECK(chunk_rows >= 0, "pyengine ", what, ": chunk_rows must be >= 0");
  const int64_t count = check_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                     teacher_weight, teacher_bias, target, ignore_index, what);
  const Options o = make_options(kind, beta, temperature, alpha, present(target), ignore_index,
                                 what);
  const Inputs in = make_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                teacher_weight, teacher_bias, target);
  const int64_t N = in.sh.size(0), V = in.sw.size(0);
  const auto opts = in.sh.options();
  Tensor stats = at::empty({N, kStatColumns}, opts);
  GradOut grads;
  if (compute_grad) {
    grads = empty_grads(in, present(student_bias));
  } else {
    grads = {at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  }
  std::vector<double> rows(N);
  AT_DISPATCH_FLOATING_TYPES(in.sh.scalar_type(), "pyengine_linear_distillation_forward", [&] {
    run_chunks<scalar_t>(in, o, pick_chunk(chunk_rows, N, V), true, compute_grad, rows.data(),
                         stats.data_ptr<scalar_t>(), nullptr, nullptr,
                         grad_factor(reduction, count), &grads);
  });
  Tensor loss;
  if (reduction == kNone) {
    loss = at::empty({N}, opts);
    AT_DISPATCH_FLOATING_TYPES(in.sh.scalar_type(), "pyengine_distill_rows", [&] {
      scalar_t* out = loss.data_ptr<scalar_t>();
      for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>(rows[i]);
    });
  } else {
    double total = 0;  // a fixed order: deterministic
    for (double v : rows) total += v;
    if (reduction == kMean) total /= static_cast<double>(count);  // 0/0: NaN, as torch's mean
    loss = at::scalar_tensor(total, opts);
  }
  return {loss, stats, grads.hidden, grads.weight, grads.bias};
}

std::tuple<Tensor, Tensor, Tensor> linear_distillation_backward(
    const Tensor& grad_loss, const Tensor& student_hidden, const Tensor& student_weight,
    const std::optional<Tensor>& student_bias, const Tensor& teacher_hidden,
    const Tensor& teacher_weight, const std::optional<Tensor>& teacher_bias,
    const std::optional<Tensor>& target, const Tensor& stats, c10::string_view kind, double beta,
    double temperature, double alpha, int64_t ignore_index, int64_t reduction,
    int64_t chunk_rows) {
  const char* what = "linear_distillation_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "pyengine ", what, ": bad reduction code ",
              reduction);
  TORCH_CHECK(chunk_rows >= 0, "pyengine ", what, ": chunk_rows must be >= 0");
  const int64_t count = check_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                     teacher_weight, teacher_bias, target, ignore_index, what);
  const Options o = make_options(kind, beta, temperature, alpha, present(target), ignore_index,
                                 what);
  const int64_t N = student_hidden.size(0), V = student_weight.size(0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == kStatColumns &&
                  stats.scalar_type() == student_hidden.scalar_type(),
              "pyengine ", what, ": stats must be [", N, ", ", kStatColumns, "] of dtype ",
              student_hidden.scalar_type(), ", got ", stats.sizes(), " ", stats.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.numel() == N, "pyengine ", what, ": grad_loss must have ", N,
                " elements for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "pyengine ", what,
                ": grad_loss must be a scalar for a reduced loss, got ", grad_loss.sizes());
  }
  const Inputs in = make_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                teacher_weight, teacher_bias, target);
  const Tensor st = stats.contiguous();
  const Tensor g64 = grad_loss.to(at::kDouble).contiguous().reshape({-1});
  const double* gp = g64.data_ptr<double>();
  GradOut grads = empty_grads(in, present(student_bias));
  AT_DISPATCH_FLOATING_TYPES(in.sh.scalar_type(), "pyengine_linear_distillation_backward", [&] {
    const double g0 = reduction == kNone ? 1.0 : gp[0] * grad_factor(reduction, count);
    run_chunks<scalar_t>(in, o, pick_chunk(chunk_rows, N, V), false, true, nullptr, nullptr,
                         st.data_ptr<scalar_t>(), reduction == kNone ? gp : nullptr, g0,
                         &grads);
  });
  return {grads.hidden, grads.weight, grads.bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("linear_distillation_forward", &linear_distillation_forward);
  m.impl("linear_distillation_backward", &linear_distillation_backward);
}

}  // namespace cpu
}  // namespace pyengine
