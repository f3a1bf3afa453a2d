// lstm_stack: lstm_stack_forward with its derivative attached in C++, for eager calls on CPU.
//
// The Python autograd.Function around lstm_stack_forward cost about a tenth of a small LSTM's
// training step (hidden 128, batch 8, 32 steps): building its context and saving 17 tensors in
// the forward, then taking the GIL, unpacking them, calling the backward op through Python and
// packing the gradients back. Here the forward and backward are the same two ops, called
// through the dispatcher below the Autograd key (so fake tensors still reach their fake
// kernels), and nothing in between touches Python. torch.compile keeps using
// lstm_stack_forward with its Python-registered formula.
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

const c10::TypedOperatorHandle<StackForward>& stack_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyengine::lstm_stack_forward", "")
                             .typed<StackForward>();
  return op;
}

const c10::TypedOperatorHandle<StackBackward>& stack_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyengine::lstm_stack_backward", "")
                             .typed<StackBackward>();
  return op;
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
    const variable_list stored = ctx->get_saved_variables();
    const int64_t n_weights = ctx->saved_data["n_weights"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Tensor &input = stored[0], &h0 = stored[1], &c0 = stored[2], &output = stored[3];
    const std::vector<Tensor> weights(stored.begin() + 4, stored.begin() + 4 + n_weights);
    const std::vector<Tensor> saved(stored.begin() + 4 + n_weights, stored.end());
    const Tensor empty = at::empty({0}, input.options());
    auto or_empty = [&](const Tensor& g) { return g.defined() ? g : empty; };
    const bool input_grad = ctx->needs_input_grad(0);

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_h0, grad_c0, layer_grads] = stack_backward_op().call(
        or_empty(grads[0]), or_empty(grads[1]), or_empty(grads[2]), input, h0, c0, weights, output,
        saved, has_bias, input_grad);

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

// Below the Autograd key (no_grad, inference mode): the forward alone.
std::tuple<Tensor, Tensor, Tensor> lstm_stack_plain(const Tensor& input, const Tensor& h0,
                                                    const Tensor& c0, at::TensorList weights,
                                                    bool has_bias) {
  auto [output, h_n, c_n, saved] = stack_forward_op().call(input, h0, c0, weights, has_bias);
  return {output, h_n, c_n};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, AutogradCPU, m) { m.impl("lstm_stack", &lstm_stack_autograd); }

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("lstm_stack", &lstm_stack_plain); }

}  // namespace cpu
}  // namespace pyengine
