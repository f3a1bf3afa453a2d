// CPU kernels of the cross-entropy family (schemas in csrc/ops.cpp):
//   cross_entropy_forward / cross_entropy_backward        (logits given)
//   linear_cross_entropy_forward / _backward              (logits = hidden @ weight^T + bias,
//                                                          computed chunk by chunk, never whole)
//
// Per element (row x of C logits, target t, class weights w (1 when absent), sample weight s):
//   lse    = log sum_j exp(x_j)              logp_j = x_j - lse,  p_j = exp(logp_j)
//   A      = (1-eps) w_t (-logp_t) + eps/C sum_j w_j (-logp_j)     (torch's smoothed CE)
//   F      = (1 - p_t)^gamma                                       (focal modulation, 1 if gamma=0)
//   loss   = s * (F * A + z * lse^2);         0 for target == ignore_index
// Gradient w.r.t. x_k, with G = gamma p_t (1-p_t)^(gamma-1) and W = sum_j w_j:
//   dx_k = s * [ p_k (F ((1-eps) w_t + eps/C W) + A G + 2 z lse) - F eps/C w_k
//                - [k == t] (F (1-eps) w_t + A G) ]
// Reductions: none (per element), sum, mean = sum / sum_{not ignored} s w_t (torch's divisor).
//
// One row is two passes over its logits in cache (max; sum of exp and the smoothing sum) plus a
// third that turns the stored exp(x_j - max) into the gradient in place when asked (one exp per
// element, exact at logits of 1e4). The backward ops recompute those statistics instead of
// trusting a stored float32 logsumexp. Rows are independent: at::parallel_for.
// linear_cross_entropy keeps one chunk buffer per calling thread between calls (at most 8M
// logits): a fresh multi-MB allocation per call would cost its page faults every step.
// Every target is bound-checked before any row is read; an out-of-range target is an error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/recent_blocks.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// ---- row passes: float32 through the kernel table (csrc/cpu/kernels/cross_entropy.h), float64
// here (accumulated in double) ----------------------------------------------------------------

double row_max(const float* x, int64_t C) { return kernels().cross_entropy.row_max(x, C); }

double row_max(const double* x, int64_t C) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < C; ++j) {
    if (std::isnan(x[j])) return x[j];
    m = std::max(m, x[j]);
  }
  return m;
}

// sum_j exp(x_j - m) and, when smooth, sum_j w_j (x_j - m) (w_j = 1 without class weights).
// When e is given, e_j = exp(x_j - m) is stored there (e may equal x: each element is read
// before it is overwritten), so the gradient pass needs no second exp.
void row_sums(const float* x, int64_t C, double m, const float* w, bool smooth, float* e,
              double* sumexp, double* wsum) {
  kernels().cross_entropy.row_sums(x, C, m, w, smooth, e, sumexp, wsum);
}

void row_sums(const double* x, int64_t C, double m, const double* w, bool smooth, double* e,
              double* sumexp, double* wsum) {
  double se = 0, sw = 0;
  for (int64_t j = 0; j < C; ++j) {
    const double d = x[j] - m;
    const double ej = std::exp(d);
    if (e) e[j] = ej;
    se += ej;
    if (smooth) sw += (w ? w[j] : 1.0) * d;
  }
  *sumexp = se;
  *wsum = sw;
}

// e_j <- a * e_j - b * w_j   (w_j = 1 without class weights; no w_j term at all when b = 0)
void row_finish(float* e, int64_t C, double a, double b, const float* w) {
  kernels().cross_entropy.row_finish(e, C, a, b, w);
}

void row_finish(double* e, int64_t C, double a, double b, const double* w) {
  if (b == 0) {
    for (int64_t j = 0; j < C; ++j) e[j] = a * e[j];
    return;
  }
  for (int64_t j = 0; j < C; ++j) e[j] = a * e[j] - b * (w ? w[j] : 1.0);
}

// ---- one row ---------------------------------------------------------------------------------

