// Argument checks of clip_accumulate_ (CPU and CUDA kernels, host code) and scaled_accumulate_.
#pragma once

#include <ATen/ATen.h>

namespace dpfast {

// Checks the tensor lists and the mask; returns the batch size B.
inline int64_t check_clip_accumulate_args(at::TensorList per_example, at::TensorList summed,
                                          const c10::optional<at::Tensor>& mask,
                                          const char* op = "clip_accumulate_") {
  TORCH_CHECK(per_example.size() == summed.size(), op, ": got ", per_example.size(),
              " per-example tensors but ", summed.size(), " summed tensors");
  TORCH_CHECK(!per_example.empty(), op, ": empty tensor list");
  const int64_t batch = per_example[0].size(0);
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == batch,
                "mask must have shape (B,) = (", batch, ",), got ", mask->sizes());
  }
  for (size_t k = 0; k < per_example.size(); ++k) {
    const at::Tensor& g = per_example[k];
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == batch, op, ": per_example[", k,
                "] has shape ", g.sizes(), ", expected (", batch, ", ...)");
    TORCH_CHECK(g.sizes().slice(1) == summed[k].sizes(), op, ": per_example[", k,
                "] has shape ", g.sizes(), " but summed[", k, "] has shape ", summed[k].sizes());
  }
  return batch;
}

// The dtype of the returned norms: float64 if any input is float64, else float32.
inline at::ScalarType norms_dtype(at::TensorList per_example) {
  for (const auto& g : per_example) {
    if (g.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

}  // namespace dpfast
