// CPU kernels: clip factors and multi-tensor clip-and-accumulate of per-example gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "clip_factor.h"

namespace dpfast {
namespace {

void check_mask(const c10::optional<at::Tensor>& mask, int64_t batch) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->dim() == 1 && mask->size(0) == batch,
              "mask must have shape (B,) = (", batch, ",), got ", mask->sizes());
}

// Factors in double from double norms; masked-out examples (mask == 0) get 0.
std::vector<double> factors_from(const std::vector<double>& norm_sq, double max_norm,
                                 const c10::optional<at::Tensor>& mask) {
  std::vector<double> c(norm_sq.size());
  at::Tensor keep;
  if (mask.has_value()) keep = mask->to(at::kCPU, at::kBool).contiguous();
  for (size_t i = 0; i < c.size(); ++i) {
    const bool kept = !mask.has_value() || keep.data_ptr<bool>()[i];
    c[i] = kept ? clip_factor(norm_sq[i], max_norm) : 0.0;
  }
  return c;
}

at::Tensor clip_factors_cpu(const at::Tensor& norm_sq, double max_norm,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(norm_sq.dim() == 1, "norm_sq must have shape (B,), got ", norm_sq.sizes());
  check_mask(mask, norm_sq.size(0));
  const at::Tensor n = norm_sq.to(at::kDouble).contiguous();
  const std::vector<double> norms(n.data_ptr<double>(), n.data_ptr<double>() + n.numel());
  const std::vector<double> c = factors_from(norms, max_norm, mask);
  return at::tensor(c, n.options()).to(norm_sq.scalar_type());
}

// norm_sq[i] += sum_j g[i, j]^2 (double accumulation), g viewed as (B, n).
void add_norms(const at::Tensor& g, std::vector<double>& norm_sq) {
  const int64_t batch = g.size(0), n = g.numel() / std::max<int64_t>(batch, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_norms", [&] {
    const scalar_t* p = g.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const double v = static_cast<double>(p[i * n + j]);
          acc += v * v;
        }
        norm_sq[i] += acc;
      }
    });
  });
}

// out[j] += sum_i c[i] g[i, j], skipping c[i] == 0 exactly so that non-finite rows stay out.
void add_clipped(const at::Tensor& g, const std::vector<double>& c, at::Tensor& out) {
  const int64_t batch = g.size(0), n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_clipped", [&] {
    const scalar_t* p = g.data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_out", [&] {
      using out_t = scalar_t;
      out_t* o = out.data_ptr<out_t>();
      at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          double acc = 0.0;
          for (int64_t i = 0; i < batch; ++i) {
            if (c[i] != 0.0) acc += c[i] * static_cast<double>(p[i * n + j]);
          }
          o[j] = static_cast<out_t>(static_cast<double>(o[j]) + acc);
        }
      });
    });
  });
}

at::Tensor clip_accumulate_cpu(at::TensorList per_example, at::TensorList summed,
                               double max_norm, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(per_example.size() == summed.size(), "clip_accumulate_: got ", per_example.size(),
              " per-example tensors but ", summed.size(), " summed tensors");
  TORCH_CHECK(!per_example.empty(), "clip_accumulate_: empty tensor list");
  const int64_t batch = per_example[0].size(0);
  check_mask(mask, batch);
  bool any_double = false;
  std::vector<at::Tensor> grads;
  for (size_t k = 0; k < per_example.size(); ++k) {
    const at::Tensor& g = per_example[k];
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == batch, "clip_accumulate_: per_example[", k,
                "] has shape ", g.sizes(), ", expected (", batch, ", ...)");
    TORCH_CHECK(g.sizes().slice(1) == summed[k].sizes(), "clip_accumulate_: per_example[", k,
                "] has shape ", g.sizes(), " but summed[", k, "] has shape ", summed[k].sizes());
    any_double = any_double || g.scalar_type() == at::kDouble;
    grads.push_back(g.contiguous());
  }
  std::vector<double> norm_sq(batch, 0.0);
  for (const auto& g : grads) add_norms(g, norm_sq);
  const std::vector<double> c = factors_from(norm_sq, max_norm, mask);
  for (size_t k = 0; k < grads.size(); ++k) {
    at::Tensor out = summed[k];
    if (out.is_contiguous()) {
      add_clipped(grads[k], c, out);
    } else {
      at::Tensor tmp = at::zeros(out.sizes(), out.options());
      add_clipped(grads[k], c, tmp);
      out.add_(tmp);
    }
  }
  return at::tensor(norm_sq, at::TensorOptions().dtype(at::kDouble))
      .to(any_double ? at::kDouble : at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("clip_factors", &clip_factors_cpu);
  m.impl("clip_accumulate_", &clip_accumulate_cpu);
}

}  // namespace dpfast
