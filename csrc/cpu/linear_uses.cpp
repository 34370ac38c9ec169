// Per-example weight gradients of linear maps that share one output gradient d (a recurrent
// layer's input and recurrent weights both get the gate gradients), with their squared norms
// taken while each example's gradient is still in cache (rules/_linear_uses.py):
//
//   out_k[b] = d_b^T a_k,b  (G x d_k),   bias_out[b] = sum_t d_b,t  (G),
//   norm_sq[b] = sum_k ||out_k[b]||^2 + ||bias_out[b]||^2,
//
// the norms of the values stored (rounded to their dtype), summed in double. a_k (B, T, d_k) and
// d (B, T, G): each example's T rows evenly spaced (batch-first, or a time-major view), the last
// dim contiguous; out_k (B, G, d_k) and bias_out (B, G) contiguous. One example per task: its
// GEMMs by BLAS on that thread (torch's own sgemm_/dgemm_), then the sums of squares from cache.
// Against torch.bmm per weight and a separate pass for the norms: 13 -> 10.5 ms for the
// char-LSTM's first layer at batch 64 (2 cores); BLAS beat small_gemm.h's register tiles here
// (13 ms), which lack its packing for K = T = 64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/fortran_blas.h"
#include "cpu/reduce.h"

namespace dpfast {
namespace {

// c (G x d_k, row-major) = d_b^T a_b, a_b (T x d_k) with rows lda apart, d_b (T x G) rows ldd
// apart. In BLAS's column-major terms c^T (d_k x G) = a_b^T (stored as is) times d_b (stored
// transposed).
template <typename scalar_t>
bool blas_example_gemm(int64_t steps, int64_t width, int64_t gates, const scalar_t* a, int64_t lda,
                       const scalar_t* d, int64_t ldd, scalar_t* c) {
  const int m = static_cast<int>(width), n = static_cast<int>(gates), k = static_cast<int>(steps);
  const int ia = static_cast<int>(lda), id = static_cast<int>(ldd);
  const scalar_t one = 1, zero = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!sgemm_) return false;
    sgemm_("N", "T", &m, &n, &k, &one, a, &ia, d, &id, &zero, c, &m);
  } else {
    if (!dgemm_) return false;
    dgemm_("N", "T", &m, &n, &k, &one, a, &ia, d, &id, &zero, c, &m);
  }
  return true;
}

// (B, T, C) with a contiguous last dim and rows within 2^31 elements of each other: as is; else
// a contiguous copy.
at::Tensor rows_evenly_spaced(const at::Tensor& t) {
  if (t.stride(2) == 1 && t.stride(1) >= t.size(2) && t.stride(1) < (int64_t{1} << 31)) return t;
  return t.contiguous();
}

at::Tensor linear_uses_grads_cpu(at::TensorList inputs, const at::Tensor& d_in,
                                 at::TensorList out, const c10::optional<at::Tensor>& bias_out) {
  const bool has_bias = bias_out.has_value() && bias_out->defined();
  TORCH_CHECK((has_bias || !inputs.empty()) && inputs.size() == out.size(),
              "linear_uses_grads: as many outputs as inputs, and at least one of them or a bias, "
              "got ", inputs.size(), " inputs and ", out.size(), " outputs");
  TORCH_CHECK(d_in.dim() == 3 && d_in.device().is_cpu(),
              "linear_uses_grads: d must be a (B, T, G) CPU tensor, got ", d_in.sizes());
  const int64_t batch = d_in.size(0), steps = d_in.size(1), gates = d_in.size(2);
  TORCH_CHECK(gates < (int64_t{1} << 31) && steps < (int64_t{1} << 31),
              "linear_uses_grads: d too large for BLAS, got ", d_in.sizes());
  const at::Tensor d = rows_evenly_spaced(d_in);
  std::vector<at::Tensor> as;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const at::Tensor& a = inputs[k];
    TORCH_CHECK(a.dim() == 3 && a.size(0) == batch && a.size(1) == steps &&
                    a.scalar_type() == d.scalar_type() && a.device().is_cpu(),
                "linear_uses_grads: inputs[", k, "] must be (B, T, d) = (", batch, ", ", steps,
                ", d) of d's dtype on the CPU, got ", a.sizes(), " ", a.scalar_type());
    TORCH_CHECK(out[k].is_contiguous() && out[k].dtype() == d.dtype() &&
                    out[k].sizes() == at::IntArrayRef({batch, gates, a.size(2)}),
                "linear_uses_grads: out[", k, "] must be a contiguous (", batch, ", ", gates, ", ",
                a.size(2), ") tensor of d's dtype, got ", out[k].sizes());
    as.push_back(rows_evenly_spaced(a));
  }
  if (has_bias) {
    TORCH_CHECK(bias_out->is_contiguous() && bias_out->dtype() == d.dtype() &&
                    bias_out->sizes() == at::IntArrayRef({batch, gates}),
                "linear_uses_grads: bias_out must be a contiguous (", batch, ", ", gates,
                ") tensor of d's dtype, got ", bias_out->sizes());
  }
  at::Tensor norm_sq = at::zeros({batch}, d.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "linear_uses_grads", [&] {
    const scalar_t* pd = d.data_ptr<scalar_t>();
    double* pn = norm_sq.data_ptr<double>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* db = pd + b * d.stride(0);
        double total = 0.0;
        for (size_t k = 0; k < as.size(); ++k) {
          const at::Tensor& a = as[k];
          const int64_t width = a.size(2);
          scalar_t* c = out[k].data_ptr<scalar_t>() + b * gates * width;
          const scalar_t* ab = a.data_ptr<scalar_t>() + b * a.stride(0);
          if (!blas_example_gemm(steps, width, gates, ab, a.stride(1), db, d.stride(1), c)) {
            at::Tensor c_view = out[k][b];
            at::mm_out(c_view, d[b].t(), a[b]);
          }
          total += sum_squares(c, gates * width);
        }
        if (has_bias) {
          scalar_t* bias = bias_out->data_ptr<scalar_t>() + b * gates;
          for (int64_t j = 0; j < gates; ++j) bias[j] = scalar_t(0);
          for (int64_t t = 0; t < steps; ++t) {
            const scalar_t* row = db + t * d.stride(1);
            for (int64_t j = 0; j < gates; ++j) bias[j] += row[j];
          }
          total += sum_squares(bias, gates);
        }
        pn[b] = total;
      }
    });
  });
  return norm_sq.to(d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

}  // namespace
}  // namespace dpfast

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("linear_uses_grads", &dpfast::linear_uses_grads_cpu);
}
