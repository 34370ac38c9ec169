// Ghost norms of linear maps sharing one output gradient d, with their certification bounds, in
// one pass over each example (rules/_linear_uses.py). a (B, T, D) is the maps' joined input
// (an LSTM layer's [x_t, h_t-1]), d (B, T, G) their output gradient, `biases` the number of
// trainable biases receiving sum_t d_t. Per example b, from the T x T Grams A = a_b a_b^T and
// S = d_b d_b^T (about one triangle each, by BLAS's GEMM on that thread):
//
//   norm_sq[b] = sum_{t,s} S_ts A_ts + biases * sum_{t,s} S_ts
//              = ||d_b^T a_b||_F^2 + biases * ||sum_t d_b,t||^2,
//   bound[b]   = sqrt((sum_t ||d_t|| ||a_t||)^2 + biases * (sum_t ||d_t||)^2),
//
// the row norms being the Grams' diagonals (sums of squares: no cancellation). The bound is
// certify.py's U_i of the joined map, so the norm needs no second pass over d for it, nor for
// the bias sums. Sums over the Grams in double; the Grams in the inputs' dtype, as the ghost
// norm of linear.cpp (certification covers their rounding).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/fortran_blas.h"

namespace dpfast {
namespace {

// Positions per tile of the Gram: blocks (I, J) with I <= J are computed, so for T = 64 three
// of four 32 x 32 blocks, about the upper triangle.
constexpr int64_t kGramTile = 32;

// gram[i + j * T] = x_i . x_j for every i <= j (and the rest of the diagonal blocks), x_b
// (T x width) with rows `ld` apart. In BLAS's column-major terms x_b is X (width x T) and the
// block (I, J) is X[:, I]^T X[:, J].
template <typename scalar_t>
void example_gram(int64_t steps, int64_t width, const scalar_t* x, int64_t ld, scalar_t* gram) {
  const int k = static_cast<int>(width), lx = static_cast<int>(ld), lg = static_cast<int>(steps);
  const scalar_t one = 1, zero = 0;
  for (int64_t j0 = 0; j0 < steps; j0 += kGramTile) {
    const int n = static_cast<int>(std::min(kGramTile, steps - j0));
    for (int64_t i0 = 0; i0 <= j0; i0 += kGramTile) {
      const int m = static_cast<int>(std::min(kGramTile, steps - i0));
      const scalar_t *xi = x + i0 * ld, *xj = x + j0 * ld;
      scalar_t* c = gram + i0 + j0 * steps;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (sgemm_) {
          sgemm_("T", "N", &m, &n, &k, &one, xi, &lx, xj, &lx, &zero, c, &lg);
          continue;
        }
      } else {
        if (dgemm_) {
          dgemm_("T", "N", &m, &n, &k, &one, xi, &lx, xj, &lx, &zero, c, &lg);
          continue;
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < m; ++i) {
          scalar_t sum = 0;
          for (int64_t col = 0; col < width; ++col) sum += xi[i * ld + col] * xj[j * ld + col];
          c[i + j * steps] = sum;
        }
      }
    }
  }
}

bool rows_evenly_spaced(const at::Tensor& t) {
  return t.stride(2) == 1 && t.stride(1) >= t.size(2) && t.stride(1) < (int64_t{1} << 31);
}

std::tuple<at::Tensor, at::Tensor> linear_uses_ghost_cpu(const at::Tensor& a_in,
                                                         const at::Tensor& d_in, int64_t biases) {
  TORCH_CHECK(a_in.dim() == 3 && d_in.dim() == 3 && a_in.size(0) == d_in.size(0) &&
                  a_in.size(1) == d_in.size(1),
              "linear_uses_ghost: a (B, T, D) and d (B, T, G) must agree in B and T, got a ",
              a_in.sizes(), " and d ", d_in.sizes());
  TORCH_CHECK(a_in.device().is_cpu() && d_in.device().is_cpu() &&
                  a_in.scalar_type() == d_in.scalar_type() &&
                  (d_in.scalar_type() == at::kFloat || d_in.scalar_type() == at::kDouble),
              "linear_uses_ghost: a and d must be CPU tensors of one dtype, float32 or float64, "
              "got ", a_in.scalar_type(), " and ", d_in.scalar_type());
  TORCH_CHECK(biases >= 0, "linear_uses_ghost: biases must be >= 0, got ", biases);
  TORCH_CHECK(a_in.size(2) < (int64_t{1} << 31) && d_in.size(2) < (int64_t{1} << 31) &&
                  d_in.size(1) < (int64_t{1} << 31),
              "linear_uses_ghost: too large for BLAS, got a ", a_in.sizes(), " and d ",
              d_in.sizes());
  const at::Tensor a = rows_evenly_spaced(a_in) ? a_in : a_in.contiguous();
  const at::Tensor d = rows_evenly_spaced(d_in) ? d_in : d_in.contiguous();
  const int64_t batch = d.size(0), steps = d.size(1);
  at::Tensor norm_sq = at::empty({batch}, d.options().dtype(at::kDouble));
  at::Tensor bound = at::empty({batch}, d.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "linear_uses_ghost", [&] {
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pd = d.data_ptr<scalar_t>();
    double *pn = norm_sq.data_ptr<double>(), *pb = bound.data_ptr<double>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gram_a(steps * steps), gram_d(steps * steps);
      for (int64_t b = begin; b < end; ++b) {
        example_gram(steps, a.size(2), pa + b * a.stride(0), a.stride(1), gram_a.data());
        example_gram(steps, d.size(2), pd + b * d.stride(0), d.stride(1), gram_d.data());
        double weights = 0.0, summed = 0.0, weight_bound = 0.0, bias_bound = 0.0;
        for (int64_t j = 0; j < steps; ++j) {
          const scalar_t* ga = gram_a.data() + j * steps;
          const scalar_t* gd = gram_d.data() + j * steps;
          double off_w = 0.0, off_s = 0.0;
          for (int64_t i = 0; i < j; ++i) {
            off_w += static_cast<double>(gd[i]) * static_cast<double>(ga[i]);
            off_s += static_cast<double>(gd[i]);
          }
          const double dd = gd[j], aa = ga[j];
          weights += 2.0 * off_w + dd * aa;
          summed += 2.0 * off_s + dd;
          weight_bound += std::sqrt(dd * aa);
          bias_bound += std::sqrt(dd);
        }
        const double n_bias = static_cast<double>(biases);
        pn[b] = weights + n_bias * summed;
        pb[b] = std::sqrt(weight_bound * weight_bound + n_bias * bias_bound * bias_bound);
      }
    });
  });
  return {norm_sq.to(d.scalar_type()), bound};
}

}  // namespace
}  // namespace dpfast

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("linear_uses_ghost", &dpfast::linear_uses_ghost_cpu);
}
