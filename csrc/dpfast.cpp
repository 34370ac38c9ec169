// Schemas of the private op library `dpfast_C`: the compiled kernels behind the public
// torch.ops.torch_dpfast.* ops, which torch_dpfast/ops defines in Python (so they exist even
// when nothing compiled). Only this file defines schemas; kernels register per device key.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dpfast_C, m) {
  m.def("clip_factors(Tensor norm_sq, float max_norm, Tensor? mask) -> Tensor");
  m.def(
      "total_clip_factors(Tensor[] norm_sqs, float max_norm, Tensor? mask, float norm_scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "clip_accumulate_(Tensor[] per_example, Tensor(a!)[] summed, float max_norm, "
      "Tensor? mask) -> Tensor");
  m.def("scaled_accumulate_(Tensor[] per_example, Tensor(a!)[] summed, Tensor scale) -> ()");
  m.def("per_example_norm_sq(Tensor[] per_example) -> Tensor");
  m.def("add_noise_(Tensor(a!)[] grads, float std, float scale, int seed) -> ()");
  m.def("linear_norm_sq(Tensor a, Tensor g, str method) -> Tensor");
  m.def("linear_clipped_sum(Tensor a, Tensor g, Tensor scale) -> Tensor");
  m.def("embedding_norm_sq(Tensor ids, Tensor g, int num_embeddings, int? padding_idx) -> Tensor");
  // The weight standardisation's Jacobian on per-example gradients (rules/std_conv.py), in place.
  m.def("std_conv_project_(Tensor(a!) grad, Tensor w_hat, Tensor factor) -> Tensor(a!)");
  // Per row sum(m g x), sum(m g), m = not [relu_out <= 0], and with moments the shifted first
  // and second moments of x (the normalisation rules): (N, 2) or (N, 5) float64.
  m.def("row_dots(Tensor g, Tensor x, Tensor? relu_out, bool moments) -> Tensor");
  // Per-example weight gradients of a depthwise 2-d conv (rules/conv.py): x (B, C, H, W),
  // g (B, M C, Ho, Wo) -> (B, M C, kh, kw); padding: the leading padding of each dim.
  m.def(
      "depthwise_weight_grads(Tensor x, Tensor g, int[] kernel, int[] stride, int[] padding, "
      "int[] dilation) -> Tensor");
  // Per-example gradients d_b^T a_k,b of linear maps sharing the output gradient d (and the
  // bias's sum_t d_b,t) into the given buffers, with their per-example squared norms (CPU).
  m.def(
      "linear_uses_grads(Tensor[] inputs, Tensor d, Tensor(a!)[] out, Tensor(b!)? bias_out) "
      "-> Tensor");
  // Ghost norms of linear maps sharing the output gradient d, on their joined input a, with
  // `biases` biases of sum_t d_t, and certify.py's bounds: (norm_sq (B,), bound (B,) float64).
  m.def("linear_uses_ghost(Tensor a, Tensor d, int biases) -> (Tensor, Tensor)");
  // Clipped sums of linear maps sharing the output gradient d, on their joined input a
  // (B, T, sum widths): one (d_out, w) sum per width, then with `bias` sum_i c_i sum_t d_it.
  m.def(
      "linear_uses_clipped_sum(Tensor a, Tensor d, Tensor scale, int[] widths, bool bias) "
      "-> Tensor[]");
  // The recurrent rule's recurrence (CPU): all steps of one layer and direction.
  m.def(
      "lstm_sequence(Tensor gi, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, Tensor? valid) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_sequence_backward(Tensor? d_hs, Tensor? dc_n, Tensor gates, Tensor cells, "
      "Tensor tanh_cells, Tensor c0, Tensor w_hh, Tensor? valid) -> (Tensor, Tensor, Tensor)");
  m.def("rnn_sequence(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, bool relu, Tensor? valid) -> Tensor");
  m.def(
      "rnn_sequence_backward(Tensor? d_hs, Tensor hs, Tensor w_hh, bool relu, Tensor? valid) "
      "-> (Tensor, Tensor)");
  m.def(
      "gru_sequence(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? valid) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_sequence_backward(Tensor? d_hs, Tensor hs, Tensor gates, Tensor gh, Tensor h0, "
      "Tensor w_hh, Tensor? valid) -> (Tensor, Tensor, Tensor)");
  // Tensor-core kernels (CUDA only): precision 1 = TF32, 2 = bf16 inputs, fp32 accumulation.
  m.def("linear_norm_sq_tc(Tensor a, Tensor g, str method, int precision) -> Tensor");
  m.def("linear_clipped_sum_tc(Tensor a, Tensor g, Tensor scale, int precision) -> Tensor");
}

// An importable (empty) Python module, so that `import torch_dpfast._C` loads the library.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