struct Options {
  int64_t C;
  int64_t ignore_index;
  double eps, gamma, z;
  double w_total;  // sum_j w_j (C without class weights)
};

struct RowResult {
  double loss = 0;  // s * (F A + z lse^2)
  double lse = 0;
  bool correct = false;
};

// Loss (and, when dx is given, g * dloss/dx written to dx, in place allowed) of one row.
// Three passes: max (and argmax when want_argmax); exp(x - max) summed and stored into dx, with
// the smoothing sum; then dx scaled into the gradient. One exp per element. The statistics are
// always recomputed from the logits (a stored float32 logsumexp has lost the precision that
// exp(x - lse) needs at large logits).
template <typename T>
RowResult ce_row(const T* x, int64_t t, double s, const T* w, const Options& o, double g, T* dx,
                 bool want_argmax) {
  RowResult r;
  const int64_t C = o.C;
  if (t == o.ignore_index) {
    if (dx) std::fill(dx, dx + C, T(0));
    r.lse = 0;
    return r;
  }
  const bool smooth = o.eps > 0;
  const double x_t = static_cast<double>(x[t]);  // read before dx (maybe x) is written
  double sw = 0, se = 0;
  const double m = row_max(x, C);
  if (want_argmax) {  // the first index holding the max (or the first NaN), as torch.argmax
    int64_t arg = 0;
    if (std::isnan(m)) {
      while (arg < C && !std::isnan(x[arg])) ++arg;
    } else {
      const T mx = static_cast<T>(m);
      while (arg < C && x[arg] != mx) ++arg;
    }
    r.correct = arg == t;
  }
  row_sums(x, C, m, w, smooth, dx, &se, &sw);  // dx now holds exp(x - m)
  const double lse_rel = std::log(se);
  const double lse = m + lse_rel;
  const double wt = w ? static_cast<double>(w[t]) : 1.0;
  const double logp_t = (x_t - m) - lse_rel;
  double A = (1 - o.eps) * wt * (-logp_t);
  if (smooth) A += o.eps / C * (o.w_total * lse_rel - sw);
  double F = 1, G = 0;
  if (o.gamma > 0) {
    const double p_t = std::exp(logp_t);
    const double omp = -std::expm1(logp_t);  // 1 - p_t, accurate near p_t = 1
    F = std::pow(omp, o.gamma);
    if (omp > 0) {
      G = o.gamma * p_t * std::pow(omp, o.gamma - 1);
    } else {
      G = o.gamma == 1 ? p_t : 0.0;
    }
  }
  r.lse = lse;
  r.loss = s * (F * A + (o.z > 0 ? o.z * lse * lse : 0.0));
  if (dx) {
    // dx_k = g s (P p_k - Wc w_k - [k == t] Tc). A term enters only when its option is on, so
    // that an option at 0 never multiplies an infinite or NaN value into the gradient (an
    // unused NaN class weight through eps = 0, an infinite loss through gamma = 0).
    double P = F * (1 - o.eps) * wt, Tc = P, Wc = 0;
    if (smooth) {
      Wc = F * o.eps / C;
      P += Wc * o.w_total;
    }
    if (o.gamma > 0) {
      P += A * G;
      Tc += A * G;
    }
    if (o.z > 0) P += 2 * o.z * lse;
    const double gs = g * s;
    row_finish(dx, C, gs * P / se, smooth ? gs * Wc : 0.0, w);  // p_j = exp(x_j - m) / se
    // the target's element scaled last, as torch scales the element's gradient by s
    dx[t] = static_cast<T>(gs * (P * std::exp(logp_t) - Wc * wt - Tc));
  }
  return r;
}

// ---- shared checks ---------------------------------------------------------------------------

