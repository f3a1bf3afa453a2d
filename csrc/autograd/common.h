// Shared pieces of the public ops' derivatives and autocast rules (csrc/autograd/*.cpp).
//
// Every differentiable op has one public schema (e.g. pyengine::lstm_layer) whose derivative is
// attached once, here in C++, at the Autograd key: the same for eager calls, torch.compile (which
// traces through it into the internal forward/backward ops), CPU and CUDA. Forward and backward
// are internal ops (e.g. lstm_layer_forward / lstm_layer_backward) called through the dispatcher
// below the Autograd key, so each backend's kernel runs (C++ on CPU, Triton on CUDA, the fake
// kernels under torch.compile) and nothing between them touches Python. The public op also has a
// CompositeExplicitAutograd kernel (the forward alone: no_grad, inference mode, fake tensors) and
// autocast kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

namespace pyengine {
namespace autograd {

using OptTensor = std::optional<at::Tensor>;

// The registered op `name` with the C++ signature Signature.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

inline bool requires_grad(const OptTensor& t) { return present(t) && t->requires_grad(); }

// An optional tensor as a plain one (undefined when absent), and back: what save_for_backward
// keeps. (Function::apply itself takes the optionals: an undefined plain tensor there fails.)
inline at::Tensor or_undefined(const OptTensor& t) { return present(t) ? *t : at::Tensor(); }
inline OptTensor as_optional(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// An unused output's gradient (undefined: materialize_grads is off) as the empty tensor the
// backward ops take for it.
inline at::Tensor or_empty(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::empty({0}, like.options());
}

// The backward ops are not differentiable themselves: a backward asked to build a graph
// (create_graph=True, for higher-order gradients) is refused rather than answered with
// gradients that silently count as constants.
inline void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "pyengine::", op,
              ": double backward (create_graph=True) is not supported");
}

// The Autograd kernel of an internal op: it is not differentiable (its results never require
// grad, its backends never record autograd history), so it runs below the Autograd key. A
// fallthrough would let a direct call with inputs requiring grad reach the kernels with autograd
// still on, where ATen ops they call refuse out= arguments.
inline void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                               torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

// Registers run_below_autograd for each of the internal ops `names`.
template <size_t N>
void register_internal_ops(torch::Library& m, const char* const (&names)[N]) {
  for (const char* name : names) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_below_autograd>());
  }
}

// Autocast policies: kLowerPrecision casts floating inputs to the autocast dtype (bfloat16 or
// float16, for ops whose GEMMs run on tensor cores); kFloat32 to float32 (ops computed in float32,
// as torch's own losses, and every CPU kernel here). float64 and integer tensors are left alone.
enum class CastPolicy { kLowerPrecision, kFloat32 };

struct AutocastScope {
  c10::impl::ExcludeDispatchKeyGuard no_autocast;
  c10::DeviceType device_type;
  at::ScalarType dtype;

  AutocastScope(c10::DeviceType device, CastPolicy policy)
      : no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device)),
        device_type(device),
        dtype(policy == CastPolicy::kFloat32 ? at::kFloat
                                             : at::autocast::get_autocast_dtype(device)) {}

  at::Tensor operator()(const at::Tensor& t) const {
    return at::autocast::cached_cast(dtype, t, device_type);
  }
  OptTensor operator()(const OptTensor& t) const { return present(t) ? OptTensor((*this)(*t)) : t; }
  std::vector<at::Tensor> operator()(at::TensorList ts) const {
    std::vector<at::Tensor> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back((*this)(t));
    return out;
  }
};

}  // namespace autograd
}  // namespace pyengine
