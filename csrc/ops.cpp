// The one place pyengine's op schemas are declared. Kernels register against these names for
// the CPU key (csrc/cpu/*.cpp), the CUDA key (Triton, from pyengine/ops/*.py) and Meta/fake
// (pyengine/ops/*.py).
#include <torch/library.h>

TORCH_LIBRARY(pyengine, m) {
  // ---- LSTM (one layer, one direction, whole sequence) ---------------------------------------
  // input: [T,N,I]  h0: [N,P]  c0: [N,H]  w_ih: [4H,I]  w_hh: [4H,P]  b_ih, b_hh: [4H]
  // w_hr: [P,H] (projection, proj_size=P) or None (then P=H)
  // batch_sizes: int64 [T], non-increasing, rows active at each step (packed sequences) or None
  // returns output [T,N,P], h_n [N,P], c_n [N,H], and what backward needs:
  //         gates [T,N,4H] (activated i,f,g,o) and cells [T,N,H]
  m.def(
      "lstm_layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // Gradients of lstm_layer_forward. Undefined-by-choice results come back as empty tensors:
  // grad_input when compute_input_grad is false, grad_bias when has_bias is false,
  // grad_w_hr when w_hr is None.
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "Tensor output, Tensor gates, Tensor cells, bool reverse, bool has_bias, "
      "bool compute_input_grad) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
}
