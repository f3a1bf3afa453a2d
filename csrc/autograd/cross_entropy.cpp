// The cross-entropy family's public ops and their one derivative (see csrc/autograd/common.h):
//   cross_entropy        = cross_entropy_forward's loss
//   linear_cross_entropy = linear_cross_entropy_forward's loss and count of correct rows
// When a gradient is needed, the forward asks the internal op for it from the same pass
// (compute_grad: the kernel has every row's statistics at hand then); the first backward scales
// it by the upstream gradient, or for a plain loss.backward() on the CPU hands it on as it is (no
// pass over a [V,H] tensor). A second backward through a retained graph recomputes.
// Autocast: cross_entropy runs in float32 (torch's own losses do); linear_cross_entropy in the
// autocast dtype on CUDA (its GEMMs on tensor cores, statistics in float32, loss returned in
// float32) and in float32 on the CPU.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/common.h"

namespace pyengine {
namespace autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kReductionNone = 0;

using CeForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                     const OptTensor&, const OptTensor&, int64_t,
                                                     double, double, double, int64_t, bool);
using CeBackward = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, const Tensor&, int64_t, double, double, double,
                          int64_t);
using CePublic = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                        double, double, double, int64_t);
using LceForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
    const OptTensor&, int64_t, double, double, double, int64_t, bool, bool, int64_t);
using LceBackward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const Tensor&, int64_t, double, double, double, int64_t,
    int64_t);
using LcePublic = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                             const Tensor&, const OptTensor&, const OptTensor&,
                                             int64_t, double, double, double, int64_t, bool,
                                             int64_t);

#define PYENGINE_OP(fn, Signature, name)                   \
  const c10::TypedOperatorHandle<Signature>& fn() {        \
    static const auto op = find_op<Signature>(name);       \
    return op;                                             \
  }
PYENGINE_OP(ce_forward_op, CeForward, "pyengine::cross_entropy_forward")
PYENGINE_OP(ce_backward_op, CeBackward, "pyengine::cross_entropy_backward")
PYENGINE_OP(ce_op, CePublic, "pyengine::cross_entropy")
PYENGINE_OP(lce_forward_op, LceForward, "pyengine::linear_cross_entropy_forward")
PYENGINE_OP(lce_backward_op, LceBackward, "pyengine::linear_cross_entropy_backward")
PYENGINE_OP(lce_op, LcePublic, "pyengine::linear_cross_entropy")
#undef PYENGINE_OP

// The upstream gradient of a plain loss.backward() on a real CPU tensor: exactly 1, in a
// backward that builds no graph of its own (never a fake or functional tensor being traced).
bool is_plain_one(const Tensor& grad_loss) {
  constexpr c10::DispatchKeySet traced(
      {c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return grad_loss.is_cpu() && grad_loss.numel() == 1 && !at::GradMode::is_enabled() &&
         !grad_loss.key_set().has_any(traced) && grad_loss.item<double>() == 1.0;
}

// ---- cross_entropy -------------------------------------------------------------------------------

// Saved: the forward's gradient (fused), or logits, target, weight, sample_weight and lse.
struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, const OptTensor& sample_weight,
                               int64_t ignore_index, double label_smoothing, double gamma,
                               double z_loss, int64_t reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, grad] = ce_forward_op().call(logits, target, weight, sample_weight,
                                                  ignore_index, label_smoothing, gamma, z_loss,
                                                  reduction, compute_grad);
    if (compute_grad) {
      ctx->save_for_backward({grad});
    } else {
      ctx->save_for_backward(
          {logits, target, or_undefined(weight), or_undefined(sample_weight), lse});
    }
    ctx->saved_data["fused"] = compute_grad;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["reduction"] = reduction;
    ctx->set_materialize_grads(false);
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("cross_entropy");
    variable_list result(10);
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return result;
    const variable_list s = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (ctx->saved_data["fused"].toBool()) {
      const Tensor& grad = s[0];
      const Tensor scale = reduction == kReductionNone ? grad_loss.unsqueeze(1) : grad_loss;
      result[0] = grad * scale.to(grad.scalar_type());
    } else {
      result[0] = ce_backward_op().call(
          grad_loss, s[0], s[1], as_optional(s[2]), as_optional(s[3]), s[4],
          ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
          ctx->saved_data["gamma"].toDouble(), ctx->saved_data["z_loss"].toDouble(), reduction);
    }
    return result;
  }
};

