// The LSTM's public ops and their one derivative (see csrc/autograd/common.h):
//   lstm_layer           = lstm_layer_forward's first three results
//   lstm_stack           = lstm_stack_forward's first three results
//   embedding_lstm_layer = embedding_lstm_layer_forward's first three results
// Autocast: the CUDA kernels run in the autocast dtype; the CPU kernels in float32.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd/common.h"

namespace pyengine {
namespace autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LayerForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, bool);
using LayerBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, bool, bool, bool);
using LayerPublic = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, bool);
using StackForward = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, const Tensor&, const Tensor&, at::TensorList, bool);
using StackBackward = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    at::TensorList, const Tensor&, at::TensorList, bool, bool);
using StackPublic = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                       const Tensor&, at::TensorList, bool);
using EmbeddingForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using EmbeddingBackward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using EmbeddingPublic = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);

#define PYENGINE_OP(fn, Signature, name)                   \
  const c10::TypedOperatorHandle<Signature>& fn() {        \
    static const auto op = find_op<Signature>(name);       \
    return op;                                             \
  }
PYENGINE_OP(layer_forward_op, LayerForward, "pyengine::lstm_layer_forward")
PYENGINE_OP(layer_backward_op, LayerBackward, "pyengine::lstm_layer_backward")
PYENGINE_OP(layer_op, LayerPublic, "pyengine::lstm_layer")
PYENGINE_OP(stack_forward_op, StackForward, "pyengine::lstm_stack_forward")
PYENGINE_OP(stack_backward_op, StackBackward, "pyengine::lstm_stack_backward")
PYENGINE_OP(stack_op, StackPublic, "pyengine::lstm_stack")
PYENGINE_OP(embedding_forward_op, EmbeddingForward, "pyengine::embedding_lstm_layer_forward")
PYENGINE_OP(embedding_backward_op, EmbeddingBackward, "pyengine::embedding_lstm_layer_backward")
PYENGINE_OP(embedding_op, EmbeddingPublic, "pyengine::embedding_lstm_layer")
#undef PYENGINE_OP

// ---- lstm_layer ------------------------------------------------------------------------------

