// The eager CPU entry points of the LSTM ops that carry their derivative in C++:
//   lstm_stack           = lstm_stack_forward's first three results
//   embedding_lstm_layer = embedding_lstm_layer_forward's first three results
//
// A Python autograd.Function around lstm_stack_forward cost about a tenth of a small LSTM's
// training step (hidden 128, batch 8, 32 steps): building its context and saving 17 tensors in
// the forward, then taking the GIL, unpacking them, calling the backward op through Python and
// packing the gradients back. Here forward and backward are the same ops as before, called
// through the dispatcher below the Autograd key (so fake tensors still reach their fake
// kernels), and nothing in between touches Python. torch.compile keeps using the *_forward
// ops with their Python-registered formulas.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using StackForward = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, const Tensor&, const Tensor&, at::TensorList, bool);
using StackBackward = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    at::TensorList, const Tensor&, at::TensorList, bool, bool);
using EmbeddingForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using EmbeddingBackward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<StackForward>& stack_forward_op() {
  static const auto op = find_op<StackForward>("pyengine::lstm_stack_forward");
  return op;
}

const c10::TypedOperatorHandle<StackBackward>& stack_backward_op() {
  static const auto op = find_op<StackBackward>("pyengine::lstm_stack_backward");
  return op;
}

const c10::TypedOperatorHandle<EmbeddingForward>& embedding_forward_op() {
  static const auto op = find_op<EmbeddingForward>("pyengine::embedding_lstm_layer_forward");
  return op;
}

const c10::TypedOperatorHandle<EmbeddingBackward>& embedding_backward_op() {
  static const auto op = find_op<EmbeddingBackward>("pyengine::embedding_lstm_layer_backward");
  return op;
}

// The backward ops are not differentiable themselves: a backward asked to build a graph
// (create_graph=True, for higher-order gradients) is refused rather than answered with
// gradients that silently count as constants.
void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "pyengine::", op, ": double backward "
              "(create_graph=True) is not supported; torch.nn.LSTM supports it");
}

// An unused output's gradient (undefined: materialize_grads is off) as the empty tensor the
// backward ops take for it.
Tensor or_empty(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : at::empty({0}, like.options());
}

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

std::tuple<Tensor, Tensor, Tensor> lstm_stack_autograd(const Tensor& input, const Tensor& h0,
                                                       const Tensor& c0, at::TensorList weights,
                                                       bool has_bias) {
  variable_list out = LstmStackFunction::apply(input, h0, c0, weights, has_bias);
  return {out[0], out[1], out[2]};
}

// Below the Autograd key (no_grad, inference mode): the forward alone.
std::tuple<Tensor, Tensor, Tensor> lstm_stack_plain(const Tensor& input, const Tensor& h0,
                                                    const Tensor& c0, at::TensorList weights,
                                                    bool has_bias) {
  auto [output, h_n, c_n, saved] = stack_forward_op().call(input, h0, c0, weights, has_bias);
  return {output, h_n, c_n};
}

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

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, AutogradCPU, m) {
  m.impl("lstm_stack", &lstm_stack_autograd);
  m.impl("embedding_lstm_layer", &embedding_lstm_layer_autograd);
}

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("lstm_stack", &lstm_stack_plain);
  m.impl("embedding_lstm_layer", &embedding_lstm_layer_plain);
}

}  // namespace cpu
}  // namespace pyengine
