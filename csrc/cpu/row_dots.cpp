// Per-row reductions of the normalisation rules' per-example affine gradients (rules/_affine.py,
// rules/group_norm.py): for rows g, x (N, n) and an optional ReLU output r (N, n),
//   out[k] = (sum_j m_kj g_kj x_kj, sum_j m_kj g_kj),   m = not [r <= 0] (1 without r),
// and with moments also (s_k, sum_j (x_kj - s_k), sum_j (x_kj - s_k)^2), s_k = x_k0 (a shift
// near the row's values: the spread then does not cancel against the mean), all in double, in
// one pass over g, x (and r). m is ReLU's backward as autograd's threshold_backward (a NaN
// output passes its gradient); a masked element contributes exactly nothing to the first two,
// also where g or x is not finite. The PyTorch composition (the ReLU's backward, a product, two
// sums, the group statistics) reads and writes tensors of the input's size five to seven times,
// and einsum's batched dot products run at a fraction of the memory's speed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "reduce.h"
#include "vector_clones.h"

namespace dpfast {
namespace {

// v where keep is all ones, +0 where it is zero (bits, not a product: 0 * inf is NaN; a branch
// does not vectorise).
template <typename scalar_t, typename bits_t>
inline scalar_t masked_value(scalar_t v, bits_t keep) {
  bits_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= keep;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// One row's sums into out[0..1] (out[0..4] with kMoments).
template <typename scalar_t, bool kMasked, bool kMoments>
DPFAST_VECTOR_CLONES void row_sums(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ r, int64_t n, double* out) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  const double shift = kMoments && n ? static_cast<double>(x[0]) : 0.0;
  double dots[kLanes] = {0.0}, sums[kLanes] = {0.0}, firsts[kLanes] = {0.0},
         seconds[kLanes] = {0.0};
  auto add = [&](int l, scalar_t gr, scalar_t xr, scalar_t rr) {
    double gv = static_cast<double>(gr), xv = static_cast<double>(xr);
    if constexpr (kMasked) {
      const bits_t keep = bits_t(0) - static_cast<bits_t>(!(rr <= scalar_t(0)));
      gv = static_cast<double>(masked_value(gr, keep));
      xv = static_cast<double>(masked_value(xr, keep));
    }
    dots[l] += gv * xv;
    sums[l] += gv;
    if constexpr (kMoments) {
      const double d = static_cast<double>(xr) - shift;
      firsts[l] += d;
      seconds[l] += d * d;
    }
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) add(l, g[j + l], x[j + l], kMasked ? r[j + l] : scalar_t(1));
  }
  for (int l = 0; j < n; ++j, ++l) add(l, g[j], x[j], kMasked ? r[j] : scalar_t(1));
  double totals[4] = {0.0, 0.0, 0.0, 0.0};
  for (int l = 0; l < kLanes; ++l) {
    totals[0] += dots[l], totals[1] += sums[l], totals[2] += firsts[l], totals[3] += seconds[l];
  }
  out[0] = totals[0];
  out[1] = totals[1];
  if constexpr (kMoments) {
    out[2] = shift;
    out[3] = totals[2];
    out[4] = totals[3];
  }
}

template <typename scalar_t, bool kMasked, bool kMoments>
void all_rows(const at::Tensor& g, const at::Tensor& x, const at::Tensor& r, at::Tensor& out) {
  const int64_t rows = g.size(0), n = g.size(1), width = out.size(1);
  const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
  const scalar_t* pr = kMasked ? r.data_ptr<scalar_t>() : nullptr;
  double* po = out.data_ptr<double>();
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      row_sums<scalar_t, kMasked, kMoments>(pg + k * n, px + k * n, kMasked ? pr + k * n : nullptr,
                                            n, po + k * width);
    }
  });
}

// g, x (and relu_out) (N, n) of one floating dtype -> (N, 2) float64, (N, 5) with moments.
at::Tensor row_dots_cpu(const at::Tensor& g_in, const at::Tensor& x_in,
                        const c10::optional<at::Tensor>& relu_out, bool moments) {
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
  at::Tensor out = at::empty({g.size(0), moments ? 5 : 2}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "row_dots", [&] {
    if (masked && moments) {
      all_rows<scalar_t, true, true>(g, x, r, out);
    } else if (masked) {
      all_rows<scalar_t, true, false>(g, x, r, out);
    } else if (moments) {
      all_rows<scalar_t, false, true>(g, x, r, out);
    } else {
      all_rows<scalar_t, false, false>(g, x, r, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace dpfast

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) { m.impl("row_dots", &dpfast::row_dots_cpu); }