Tensor cross_entropy_autograd(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                              const OptTensor& sample_weight, int64_t ignore_index,
                              double label_smoothing, double gamma, double z_loss,
                              int64_t reduction) {
  // The gradient from the forward's pass: on CUDA for reduced losses only (the kernel's rule).
  const bool compute_grad = at::GradMode::is_enabled() && logits.requires_grad() &&
                            (reduction != kReductionNone || logits.is_cpu());
  return CrossEntropyFunction::apply(logits, target, weight, sample_weight, ignore_index,
                                     label_smoothing, gamma, z_loss, reduction, compute_grad)[0];
}

Tensor cross_entropy_plain(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                           const OptTensor& sample_weight, int64_t ignore_index,
                           double label_smoothing, double gamma, double z_loss,
                           int64_t reduction) {
  return std::get<0>(ce_forward_op().call(logits, target, weight, sample_weight, ignore_index,
                                          label_smoothing, gamma, z_loss, reduction, false));
}

template <c10::DeviceType device>
Tensor cross_entropy_autocast(const Tensor& logits, const Tensor& target,
                              const OptTensor& weight, const OptTensor& sample_weight,
                              int64_t ignore_index, double label_smoothing, double gamma,
                              double z_loss, int64_t reduction) {
  AutocastScope cast(device, CastPolicy::kFloat32);
  return ce_op().call(cast(logits), target, cast(weight), cast(sample_weight), ignore_index,
                      label_smoothing, gamma, z_loss, reduction);
}

// ---- linear_cross_entropy ------------------------------------------------------------------------

// Saved: hidden, weight, bias, target, class_weight, sample_weight, lse (for the recomputing
// backward). The fused forward's gradients are kept apart (saved_data), for the first backward
// only: once handed on they may become .grad and change in place.
struct LinearCrossEntropyFunction
    : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& hidden, const Tensor& weight,
                               const OptTensor& bias, const Tensor& target,
                               const OptTensor& class_weight, const OptTensor& sample_weight,
                               int64_t ignore_index, double label_smoothing, double gamma,
                               double z_loss, int64_t reduction, bool count_correct,
                               int64_t chunk_size, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, correct, grad_h, grad_w, grad_b] = lce_forward_op().call(
        hidden, weight, bias, target, class_weight, sample_weight, ignore_index, label_smoothing,
        gamma, z_loss, reduction, compute_grad, count_correct, chunk_size);
    ctx->save_for_backward({hidden, weight, or_undefined(bias), target,
                            or_undefined(class_weight), or_undefined(sample_weight), lse});
    if (compute_grad) ctx->saved_data["forward_grads"] = std::vector<Tensor>{grad_h, grad_w, grad_b};
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->mark_non_differentiable({correct});
    ctx->set_materialize_grads(false);
    return {loss, correct};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("linear_cross_entropy");
    variable_list result(14);
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return result;
    const variable_list s = ctx->get_saved_variables();
    const bool has_bias = s[2].defined();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor grad_h, grad_w, grad_b;
    auto kept = ctx->saved_data.find("forward_grads");
    if (kept != ctx->saved_data.end()) {
      // The first backward uses the forward's gradients and lets go of them.
      std::vector<Tensor> g = kept->second.toTensorVector();
      ctx->saved_data.erase(kept);
      if (is_plain_one(grad_loss)) {
        grad_h = g[0], grad_w = g[1], grad_b = g[2];
      } else {
        const Tensor scale = grad_loss.to(g[0].scalar_type());
        grad_h = g[0] * scale, grad_w = g[1] * scale;
        grad_b = has_bias ? g[2] * scale : g[2];
      }
    } else {  // not fused, or a second backward through a retained graph: recompute
      std::tie(grad_h, grad_w, grad_b) = lce_backward_op().call(
          grad_loss, s[0], s[1], as_optional(s[2]), s[3], as_optional(s[4]), as_optional(s[5]),
          s[6], ctx->saved_data["ignore_index"].toInt(),
          ctx->saved_data["label_smoothing"].toDouble(), ctx->saved_data["gamma"].toDouble(),
          ctx->saved_data["z_loss"].toDouble(), ctx->saved_data["reduction"].toInt(),
          ctx->saved_data["chunk_size"].toInt());
    }
    result[0] = grad_h;
    result[1] = grad_w;
    result[2] = has_bias ? grad_b : Tensor();
    return result;
  }
};

