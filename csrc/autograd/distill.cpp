// The public op linear_distillation above the backends: its derivative, attached once for every
// backend (the Autograd key), its forward below autograd (CompositeExplicitAutograd: no_grad,
// inference mode, fake tensors), and its autocast rules.
//
// Forward and backward are the internal ops linear_distillation_forward / _backward, called
// through the dispatcher below the Autograd key, so each backend's kernel runs (C++ on CPU,
// Triton on CUDA, the fake kernels under torch.compile) and nothing here touches Python.
// When the loss is reduced (mean/sum) and a student input needs a gradient, the forward asks
// the internal op for the student's gradients from the same chunked pass (compute_grad); the
// first backward scales them by the upstream gradient and hands them on. A second backward
// through a retained graph, and reduction='none', recompute them chunk by chunk. The teacher
// never gets a gradient.
//
// Autocast: on CPU the op runs in float32 (the CPU kernel is float32/float64); on CUDA in the
// autocast dtype (bfloat16/float16 GEMMs on tensor cores; the row statistics are float32 in the
// kernel whatever the input).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "autograd/common.h"

namespace pyengine {
namespace autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, c10::string_view, double, double, double, int64_t,
    int64_t, bool, int64_t);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const Tensor&, c10::string_view, double, double, double,
    int64_t, int64_t, int64_t);
using PublicSignature = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                               const Tensor&, const OptTensor&, const OptTensor&,
                               c10::string_view, double, double, double, int64_t, int64_t);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = find_op<ForwardSignature>("pyengine::linear_distillation_forward");
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = find_op<BackwardSignature>("pyengine::linear_distillation_backward");
  return op;
}

const c10::TypedOperatorHandle<PublicSignature>& public_op() {
  static const auto op = find_op<PublicSignature>("pyengine::linear_distillation");
  return op;
}

// Saved tensors, in this order (undefined where an optional input was None).
enum Saved { kStudentHidden, kStudentWeight, kStudentBias, kTeacherHidden, kTeacherWeight,
             kTeacherBias, kTarget, kStats };

struct LinearDistillationFunction
    : public torch::autograd::Function<LinearDistillationFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& student_hidden,
                        const Tensor& student_weight, const OptTensor& student_bias,
                        const Tensor& teacher_hidden, const Tensor& teacher_weight,
                        const OptTensor& teacher_bias, const OptTensor& target,
                        c10::string_view kind, double beta, double temperature, double alpha,
                        int64_t ignore_index, int64_t reduction, bool student_needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool fused = student_needs_grad && reduction != 0;
    auto [loss, stats, grad_hidden, grad_weight, grad_bias] = forward_op().call(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
        teacher_bias, target, kind, beta, temperature, alpha, ignore_index, reduction, fused, 0);
    ctx->save_for_backward({student_hidden, student_weight, student_bias.value_or(Tensor()),
                            teacher_hidden, teacher_weight, teacher_bias.value_or(Tensor()),
                            target.value_or(Tensor()), stats});
    ctx->saved_data["kind"] = std::string(kind);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    if (fused) {
      // Kept as plain data, not saved variables: once handed on they may become .grad and
      // change in place, which a saved variable's version check would refuse.
      ctx->saved_data["fused_grads"] = std::vector<Tensor>{grad_hidden, grad_weight, grad_bias};
    }
    ctx->set_materialize_grads(false);
    return loss;
  }

  // One gradient per forward argument: the student's hidden, weight and bias; none for the
  // teacher, the target and the options.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("linear_distillation");
    variable_list result(14);
    const Tensor& grad_loss = grads[0];
    const variable_list s = ctx->get_saved_variables();
    const bool has_bias = s[kStudentBias].defined();
    const bool wanted = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) ||
                        (has_bias && ctx->needs_input_grad(2));
    auto fused = ctx->saved_data.find("fused_grads");
    if (!grad_loss.defined() || !wanted) return result;
    Tensor grad_hidden, grad_weight, grad_bias;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (fused != ctx->saved_data.end()) {
      // The first backward: the forward's gradients times the upstream (scalar) gradient, then
      // let go of, so a second backward recomputes.
      std::vector<Tensor> g = fused->second.toTensorVector();
      ctx->saved_data.erase(fused);
      grad_hidden = g[0].mul_(grad_loss);
      grad_weight = g[1].mul_(grad_loss);
      grad_bias = has_bias ? g[2].mul_(grad_loss) : Tensor();
    } else {
      std::tie(grad_hidden, grad_weight, grad_bias) = backward_op().call(
          grad_loss, s[kStudentHidden], s[kStudentWeight], as_optional(s[kStudentBias]),
          s[kTeacherHidden], s[kTeacherWeight], as_optional(s[kTeacherBias]),
          as_optional(s[kTarget]), s[kStats], ctx->saved_data["kind"].toStringRef(),
          ctx->saved_data["beta"].toDouble(), ctx->saved_data["temperature"].toDouble(),
          ctx->saved_data["alpha"].toDouble(), ctx->saved_data["ignore_index"].toInt(),
          ctx->saved_data["reduction"].toInt(), 0);
    }
    result[0] = grad_hidden;
    result[1] = grad_weight;
    if (has_bias) result[2] = grad_bias;
    return result;
  }
};