// Saved: input, h0, c0, w_ih, w_hh, w_hr, batch_sizes (undefined when absent), then the
// forward's output, gates and cells.
struct LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, const OptTensor& batch_sizes,
                               bool reverse) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, gates, cells] =
        layer_forward_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, or_undefined(w_hr),
                            or_undefined(batch_sizes), output, gates, cells});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_b_ih"] = present(b_ih);
    ctx->saved_data["has_b_hh"] = present(b_hh);
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n};
  }

  // One gradient per forward argument; b_ih and b_hh get the same bias gradient.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("lstm_layer");
    const variable_list s = ctx->get_saved_variables();
    const bool has_b_ih = ctx->saved_data["has_b_ih"].toBool();
    const bool has_b_hh = ctx->saved_data["has_b_hh"].toBool();
    const bool input_grad = ctx->needs_input_grad(0);
    const Tensor& input = s[0];
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        layer_backward_op().call(or_empty(grads[0], input), or_empty(grads[1], input),
                                 or_empty(grads[2], input), input, s[1], s[2], s[3], s[4],
                                 as_optional(s[5]), as_optional(s[6]), s[7], s[8], s[9],
                                 ctx->saved_data["reverse"].toBool(), has_b_ih || has_b_hh,
                                 input_grad);
    return {input_grad ? grad_input : Tensor(), grad_h0, grad_c0, grad_w_ih, grad_w_hh,
            has_b_ih ? grad_bias : Tensor(), has_b_hh ? grad_bias : Tensor(),
            s[5].defined() ? grad_w_hr : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> lstm_layer_autograd(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse) {
  variable_list out =
      LstmLayerFunction::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_plain(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse) {
  auto [output, h_n, c_n, gates, cells] =
      layer_forward_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {output, h_n, c_n};
}

// The CUDA kernels run in the autocast dtype, the CPU kernels (float32, float64) in float32.
template <c10::DeviceType device, CastPolicy policy>
std::tuple<Tensor, Tensor, Tensor> lstm_layer_autocast(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse) {
  AutocastScope cast(device, policy);
  return layer_op().call(cast(input), cast(h0), cast(c0), cast(w_ih), cast(w_hh), cast(b_ih),
                         cast(b_hh), cast(w_hr), batch_sizes, reverse);
}

// ---- lstm_stack --------------------------------------------------------------------------------

// Saved, in this order: input, h0, c0, output, the weights, then the forward's saved tensors.
struct LstmStackFunction : public torch::autograd::Function<LstmStackFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& c0, at::TensorList weights, bool has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, saved] = stack_forward_op().call(input, h0, c0, weights, has_bias);
    variable_list to_save{input, h0, c0, output};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(std::move(to_save));
    ctx->saved_data["n_weights"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["has_bias"] = has_bias;
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n};
  }

  // One gradient per forward argument: input, h0, c0, each weight (b_ih and b_hh get the same
  // bias gradient), and none for has_bias.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("lstm_stack");
    const variable_list stored = ctx->get_saved_variables();
    const int64_t n_weights = ctx->saved_data["n_weights"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Tensor &input = stored[0], &h0 = stored[1], &c0 = stored[2], &output = stored[3];
    const std::vector<Tensor> weights(stored.begin() + 4, stored.begin() + 4 + n_weights);
    const std::vector<Tensor> saved(stored.begin() + 4 + n_weights, stored.end());
    const bool input_grad = ctx->needs_input_grad(0);

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_h0, grad_c0, layer_grads] = stack_backward_op().call(
        or_empty(grads[0], input), or_empty(grads[1], input), or_empty(grads[2], input), input,
        h0, c0, weights, output, saved, has_bias, input_grad);

    variable_list result{input_grad ? grad_input : Tensor(), grad_h0, grad_c0};
    const size_t per_layer = has_bias ? 3 : 2;
    for (size_t i = 0; i < layer_grads.size(); i += per_layer) {
      result.push_back(layer_grads[i]);
      result.push_back(layer_grads[i + 1]);
      if (has_bias) {
        result.push_back(layer_grads[i + 2]);
        result.push_back(layer_grads[i + 2]);
      }
    }
    result.emplace_back();  // has_bias
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> lstm_stack_autograd(const Tensor& input, const Tensor& h0,
                                                       const Tensor& c0, at::TensorList weights,
                                                       bool has_bias) {
  variable_list out = LstmStackFunction::apply(input, h0, c0, weights, has_bias);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> lstm_stack_plain(const Tensor& input, const Tensor& h0,
                                                    const Tensor& c0, at::TensorList weights,
                                                    bool has_bias) {
  auto [output, h_n, c_n, saved] = stack_forward_op().call(input, h0, c0, weights, has_bias);
  return {output, h_n, c_n};
}

template <c10::DeviceType device, CastPolicy policy>
std::tuple<Tensor, Tensor, Tensor> lstm_stack_autocast(const Tensor& input, const Tensor& h0,
                                                       const Tensor& c0, at::TensorList weights,
                                                       bool has_bias) {
  AutocastScope cast(device, policy);
  return stack_op().call(cast(input), cast(h0), cast(c0), cast(weights), has_bias);
}

// ---- embedding_lstm_layer ------------------------------------------------------------------------

// Saved: tokens, table, h0, c0, w_hh, then the forward's output, gates and cells.
struct EmbeddingLstmLayerFunction
    : public torch::autograd::Function<EmbeddingLstmLayerFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& tokens, const Tensor& table,
                               const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                               bool reverse) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, gates, cells] =
        embedding_forward_op().call(tokens, table, h0, c0, w_hh, reverse);
    ctx->save_for_backward({tokens, table, h0, c0, w_hh, output, gates, cells});
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n};
  }

  // Gradients of tokens (none), table, h0, c0, w_hh and reverse (none).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("embedding_lstm_layer");
    const variable_list s = ctx->get_saved_variables();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor& table = s[1];
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_table, grad_h0, grad_c0, grad_w_hh] = embedding_backward_op().call(
        or_empty(grads[0], table), or_empty(grads[1], table), or_empty(grads[2], table), s[0],
        table, s[2], s[3], s[4], s[5], s[6], s[7], reverse);
    return {Tensor(), grad_table, grad_h0, grad_c0, grad_w_hh, Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> embedding_lstm_layer_autograd(
    const Tensor& tokens, const Tensor& table, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, bool reverse) {
  variable_list out = EmbeddingLstmLayerFunction::apply(tokens, table, h0, c0, w_hh, reverse);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> embedding_lstm_layer_plain(
    const Tensor& tokens, const Tensor& table, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, bool reverse) {
  auto [output, h_n, c_n, gates, cells] =
      embedding_forward_op().call(tokens, table, h0, c0, w_hh, reverse);
  return {output, h_n, c_n};
}

template <c10::DeviceType device, CastPolicy policy>
std::tuple<Tensor, Tensor, Tensor> embedding_lstm_layer_autocast(
    const Tensor& tokens, const Tensor& table, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, bool reverse) {
  AutocastScope cast(device, policy);
  return embedding_op().call(tokens, cast(table), cast(h0), cast(c0), cast(w_hh), reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) {
  m.impl("lstm_layer", &lstm_layer_autograd);
  m.impl("lstm_stack", &lstm_stack_autograd);
  m.impl("embedding_lstm_layer", &embedding_lstm_layer_autograd);
  // The internal ops are not differentiable: the public ops above carry the derivative.
  static const char* const internal[] = {
      "lstm_layer_forward", "lstm_layer_backward", "lstm_stack_forward", "lstm_stack_backward",
      "embedding_lstm_layer_forward", "embedding_lstm_layer_backward"};
  register_internal_ops(m, internal);
}

TORCH_LIBRARY_IMPL(pyengine, CompositeExplicitAutograd, m) {
  m.impl("lstm_layer", &lstm_layer_plain);
  m.impl("lstm_stack", &lstm_stack_plain);
  m.impl("embedding_lstm_layer", &embedding_lstm_layer_plain);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCPU, m) {
  constexpr auto cpu = c10::DeviceType::CPU;
  m.impl("lstm_layer", &lstm_layer_autocast<cpu, CastPolicy::kFloat32>);
  m.impl("lstm_stack", &lstm_stack_autocast<cpu, CastPolicy::kFloat32>);
  m.impl("embedding_lstm_layer", &embedding_lstm_layer_autocast<cpu, CastPolicy::kFloat32>);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCUDA, m) {
  constexpr auto cuda = c10::DeviceType::CUDA;
  m.impl("lstm_layer", &lstm_layer_autocast<cuda, CastPolicy::kLowerPrecision>);
  m.impl("lstm_stack", &lstm_stack_autocast<cuda, CastPolicy::kLowerPrecision>);
  m.impl("embedding_lstm_layer",
         &embedding_lstm_layer_autocast<cuda, CastPolicy::kLowerPrecision>);
}

}  // namespace autograd
}  // namespace pyengine
