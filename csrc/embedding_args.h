// Argument checks of embedding_norm_sq, shared by the CPU and CUDA kernels (host code).
#pragma once

#include <ATen/ATen.h>

namespace dpfast {

// Checks ids (B, T) against g (B, T, d) and the id range [0, V); returns the ids as a contiguous
// int64 tensor on their device.
inline at::Tensor checked_embedding_ids(const at::Tensor& ids, const at::Tensor& g,
                                        int64_t num_embeddings) {
  TORCH_CHECK(ids.dim() == 2 && g.dim() == 3 && g.size(0) == ids.size(0) &&
                  g.size(1) == ids.size(1),
              "embedding_norm_sq: ids (B, T) and g (B, T, d) must agree, got ids ", ids.sizes(),
              " and g ", g.sizes());
  TORCH_CHECK(ids.device() == g.device(), "embedding_norm_sq: ids on ", ids.device(),
              " but g on ", g.device());
  at::Tensor out = ids.to(at::kLong).contiguous();
  if (out.numel()) {
    const int64_t low = out.min().item<int64_t>(), high = out.max().item<int64_t>();
    TORCH_CHECK_INDEX(low >= 0 && high < num_embeddings, "embedding ids must lie in [0, ",
                      num_embeddings, "), got range [", low, ", ", high, "]");
  }
  return out;
}

}  // namespace dpfast