// Bound-checks every target and returns the mean divisor sum_{t != ignore} s_i w[t_i].
double check_targets(const Tensor& target, int64_t C, int64_t ignore_index,
                     const std::optional<Tensor>& weight, const std::optional<Tensor>& sample_weight) {
  TORCH_CHECK(target.dim() == 1 && target.scalar_type() == at::kLong,
              "pyengine cross_entropy: target must be a 1-D int64 tensor, got ", target.sizes(),
              " ", target.scalar_type());
  const int64_t N = target.size(0);
  const Tensor t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  Tensor w64, s64;
  const double* wp = nullptr;
  const double* sp = nullptr;
  if (weight.has_value() && weight->defined()) {
    w64 = weight->to(at::kDouble).contiguous();
    wp = w64.data_ptr<double>();
  }
  if (sample_weight.has_value() && sample_weight->defined()) {
    s64 = sample_weight->to(at::kDouble).contiguous();
    sp = s64.data_ptr<double>();
  }
  double total = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t ti = tp[i];
    if (ti == ignore_index) continue;
    TORCH_CHECK(ti >= 0 && ti < C, "pyengine cross_entropy: target ", ti, " at position ", i,
                " is out of range: targets must be in [0, ", C, ") or equal ignore_index (",
                ignore_index, ")");
    total += (wp ? wp[ti] : 1.0) * (sp ? sp[i] : 1.0);
  }
  return total;
}

void check_common(const Tensor& x2d, const Tensor& target, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& sample_weight, int64_t C, const char* what) {
  TORCH_CHECK(x2d.scalar_type() == at::kFloat || x2d.scalar_type() == at::kDouble,
              "pyengine ", what, ": CPU supports float32 and float64, got ", x2d.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x2d.size(0), "pyengine ", what,
              ": target must have shape [", x2d.size(0), "], got ", target.sizes());
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C, "pyengine ", what,
                ": weight must have shape [", C, "], got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == x2d.scalar_type(), "pyengine ", what,
                ": weight must have dtype ", x2d.scalar_type());
  }
  if (sample_weight.has_value() && sample_weight->defined()) {
    TORCH_CHECK(sample_weight->dim() == 1 && sample_weight->size(0) == x2d.size(0), "pyengine ",
                what, ": sample_weight must have shape [", x2d.size(0), "], got ",
                sample_weight->sizes());
  }
}

template <typename T>
struct Prepared {
  Tensor target, weight, sw;  // contiguous; weight in T, sw in double
  const int64_t* tp = nullptr;
  const T* wp = nullptr;
  const double* sp = nullptr;
  Options opt;
};

template <typename T>
Prepared<T> prepare(const Tensor& target, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& sample_weight, int64_t C, int64_t ignore_index,
                    double eps, double gamma, double z) {
  // The Python layer refuses these by name; a NaN gamma would otherwise act as gamma = 0.
  TORCH_CHECK(eps >= 0 && eps <= 1, "pyengine cross_entropy: label_smoothing must be in [0, 1], "
              "got ", eps);
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0, "pyengine cross_entropy: gamma must be a "
              "finite number >= 0, got ", gamma);
  TORCH_CHECK(std::isfinite(z) && z >= 0, "pyengine cross_entropy: z_loss must be a finite "
              "number >= 0, got ", z);
  Prepared<T> p;
  p.target = target.contiguous();
  p.tp = p.target.template data_ptr<int64_t>();
  p.opt = Options{C, ignore_index, eps, gamma, z, static_cast<double>(C)};
  if (weight.has_value() && weight->defined()) {
    p.weight = weight->contiguous();
    p.wp = p.weight.template data_ptr<T>();
    p.opt.w_total = p.weight.to(at::kDouble).sum().template item<double>();
  }
  if (sample_weight.has_value() && sample_weight->defined()) {
    p.sw = sample_weight->to(at::kDouble).contiguous();
    p.sp = p.sw.template data_ptr<double>();
  }
  return p;
}

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// Reduced loss from per-row losses, summed in a fixed order (deterministic).
Tensor reduce_rows(const std::vector<double>& rows, int64_t reduction, double divisor,
                   const at::TensorOptions& opts) {
  double total = 0;
  for (double v : rows) total += v;
  if (reduction == kMean) total = total / divisor;  // 0/0 = NaN when every target is ignored
  return at::scalar_tensor(total, opts);
}