std::tuple<Tensor, Tensor> linear_cross_entropy_autograd(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    const OptTensor& class_weight, const OptTensor& sample_weight, int64_t ignore_index,
    double label_smoothing, double gamma, double z_loss, int64_t reduction, bool count_correct,
    int64_t chunk_size) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || weight.requires_grad() ||
                           requires_grad(bias));
  variable_list out = LinearCrossEntropyFunction::apply(
      hidden, weight, bias, target, class_weight, sample_weight, ignore_index, label_smoothing,
      gamma, z_loss, reduction, count_correct, chunk_size,
      needs_grad && reduction != kReductionNone);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> linear_cross_entropy_plain(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    const OptTensor& class_weight, const OptTensor& sample_weight, int64_t ignore_index,
    double label_smoothing, double gamma, double z_loss, int64_t reduction, bool count_correct,
    int64_t chunk_size) {
  auto out = lce_forward_op().call(hidden, weight, bias, target, class_weight, sample_weight,
                                   ignore_index, label_smoothing, gamma, z_loss, reduction, false,
                                   count_correct, chunk_size);
  return {std::get<0>(out), std::get<2>(out)};
}

template <c10::DeviceType device, CastPolicy policy>
std::tuple<Tensor, Tensor> linear_cross_entropy_autocast(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    const OptTensor& class_weight, const OptTensor& sample_weight, int64_t ignore_index,
    double label_smoothing, double gamma, double z_loss, int64_t reduction, bool count_correct,
    int64_t chunk_size) {
  AutocastScope cast(device, policy);
  auto [loss, correct] = lce_op().call(
      cast(hidden), cast(weight), cast(bias), target, cast(class_weight), cast(sample_weight),
      ignore_index, label_smoothing, gamma, z_loss, reduction, count_correct, chunk_size);
  return {loss.to(at::kFloat), correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
  static const char* const internal[] = {"cross_entropy_forward", "cross_entropy_backward",
                                         "linear_cross_entropy_forward",
                                         "linear_cross_entropy_backward"};
  register_internal_ops(m, internal);
}

TORCH_LIBRARY_IMPL(pyengine, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &cross_entropy_plain);
  m.impl("linear_cross_entropy", &linear_cross_entropy_plain);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCPU, m) {
  m.impl("cross_entropy", &cross_entropy_autocast<c10::DeviceType::CPU>);
  m.impl("linear_cross_entropy",
         &linear_cross_entropy_autocast<c10::DeviceType::CPU, CastPolicy::kFloat32>);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCUDA, m) {
  m.impl("cross_entropy", &cross_entropy_autocast<c10::DeviceType::CUDA>);
  m.impl("linear_cross_entropy",
         &linear_cross_entropy_autocast<c10::DeviceType::CUDA, CastPolicy::kLowerPrecision>);
}

}  // namespace autograd
}  // namespace pyengine