Tensor linear_distillation_autograd(const Tensor& student_hidden, const Tensor& student_weight,
                                    const OptTensor& student_bias, const Tensor& teacher_hidden,
                                    const Tensor& teacher_weight, const OptTensor& teacher_bias,
                                    const OptTensor& target, c10::string_view kind, double beta,
                                    double temperature, double alpha, int64_t ignore_index,
                                    int64_t reduction) {
  const bool student_needs_grad =
      at::GradMode::is_enabled() &&
      (student_hidden.requires_grad() || student_weight.requires_grad() ||
       (present(student_bias) && student_bias->requires_grad()));
  return LinearDistillationFunction::apply(student_hidden, student_weight, student_bias,
                                           teacher_hidden, teacher_weight, teacher_bias, target,
                                           kind, beta, temperature, alpha, ignore_index,
                                           reduction, student_needs_grad);
}

// Below autograd: the forward alone.
Tensor linear_distillation_plain(const Tensor& student_hidden, const Tensor& student_weight,
                                 const OptTensor& student_bias, const Tensor& teacher_hidden,
                                 const Tensor& teacher_weight, const OptTensor& teacher_bias,
                                 const OptTensor& target, c10::string_view kind, double beta,
                                 double temperature, double alpha, int64_t ignore_index,
                                 int64_t reduction) {
  return std::get<0>(forward_op().call(student_hidden, student_weight, student_bias,
                                       teacher_hidden, teacher_weight, teacher_bias, target, kind,
                                       beta, temperature, alpha, ignore_index, reduction, false,
                                       0));
}

// Autocast: float32 on the CPU, the autocast dtype on CUDA (see the file comment).
template <c10::DeviceType device, CastPolicy policy>
Tensor linear_distillation_autocast(const Tensor& student_hidden, const Tensor& student_weight,
                                    const OptTensor& student_bias, const Tensor& teacher_hidden,
                                    const Tensor& teacher_weight, const OptTensor& teacher_bias,
                                    const OptTensor& target, c10::string_view kind, double beta,
                                    double temperature, double alpha, int64_t ignore_index,
                                    int64_t reduction) {
  AutocastScope cast(device, policy);
  return public_op().call(cast(student_hidden), cast(student_weight), cast(student_bias),
                          cast(teacher_hidden), cast(teacher_weight), cast(teacher_bias), target,
                          kind, beta, temperature, alpha, ignore_index, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) {
  m.impl("linear_distillation", &linear_distillation_autograd);
  // The internal ops are not differentiable: the public op above carries the derivative.
  static const char* const internal[] = {"linear_distillation_forward",
                                         "linear_distillation_backward"};
  register_internal_ops(m, internal);
}

TORCH_LIBRARY_IMPL(pyengine, CompositeExplicitAutograd, m) {
  m.impl("linear_distillation", &linear_distillation_plain);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCPU, m) {
  m.impl("linear_distillation",
         &linear_distillation_autocast<c10::DeviceType::CPU, CastPolicy::kFloat32>);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCUDA, m) {
  m.impl("linear_distillation",
         &linear_distillation_autocast<c10::DeviceType::CUDA, CastPolicy::kLowerPrecision>);
}

}  // namespace autograd
}  // namespace pyengine