double grad_factor(int64_t reduction, double divisor) {
  if (reduction == kMean) return divisor == 0 ? 0.0 : 1.0 / divisor;
  return 1.0;
}

// ---- cross_entropy ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> cross_entropy_forward(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& sample_weight, int64_t ignore_index, double label_smoothing,
    double gamma, double z_loss, int64_t reduction, bool compute_grad) {
  TORCH_CHECK(logits.dim() == 2, "pyengine cross_entropy: logits must be 2-D [N, C], got ",
              logits.sizes());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "pyengine cross_entropy: bad reduction code ",
              reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C > 0, "pyengine cross_entropy: logits need at least one class");
  check_common(logits, target, weight, sample_weight, C, "cross_entropy");
  const double divisor = check_targets(target, C, ignore_index, weight, sample_weight);
  const Tensor x = logits.contiguous();
  Tensor lse = at::empty({N}, x.options());
  Tensor grad = compute_grad ? recent_empty({N, C}, x.scalar_type()) : at::empty({0}, x.options());
  std::vector<double> rows(N);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyengine_cross_entropy_forward", [&] {
    auto p = prepare<scalar_t>(target, weight, sample_weight, C, ignore_index, label_smoothing,
                               gamma, z_loss);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const double g = grad_factor(reduction, divisor);
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const RowResult r =
            ce_row<scalar_t>(xp + i * C, p.tp[i], p.sp ? p.sp[i] : 1.0, p.wp, p.opt, g,
                             gp ? gp + i * C : nullptr, false);
        rows[i] = r.loss;
        lp[i] = static_cast<scalar_t>(r.lse);
      }
    });
  });
  Tensor loss;
  if (reduction == kNone) {
    loss = at::empty({N}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyengine_ce_rows", [&] {
      scalar_t* out = loss.data_ptr<scalar_t>();
      for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>(rows[i]);
    });
  } else {
    loss = reduce_rows(rows, reduction, divisor, x.options());
  }
  return {loss, lse, grad};
}

Tensor cross_entropy_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                              const std::optional<Tensor>& weight,
                              const std::optional<Tensor>& sample_weight, const Tensor& lse,
                              int64_t ignore_index, double label_smoothing, double gamma,
                              double z_loss, int64_t reduction) {
  TORCH_CHECK(logits.dim() == 2, "pyengine cross_entropy_backward: logits must be 2-D");
  const int64_t N = logits.size(0), C = logits.size(1);
  check_common(logits, target, weight, sample_weight, C, "cross_entropy_backward");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, "pyengine cross_entropy_backward: lse must be [N]");
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.numel() == N, "pyengine cross_entropy_backward: grad_loss must have ",
                N, " elements for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "pyengine cross_entropy_backward: grad_loss must be a "
                "scalar for a reduced loss, got ", grad_loss.sizes());
  }
  const double divisor = check_targets(target, C, ignore_index, weight, sample_weight);
  const Tensor x = logits.contiguous();
  const Tensor gl = grad_loss.to(at::kDouble).contiguous().reshape({-1});
  Tensor grad = recent_empty({N, C}, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyengine_cross_entropy_backward", [&] {
    auto p = prepare<scalar_t>(target, weight, sample_weight, C, ignore_index, label_smoothing,
                               gamma, z_loss);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* gp = gl.data_ptr<double>();
    scalar_t* dp = grad.data_ptr<scalar_t>();
    const double f = grad_factor(reduction, divisor);
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const double g = reduction == kNone ? gp[i] : gp[0] * f;
        ce_row<scalar_t>(xp + i * C, p.tp[i], p.sp ? p.sp[i] : 1.0, p.wp, p.opt, g, dp + i * C,
                         false);
      }
    });
  });
  return grad;
}

