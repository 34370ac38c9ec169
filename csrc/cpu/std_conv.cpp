// The weight standardisation's Jacobian (rules/std_conv.py) applied to per-example gradients
// of the standardised weight, in place, one row (example i, output channel r) at a time:
//   G_ir <- f_r (G_ir - mean(G_ir) - w_r <w_r, G_ir> / n),
// with the row's sum and dot product accumulated in double while it is read, then rewritten
// from cache: two passes over memory where the PyTorch ops take six.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "reduce.h"
#include "vector_clones.h"

namespace dpfast {
namespace {

template <typename scalar_t>
DPFAST_VECTOR_CLONES void project_row(scalar_t* g, const scalar_t* w, int64_t n, double f) {
  double sums[kLanes] = {0.0}, dots[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(g[j + l]);
      sums[l] += v;
      dots[l] += v * static_cast<double>(w[j + l]);
    }
  }
  double sum = 0.0, dot = 0.0;
  for (; j < n; ++j) {
    sum += static_cast<double>(g[j]);
    dot += static_cast<double>(g[j]) * static_cast<double>(w[j]);
  }
  for (int l = 0; l < kLanes; ++l) {
    sum += sums[l];
    dot += dots[l];
  }
  // centred first, then scaled (as the PyTorch ops): f (g - mean) of a row close to its mean
  // is then not a difference of two rounded products
  const scalar_t scale = static_cast<scalar_t>(f);
  const scalar_t mean = static_cast<scalar_t>(sum / static_cast<double>(n));
  const scalar_t along = static_cast<scalar_t>(dot / static_cast<double>(n));
  for (int64_t k = 0; k < n; ++k) g[k] = scale * (g[k] - mean - along * w[k]);
}

// grad (B, C_out, n) contiguous, w_hat (C_out, n), factor (C_out,): all of grad's dtype.
at::Tensor std_conv_project_cpu(at::Tensor grad, const at::Tensor& w_hat,
                                const at::Tensor& factor) {
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous(),
              "std_conv_project_: grad must be a contiguous (B, C_out, n) tensor, got ",
              grad.sizes());
  const int64_t batch = grad.size(0), rows = grad.size(1), n = grad.size(2);
  TORCH_CHECK(w_hat.sizes() == at::IntArrayRef({rows, n}),
              "std_conv_project_: w_hat must be (C_out, n) = (", rows, ", ", n, "), got ",
              w_hat.sizes());
  TORCH_CHECK(factor.dim() == 1 && factor.size(0) == rows,
              "std_conv_project_: factor must be (C_out,), got ", factor.sizes());
  TORCH_CHECK(w_hat.scalar_type() == grad.scalar_type() &&
                  factor.scalar_type() == grad.scalar_type(),
              "std_conv_project_: grad, w_hat and factor must share one dtype");
  const at::Tensor w = w_hat.contiguous(), f = factor.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "std_conv_project_", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    at::parallel_for(0, batch * rows, grain_for(n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t r = row % rows;
        project_row<scalar_t>(g + row * n, wp + r * n, n, static_cast<double>(fp[r]));
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace dpfast

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) { m.impl("std_conv_project_", &dpfast::std_conv_project_cpu); }
