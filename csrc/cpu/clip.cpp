// CPU kernels: clip factors and multi-tensor clip-and-accumulate of per-example gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "clip_accumulate_args.h"
#include "clip_factor.h"
#include "cpu/reduce.h"

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

// n_i = norm_scale * sum_k norm_sqs[k][i] in double (the per-layer squared norms of example i)
// and c_i from it, both returned in float32 (float64 if any input is float64).
std::tuple<at::Tensor, at::Tensor> total_clip_factors_cpu(at::TensorList norm_sqs,
                                                          double max_norm,
                                                          const c10::optional<at::Tensor>& mask,
                                                          double norm_scale) {
  TORCH_CHECK(!norm_sqs.empty(), "total_clip_factors: empty list of norms");
  const int64_t batch = norm_sqs[0].numel();
  check_mask(mask, batch);
  std::vector<double> total(batch, 0.0);
  bool wide = false;
  for (size_t k = 0; k < norm_sqs.size(); ++k) {
    const at::Tensor n = norm_sqs[k].contiguous();
    TORCH_CHECK(n.dim() == 1 && n.size(0) == batch, "total_clip_factors: norm_sqs[", k,
                "] has shape ", n.sizes(), ", expected (", batch, ",)");
    wide |= n.scalar_type() == at::kDouble;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, n.scalar_type(), "total_norms", [&] {
      const scalar_t* p = n.data_ptr<scalar_t>();
      for (int64_t i = 0; i < batch; ++i) total[i] += static_cast<double>(p[i]);
    });
  }
  for (double& n : total) n *= norm_scale;
  const std::vector<double> c = factors_from(total, max_norm, mask);
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kDouble);
  const at::ScalarType dtype = wide ? at::kDouble : at::kFloat;
  return {at::tensor(total, opts).to(dtype), at::tensor(c, opts).to(dtype)};
}

// norm_sq[i] += sum_j g[i, j]^2 (double accumulation), g viewed as (B, n).
void add_norms(const at::Tensor& g, std::vector<double>& norm_sq) {
  const int64_t batch = g.size(0), n = g.numel() / std::max<int64_t>(batch, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_norms", [&] {
    const scalar_t* p = g.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) norm_sq[i] += sum_squares(p + i * n, n);
    });
  });
}

// out[j] += sum_i c[i] g[i, j], skipping c[i] == 0 exactly so that non-finite rows stay out.
// Columns are processed in blocks held in a double accumulator, reading each row contiguously.
constexpr int64_t kBlock = 512;

void add_clipped(const at::Tensor& g, const std::vector<double>& c, at::Tensor& out) {
  const int64_t batch = g.size(0), n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_clipped", [&] {
    using in_t = scalar_t;
    const in_t* p = g.data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_out", [&] {
      using out_t = scalar_t;
      out_t* o = out.data_ptr<out_t>();
      at::parallel_for(0, (n + kBlock - 1) / kBlock, 8, [&](int64_t block_begin, int64_t block_end) {
        double acc[kBlock];
        for (int64_t block = block_begin; block < block_end; ++block) {
          const int64_t j0 = block * kBlock, width = std::min(kBlock, n - j0);
          for (int64_t j = 0; j < width; ++j) acc[j] = 0.0;
          for (int64_t i = 0; i < batch; ++i) {
            if (c[i] == 0.0) continue;
            const double ci = c[i];
            const in_t* row = p + i * n + j0;
            for (int64_t j = 0; j < width; ++j) acc[j] += ci * static_cast<double>(row[j]);
          }
          for (int64_t j = 0; j < width; ++j) {
            o[j0 + j] = static_cast<out_t>(static_cast<double>(o[j0 + j]) + acc[j]);
          }
        }
      });
    });
  });
}

at::Tensor clip_accumulate_cpu(at::TensorList per_example, at::TensorList summed,
                               double max_norm, const c10::optional<at::Tensor>& mask) {
  const int64_t batch = check_clip_accumulate_args(per_example, summed, mask);
  std::vector<at::Tensor> grads;
  for (const auto& g : per_example) grads.push_back(g.contiguous());
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
  return at::tensor(norm_sq, at::TensorOptions().dtype(at::kDouble)).to(norms_dtype(per_example));
}

// summed[k] += sum_i scale_i per_example[k][i] for every k, rows of scale 0 left out exactly:
// the clip of materialised gradients whose factors come from elsewhere (book-keeping), one call
// for all tensors, no temporary per tensor.
void scaled_accumulate_cpu(at::TensorList per_example, at::TensorList summed,
                           const at::Tensor& scale) {
  const int64_t batch = check_clip_accumulate_args(per_example, summed, c10::nullopt,
                                                   "scaled_accumulate_");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == batch, "scaled_accumulate_: scale must be (",
              batch, ",), got ", scale.sizes());
  const at::Tensor s = scale.to(at::kDouble).contiguous();
  const std::vector<double> c(s.data_ptr<double>(), s.data_ptr<double>() + batch);
  for (size_t k = 0; k < per_example.size(); ++k) {
    const at::Tensor g = per_example[k].contiguous();
    at::Tensor out = summed[k];
    if (out.is_contiguous()) {
      add_clipped(g, c, out);
    } else {
      at::Tensor tmp = at::zeros(out.sizes(), out.options());
      add_clipped(g, c, tmp);
      out.add_(tmp);
    }
  }
}

// n_i = sum_k ||per_example[k][i]||^2 in double, in one pass per tensor and no temporary.
at::Tensor per_example_norm_sq_cpu(at::TensorList per_example) {
  TORCH_CHECK(!per_example.empty(), "per_example_norm_sq: empty tensor list");
  const int64_t batch = per_example[0].dim() ? per_example[0].size(0) : -1;
  std::vector<double> norm_sq(std::max<int64_t>(batch, 0), 0.0);
  for (size_t k = 0; k < per_example.size(); ++k) {
    const at::Tensor& g = per_example[k];
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == batch, "per_example_norm_sq: per_example[", k,
                "] has shape ", g.sizes(), ", expected (", batch, ", ...)");
    add_norms(g.contiguous(), norm_sq);
  }
  return at::tensor(norm_sq, at::TensorOptions().dtype(at::kDouble)).to(norms_dtype(per_example));
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("clip_factors", &clip_factors_cpu);
  m.impl("total_clip_factors", &total_clip_factors_cpu);
  m.impl("clip_accumulate_", &clip_accumulate_cpu);
  m.impl("scaled_accumulate_", &scaled_accumulate_cpu);
  m.impl("per_example_norm_sq", &per_example_norm_sq_cpu);
}

}  // namespace dpfast