// ---- linear_cross_entropy --------------------------------------------------------------------

int64_t pick_chunk(int64_t chunk_size, int64_t N, int64_t V) {
  int64_t c = chunk_size;
  if (c <= 0) {  // about 8M logits (32 MB in float32) per chunk, 64..4096 rows
    c = std::min<int64_t>(4096, std::max<int64_t>(64, (int64_t(1) << 23) / std::max<int64_t>(V, 1)));
  }
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(N, 1)));
}

void check_linear(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                  const Tensor& target, const std::optional<Tensor>& class_weight,
                  const std::optional<Tensor>& sample_weight) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "pyengine linear_cross_entropy: hidden [N,H] and weight [V,H] expected, got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "pyengine linear_cross_entropy: weight needs at least one row");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(),
              "pyengine linear_cross_entropy: hidden and weight dtypes differ");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == weight.scalar_type(),
                "pyengine linear_cross_entropy: bias must be [V] of weight's dtype");
  }
  check_common(hidden, target, class_weight, sample_weight, weight.size(0), "linear_cross_entropy");
}

// The [rows, V] logits buffer, reused across calls from the same thread.
Tensor chunk_buffer(int64_t rows, int64_t V, const at::TensorOptions& opts) {
  static thread_local Tensor cache;
  const int64_t need = rows * V;
  if (!cache.defined() || cache.scalar_type() != opts.dtype().toScalarType() ||
      cache.numel() < need) {
    cache = Tensor();  // free the old one first
    cache = at::empty({need}, opts);
  }
  return cache.narrow(0, 0, need).view({rows, V});
}

