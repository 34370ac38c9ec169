// Per-row reductions of the normalisation rules' per-example affine gradients (rules/_affine.py,
// rules/group_norm.py): for rows g, x (N, n) and an optional ReLU output r (N, n),
//   dots[k] = sum_j m_kj g_kj x_kj,   sums[k] = sum_j m_kj g_kj,   m = not [r <= 0] (1 without r),
// in double, in one pass over g, x (and r). m is ReLU's backward as autograd's threshold_backward
// (a NaN output passes its gradient); a masked element contributes exactly nothing, also where g
// or x is not finite. The PyTorch composition (the ReLU's
// backward, a product, two sums) reads and writes tensors of the input's size four to six
// times, and einsum's batched dot products run at a fraction of the memory's speed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "reduce.h"
#include "vector_clones.h"

namespace dpfast {
namespace {

template <typename scalar_t>
DPFAST_VECTOR_CLONES void row_dots_one(const scalar_t* __restrict__ g,
                                       const scalar_t* __restrict__ x, int64_t n, double* dot,
                                       double* sum) {
  double dots[kLanes] = {0.0}, sums[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double gv = static_cast<double>(g[j + l]);
      dots[l] += gv * static_cast<double>(x[j + l]);
      sums[l] += gv;
    }
  }
  double d = 0.0, s = 0.0;
  for (; j < n; ++j) {
    d += static_cast<double>(g[j]) * static_cast<double>(x[j]);
    s += static_cast<double>(g[j]);
  }
  for (int l = 0; l < kLanes; ++l) d += dots[l], s += sums[l];
  *dot = d;
  *sum = s;
}

// v where keep is all ones, +0 where it is zero.
template <typename scalar_t, typename bits_t>
inline scalar_t masked_value(scalar_t v, bits_t keep) {
  bits_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= keep;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

template <typename scalar_t>
DPFAST_VECTOR_CLONES void masked_row_dots_one(const scalar_t* __restrict__ g,
                                              const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ r, int64_t n,
                                              double* dot, double* sum) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  double dots[kLanes] = {0.0}, sums[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      // the mask as bits (not a product: 0 * inf is NaN; a branch does not vectorise)
      const bits_t keep = bits_t(0) - static_cast<bits_t>(!(r[j + l] <= scalar_t(0)));
      const double gv = static_cast<double>(masked_value(g[j + l], keep));
      dots[l] += gv * static_cast<double>(masked_value(x[j + l], keep));
      sums[l] += gv;
    }
  }
  double d = 0.0, s = 0.0;
  for (; j < n; ++j) {
    if (!(r[j] <= scalar_t(0))) {
      d += static_cast<double>(g[j]) * static_cast<double>(x[j]);
      s += static_cast<double>(g[j]);
    }
  }
  for (int l = 0; l < kLanes; ++l) d += dots[l], s += sums[l];
  *dot = d;
  *sum = s;
}

// g, x (and relu_out) (N, n) of one floating dtype -> (dots, sums), (N,) float64 each.
std::tuple<at::Tensor, at::Tensor> row_dots_cpu(const at::Tensor& g_in, const at::Tensor& x_in,
                                                const c10::optional<at::Tensor>& relu_out) {
  TORCH_CHECK(g_in.dim() == 2 && g_in.sizes() == x_in.sizes(),
              "row_dots: g and x must be (N, n) alike, got ", g_in.sizes(), " and ",
              x_in.sizes());
  TORCH_CHECK(g_in.scalar_type() == x_in.scalar_type(), "row_dots: g and x must share a dtype");
  const bool masked = relu_out.has_value() && relu_out->defined();
  if (masked) {
    TORCH_CHECK(relu_out->sizes() == g_in.sizes() && relu_out->scalar_type() == g_in.scalar_type(),
                "row_dots: relu_out must be shaped and typed as g, got ", relu_out->sizes());
  }
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const at::Tensor r = masked ? relu_out->contiguous() : at::Tensor();
  const int64_t rows = g.size(0), n = g.size(1);
  const auto options = g.options().dtype(at::kDouble);
  at::Tensor dots = at::empty({rows}, options), sums = at::empty({rows}, options);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "row_dots", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    const scalar_t* pr = masked ? r.data_ptr<scalar_t>() : nullptr;
    double *pd = dots.data_ptr<double>(), *ps = sums.data_ptr<double>();
    at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (masked) {
          masked_row_dots_one<scalar_t>(pg + k * n, px + k * n, pr + k * n, n, pd + k, ps + k);
        } else {
          row_dots_one<scalar_t>(pg + k * n, px + k * n, n, pd + k, ps + k);
        }
      }
    });
  });
  return {dots, sums};
}

}  // namespace
}  // namespace dpfast

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) { m.impl("row_dots", &dpfast::row_dots_cpu); }
