// The one place pyengine's op schemas are declared. Each differentiable op has a public schema
// (lstm_layer, lstm_stack, embedding_lstm_layer, cross_entropy, linear_cross_entropy) whose one
// derivative and autocast rules are attached in C++ for every backend (csrc/autograd/), over
// internal *_forward / *_backward ops that hold the kernels: CPU (csrc/cpu/*.cpp), CUDA (Triton,
// registered from pyengine/ops/*.py) and Meta/fake (pyengine/ops/*.py).
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
  // The public op: lstm_layer_forward's first three results, differentiable (csrc/autograd).
  m.def(
      "lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)");
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
  // A plain multi-layer LSTM (one direction, no projection, no packing, no dropout) as one op:
  // each layer is lstm_layer_forward, without a call, a validation and an autograd node per
  // layer. weights: per layer w_ih [4H,I_l], w_hh [4H,H] and, with has_bias, b_ih, b_hh [4H].
  // h0, c0: [L,N,H]. returns output [T,N,H], h_n, c_n [L,N,H] and what backward needs:
  // per layer gates, cells and (all but the last) the layer's output.
  m.def(
      "lstm_stack_forward(Tensor input, Tensor h0, Tensor c0, Tensor[] weights, bool has_bias) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor[] saved)");
  // The public op: lstm_stack_forward's first three results, differentiable (csrc/autograd).
  m.def(
      "lstm_stack(Tensor input, Tensor h0, Tensor c0, Tensor[] weights, bool has_bias) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)");
  // grad_weights: per layer grad_w_ih, grad_w_hh and (has_bias) the bias gradient (b_ih's and
  // b_hh's alike). grad_input is empty unless compute_input_grad.
  m.def(
      "lstm_stack_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor[] weights, Tensor output, Tensor[] saved, bool has_bias, "
      "bool compute_input_grad) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_weights)");
  // The first layer-direction of an LSTM fed straight from an embedding, without projection:
  // the input projection of token v is row v of table (= embedding @ w_ih^T + b_ih + b_hh,
  // computed once per vocabulary entry), so when the vocabulary is smaller than T*N this
  // replaces the per-token GEMMs of the projection and its two gradients by V-row ones.
  // tokens: int64 [T,N] in [0,V)  table: [V,4H]  h0, c0: [N,H]  w_hh: [4H,H]
  // returns as lstm_layer_forward.
  m.def(
      "embedding_lstm_layer_forward(Tensor tokens, Tensor table, Tensor h0, Tensor c0, "
      "Tensor w_hh, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // The public op: embedding_lstm_layer_forward's first three results, differentiable.
  m.def(
      "embedding_lstm_layer(Tensor tokens, Tensor table, Tensor h0, Tensor c0, Tensor w_hh, "
      "bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // grad_table [V,4H]: row v sums the gate gradients of every position holding token v.
  m.def(
      "embedding_lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor tokens, Tensor table, Tensor h0, Tensor c0, Tensor w_hh, Tensor output, "
      "Tensor gates, Tensor cells, bool reverse) "
      "-> (Tensor grad_table, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh)");

  // ---- gradient clipping (multi-tensor: one pass over all tensors) ---------------------------
  // Per-tensor norms of every tensor in one pass: a 1-D tensor [len(tensors)], float64 when any
  // tensor is float64, else float32 (accumulated in float64 on CPU, float32 on CUDA), on the
  // tensors' device. norm_type: any p (inf, -inf, 0 and negative p as torch.linalg.vector_norm).
  m.def("grad_norms(Tensor[] tensors, float norm_type) -> Tensor");
  // tensors[i] *= coef (a one-element tensor on the tensors' device, read on device: no sync).
  m.def("scale_grads_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  // tensors[i].clamp_(-clip_value, clip_value), NaN kept.
  m.def("clamp_grads_(Tensor(a!)[] tensors, float clip_value) -> ()");

  // ---- cross-entropy family (csrc/cpu/cross_entropy.cpp, pyengine/kernels/cross_entropy.py) -
  // logits: [N,C]  target: int64 [N] (in [0,C) or ignore_index; anything else is an error)
  // weight: [C] class weights  sample_weight: [N]  reduction: 0 none, 1 mean, 2 sum
  // Per element: s * ((1-p_t)^gamma * smoothed_ce + z_loss * lse^2), 0 where ignored; mean
  // divides by sum of s*w[t] over non-ignored elements (torch's divisor).
  // Returns loss ([N] for none, else a 0-d tensor), lse [N] (logsumexp per row; 0 where
  // ignored) and, when compute_grad (reduction mean/sum only on CUDA), d loss / d logits [N,C]
  // (else an empty tensor).
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, "
      "Tensor? sample_weight, int ignore_index, float label_smoothing, float gamma, "
      "float z_loss, int reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor grad_logits)");
  // The public op: cross_entropy_forward's loss, differentiable w.r.t. logits (csrc/autograd).
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? weight, Tensor? sample_weight, "
      "int ignore_index, float label_smoothing, float gamma, float z_loss, int reduction) "
      "-> Tensor");
  // d loss / d logits recomputed from the logits; grad_loss: [N] (none) or a scalar. lse is the
  // forward's (shape-checked; the row statistics are recomputed, for precision at large logits).
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor? sample_weight, Tensor lse, int ignore_index, float label_smoothing, float gamma, "
      "float z_loss, int reduction) -> Tensor");
  // Loss of logits = hidden [N,H] @ weight[V,H]^T + bias[V], chunk_size rows at a time (0: auto),
  // never the whole [N,V]. compute_grad (mean/sum only): the gradients of the reduced loss for
  // hidden, weight and bias come from the same pass (empty tensors otherwise / without bias).
  // correct: int64 0-d, number of rows whose argmax equals the target (when count_correct).
  m.def(
      "linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, Tensor? sample_weight, int ignore_index, float label_smoothing, "
      "float gamma, float z_loss, int reduction, bool compute_grad, bool count_correct, "
      "int chunk_size) -> (Tensor loss, Tensor lse, Tensor correct, Tensor grad_hidden, "
      "Tensor grad_weight, Tensor grad_bias)");
  // The public op: linear_cross_entropy_forward's loss and correct count, differentiable w.r.t.
  // hidden, weight and bias (csrc/autograd).
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, Tensor? sample_weight, int ignore_index, float label_smoothing, "
      "float gamma, float z_loss, int reduction, bool count_correct, int chunk_size) "
      "-> (Tensor loss, Tensor correct)");
  // Gradients recomputed chunk by chunk (logits and row statistics); grad_loss: [N] (none) or a
  // scalar; lse as in cross_entropy_backward.
  // grad_bias is empty without bias.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor target, Tensor? class_weight, Tensor? sample_weight, Tensor lse, "
      "int ignore_index, float label_smoothing, float gamma, float z_loss, int reduction, "
      "int chunk_size) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // ---- linear distillation (csrc/cpu/distill.cpp, pyengine/kernels/distill.py,
  //      derivative in csrc/autograd/distill.cpp) -----------------------------------------------
  // Per row i: student logits s = student_hidden[i] @ student_weight^T + student_bias, teacher
  // logits t likewise (both [V]); q = softmax(s / T), p = softmax(t / T) (T = temperature);
  //   D = KL(p || q) (kind "kl"), KL(q || p) ("reverse_kl"), or for "jsd" with M = beta p +
  //       (1 - beta) q: beta KL(p || M) + (1 - beta) KL(q || M) (beta 0: "kl", beta 1:
  //       "reverse_kl");
  //   loss_i = alpha * CE(s, target_i) + (1 - alpha) * T^2 * D with a target, T^2 * D without;
  //   0 where target_i == ignore_index. reduction: 0 none, 1 mean (over counted rows), 2 sum.
  // student_hidden [N,Hs], student_weight [V,Hs], teacher_hidden [N,Ht], teacher_weight [V,Ht],
  // biases [V], target int64 [N] or None. chunk_rows: rows per chunk (0: the op chooses).
  // Returns loss ([N] for none, else 0-d), stats [N,6] (per row: student max, student
  // log-sum-exp((s - max) / T), teacher max, the teacher's likewise, student
  // log-sum-exp(s - max) (0 without a target), the gradient's centering term; zeros where
  // ignored), and with
  // compute_grad (mean/sum) the gradients of the reduced loss for the student's hidden, weight
  // and bias from the same chunked pass (empty tensors otherwise / without bias). The teacher
  // gets no gradient.
  m.def(
      "linear_distillation_forward(Tensor student_hidden, Tensor student_weight, "
      "Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, "
      "Tensor? target, str kind, float beta, float temperature, float alpha, int ignore_index, "
      "int reduction, bool compute_grad, int chunk_rows) "
      "-> (Tensor loss, Tensor stats, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The student's gradients recomputed chunk by chunk (both heads' logits) from the forward's
  // stats; grad_loss: [N] (none) or a scalar. grad_bias is empty without student_bias.
  m.def(
      "linear_distillation_backward(Tensor grad_loss, Tensor student_hidden, "
      "Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, "
      "Tensor? teacher_bias, Tensor? target, Tensor stats, str kind, float beta, "
      "float temperature, float alpha, int ignore_index, int reduction, int chunk_rows) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The public op: linear_distillation_forward's loss, with its derivative (student only)
  // attached once, in C++, for every backend (csrc/autograd/distill.cpp).
  m.def(
      "linear_distillation(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? target, "
      "str kind, float beta, float temperature, float alpha, int ignore_index, int reduction) "
      "-> Tensor");

  // ---- int8 linear (csrc/cpu/int8.cpp, pyengine/kernels/int8.py) -------------------------------
  // qweight: int8 [N,K] (symmetric per-row quantized) -> the backend's packed layout (CPU: 1-D
  // panels of 16 columns x 4 k; CUDA: the [N,K] weight itself) and wsum int32 (per-column sums).
  m.def("int8_pack_weight(Tensor qweight) -> (Tensor packed, Tensor wsum)");
  // x: [M,K] float32 (CPU), float32/bfloat16/float16 (CUDA); scale: float32 [N]; bias: float32
  // [N]. act 0: dynamic per-row int8 quantization of x (W8A8), 1: weight-only. Returns [M,N] in
  // x's dtype, or with raw (act 0 only) the int32 accumulators.
  m.def(
      "int8_linear(Tensor x, Tensor packed, Tensor wsum, Tensor scale, Tensor? bias, "
      "int out_features, int act, bool raw) -> Tensor");
  // Int8 LSTM layer, one direction, whole sequence, inference (csrc/cpu/int8_lstm.cpp; CUDA: a
  // composite of int8_linear). input: float32 [T,N,I]  h0: [N,P]  c0: [N,H]; (packed_*, wsum_*)
  // = int8_pack_weight of w_ih [4H,I], w_hh [4H,P], w_hr [P,H] (projection, or None: P = H),
  // scale_* their float32 per-row scales; bias: float32 [4H] = b_ih + b_hh, or None;
  // batch_sizes as lstm_layer_forward; act as int8_linear (applies to x, h and the projection
  // input alike). Returns output [T,N,P], h_n [N,P], c_n [N,H].
  m.def(
      "int8_lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor packed_ih, Tensor wsum_ih, "
      "Tensor scale_ih, Tensor packed_hh, Tensor wsum_hh, Tensor scale_hh, Tensor? bias, "
      "Tensor? packed_hr, Tensor? wsum_hr, Tensor? scale_hr, Tensor? batch_sizes, bool reverse, "
      "int act) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // ---- structured pruning (csrc/cpu/prune.cpp, pyengine/kernels/prune.py) ---------------------
  // One score per unit from its whole weight group: weights[i] (1-D or 2-D) contributes along
  // dims[i], of size blocks[i]*units, index j -> unit j % units. kind: "l1" sum|w|,
  // "l2" sqrt(sum w^2), "taylor" sum|w*g| (grads beside weights; empty list otherwise).
  // float32 [units] (float64 when any weight is float64), accumulated in float64 on CPU.
  m.def(
      "unit_importance(Tensor[] weights, Tensor[] grads, int[] dims, int[] blocks, int units, "
      "str kind) -> Tensor");
  // N:M mask of 2-D scores: the n largest of every m consecutive elements of a row (ties: lower
  // index first) are True. bool, scores' shape.
  m.def("nm_mask(Tensor scores, int n, int m) -> Tensor");
}