// Runs the chunked pass. With grads: grad_scale per row is g_rows[i] (reduction none) or g0.
template <typename scalar_t>
void linear_pass(const Tensor& h, const Tensor& W, const std::optional<Tensor>& bias,
                 const Prepared<scalar_t>& p, int64_t chunk, double* rows, scalar_t* lse_out, int64_t* correct, bool want_grad,
                 const double* g_rows, double g0, Tensor* grad_h, Tensor* grad_W, Tensor* grad_b) {
  const int64_t N = h.size(0), V = W.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor buf = chunk_buffer(std::min(chunk, N), V, h.options());
  const Tensor Wt = W.t();
  std::vector<int64_t> corr(N, 0);
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows_here = std::min(chunk, N - start);
    Tensor hc = h.narrow(0, start, rows_here);
    Tensor lc = buf.narrow(0, 0, rows_here);
    if (has_bias) {
      gemm_bias_into(lc, *bias, hc, Wt);
    } else {
      gemm_into(lc, hc, Wt);
    }
    scalar_t* lp = lc.data_ptr<scalar_t>();
    at::parallel_for(0, rows_here, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = start + r;
        const double g = g_rows ? g_rows[i] : g0;
        const RowResult res = ce_row<scalar_t>(lp + r * V, p.tp[i], p.sp ? p.sp[i] : 1.0, p.wp,
                                               p.opt, g, want_grad ? lp + r * V : nullptr,
                                               correct != nullptr);
        if (rows) rows[i] = res.loss;
        if (lse_out) lse_out[i] = static_cast<scalar_t>(res.lse);
        corr[i] = res.correct ? 1 : 0;
      }
    });
    if (want_grad) {
      Tensor gh = grad_h->narrow(0, start, rows_here);
      gemm_into(gh, lc, W);
      gemm_accumulate(*grad_W, lc.t(), hc);
      if (has_bias) grad_b->add_(lc.sum(0));
    }
  }
  if (correct) {
    int64_t c = 0;
    for (int64_t v : corr) c += v;
    *correct = c;
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_forward(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& target, const std::optional<Tensor>& class_weight,
    const std::optional<Tensor>& sample_weight, int64_t ignore_index, double label_smoothing,
    double gamma, double z_loss, int64_t reduction, bool compute_grad, bool count_correct,
    int64_t chunk_size) {
  check_linear(hidden, weight, bias, target, class_weight, sample_weight);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "pyengine linear_cross_entropy: bad reduction");
  TORCH_CHECK(!(compute_grad && reduction == kNone),
              "pyengine linear_cross_entropy: compute_grad needs reduction 'mean' or 'sum'");
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const double divisor = check_targets(target, V, ignore_index, class_weight, sample_weight);
  const Tensor h = hidden.contiguous();
  const Tensor W = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor lse = at::empty({N}, h.options());
  Tensor grad_h = compute_grad ? recent_empty({N, H}, h.scalar_type()) : at::empty({0}, h.options());
  Tensor grad_W = compute_grad ? recent_zeros({V, H}, h.scalar_type()) : at::empty({0}, h.options());
  Tensor grad_b = compute_grad && has_bias ? at::zeros({V}, h.options()) : at::empty({0}, h.options());
  std::vector<double> rows(N);
  int64_t correct = 0;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pyengine_linear_cross_entropy_forward", [&] {
    auto p = prepare<scalar_t>(target, class_weight, sample_weight, V, ignore_index,
                               label_smoothing, gamma, z_loss);
    linear_pass<scalar_t>(h, W, bias, p, pick_chunk(chunk_size, N, V), rows.data(),
                          lse.data_ptr<scalar_t>(), count_correct ? &correct : nullptr,
                          compute_grad, nullptr, grad_factor(reduction, divisor), &grad_h,
                          &grad_W, &grad_b);
  });
  Tensor loss;
  if (reduction == kNone) {
    loss = at::empty({N}, h.options());
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pyengine_lce_rows", [&] {
      scalar_t* out = loss.data_ptr<scalar_t>();
      for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>(rows[i]);
    });
  } else {
    loss = reduce_rows(rows, reduction, divisor, h.options());
  }
  Tensor correct_t = at::scalar_tensor(correct, h.options().dtype(at::kLong));
  return {loss, lse, correct_t, grad_h, grad_W, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& target,
    const std::optional<Tensor>& class_weight, const std::optional<Tensor>& sample_weight,
    const Tensor& lse, int64_t ignore_index, double label_smoothing, double gamma, double z_loss,
    int64_t reduction, int64_t chunk_size) {
  check_linear(hidden, weight, bias, target, class_weight, sample_weight);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N,
              "pyengine linear_cross_entropy_backward: lse must be [N]");
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.numel() == N, "pyengine linear_cross_entropy_backward: grad_loss must "
                "have ", N, " elements for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "pyengine linear_cross_entropy_backward: grad_loss must "
                "be a scalar for a reduced loss, got ", grad_loss.sizes());
  }
  const double divisor = check_targets(target, V, ignore_index, class_weight, sample_weight);
  const Tensor h = hidden.contiguous();
  const Tensor W = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor g64 = grad_loss.to(at::kDouble).contiguous().reshape({-1});
  Tensor grad_h = recent_empty({N, H}, h.scalar_type());
  Tensor grad_W = recent_zeros({V, H}, h.scalar_type());
  Tensor grad_b = has_bias ? at::zeros({V}, h.options()) : at::empty({0}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pyengine_linear_cross_entropy_backward", [&] {
    auto p = prepare<scalar_t>(target, class_weight, sample_weight, V, ignore_index,
                               label_smoothing, gamma, z_loss);
    const double* gp = g64.data_ptr<double>();
    linear_pass<scalar_t>(h, W, bias, p, pick_chunk(chunk_size, N, V), nullptr, nullptr, nullptr, true, reduction == kNone ? gp : nullptr,
                          reduction == kNone ? 1.0 : gp[0] * grad_factor(reduction, divisor),
                          &grad_h, &grad_W, &grad_b);
  });
  return {grad_h, grad_W, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("linear_cross_entropy_forward", &linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace cpu
}  // namespace pyengine
