// Autocast rules of the int8 ops (not differentiable: inference kernels). Only the activations
// are cast: the weight is int8 and its scales and bias stay float32.
//   int8_linear:     the CPU kernel takes float32; the CUDA kernel float32, bfloat16 or float16
//                    (the autocast dtype), returning the activations' dtype.
//   int8_lstm_layer: float32 on both (its cell runs in float32).
#include <torch/library.h>

#include "autograd/common.h"

namespace pyengine {
namespace autograd {
namespace {

using at::Tensor;

using Int8Linear = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, int64_t, int64_t, bool);
using Int8LstmLayer = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, bool, int64_t);

const c10::TypedOperatorHandle<Int8Linear>& int8_linear_op() {
  static const auto op = find_op<Int8Linear>("pyengine::int8_linear");
  return op;
}

const c10::TypedOperatorHandle<Int8LstmLayer>& int8_lstm_layer_op() {
  static const auto op = find_op<Int8LstmLayer>("pyengine::int8_lstm_layer");
  return op;
}

template <c10::DeviceType device, CastPolicy policy>
Tensor int8_linear_autocast(const Tensor& x, const Tensor& packed, const Tensor& wsum,
                            const Tensor& scale, const OptTensor& bias, int64_t out_features,
                            int64_t act, bool raw) {
  AutocastScope cast(device, policy);
  return int8_linear_op().call(cast(x), packed, wsum, scale, bias, out_features, act, raw);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor, Tensor> int8_lstm_layer_autocast(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& packed_ih,
    const Tensor& wsum_ih, const Tensor& scale_ih, const Tensor& packed_hh,
    const Tensor& wsum_hh, const Tensor& scale_hh, const OptTensor& bias,
    const OptTensor& packed_hr, const OptTensor& wsum_hr, const OptTensor& scale_hr,
    const OptTensor& batch_sizes, bool reverse, int64_t act) {
  AutocastScope cast(device, CastPolicy::kFloat32);
  return int8_lstm_layer_op().call(cast(input), cast(h0), cast(c0), packed_ih, wsum_ih, scale_ih,
                                   packed_hh, wsum_hh, scale_hh, cast(bias), packed_hr, wsum_hr,
                                   scale_hr, batch_sizes, reverse, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, AutocastCPU, m) {
  m.impl("int8_linear", &int8_linear_autocast<c10::DeviceType::CPU, CastPolicy::kFloat32>);
  m.impl("int8_lstm_layer", &int8_lstm_layer_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCUDA, m) {
  m.impl("int8_linear",
         &int8_linear_autocast<c10::DeviceType::CUDA, CastPolicy::kLowerPrecision>);
  m.impl("int8_lstm_layer", &int8_lstm_layer_autocast<c10::DeviceType::CUDA>);
}

}  // namespace autograd
}  // namespace pyengine
