// CPU kernels of the linear-map ops, a (B, T, d_in) the layer input and g (B, T, d_out) the
// gradient of its output, G_i = g_i^T a_i:
//   linear_norm_sq     ghost: <a_i a_i^T, g_i g_i^T> from the upper triangle of tile pairs only;
//                      direct: sum of squares of g_i^T a_i, one block of d_out rows at a time;
//   linear_clipped_sum sum_i c_i G_i as GEMMs over the rows of kept examples (c_i != 0);
//   linear_uses_clipped_sum the same for maps sharing g whose inputs a joins side by side (an
//                      LSTM layer's W_ih, W_hh), each map's columns returned contiguous, with the
//                      biases' sum_i c_i sum_t g_it from the same GEMM (a's rows get a 1).
// GEMMs go through ATen (the BLAS torch was built with, its own threads); the reductions of
// their outputs are fused loops in double, parallel over examples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/reduce.h"

namespace dpfast {
namespace {

// Target positions per column tile of the ghost norm (tiles are then made equal in width).
constexpr int64_t kGhostTile = 48;
// Elements of the direct norm's block of G for the whole batch (4 MiB of float).
constexpr int64_t kDirectBlock = int64_t{1} << 20;
// Rows of a, g per GEMM of the clipped sum (whole examples; at least one).
constexpr int64_t kChunkRows = 2048;

void check_pair(const char* op, const at::Tensor& a, const at::Tensor& g) {
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3 && a.size(0) == g.size(0) && a.size(1) == g.size(1),
              op, ": a (B, T, d_in) and g (B, T, d_out) must agree in B and T, got a ",
              a.sizes(), " and g ", g.sizes());
  TORCH_CHECK(a.device().is_cpu() && g.device().is_cpu(), op, ": the cpp kernel takes CPU tensors");
}

// Per-example sums of the weighted products of two (B, rows, cols) buffers:
// out[i] += sum_{r, c} w_r x[i, r, c] y[i, r, c], w_r = 2 for r < diag_begin, else 1.
template <typename scalar_t>
void add_weighted_products(const at::Tensor& x, const at::Tensor& y, int64_t diag_begin,
                           std::vector<double>& out) {
  const int64_t batch = x.size(0), rows = x.size(1), cols = x.size(2), n = rows * cols;
  const scalar_t* px = x.data_ptr<scalar_t>();
  const scalar_t* py = y.data_ptr<scalar_t>();
  const int64_t off = diag_begin * cols;
  at::parallel_for(0, batch, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t *xi = px + i * n, *yi = py + i * n;
      out[i] += 2.0 * sum_products(xi, yi, off) + sum_products(xi + off, yi + off, n - off);
    }
  });
}

// Ghost norm: the T x T Grams are built one column tile J = [s, e) at a time, rows [0, e)
// only: entries above the diagonal tile count twice (the Grams are symmetric), so about
// half of each Gram is computed, and never more than (B, T, tile) of it is held.
template <typename scalar_t>
std::vector<double> ghost_norm_sq(const at::Tensor& a, const at::Tensor& g) {
  const int64_t batch = a.size(0), positions = a.size(1);
  const int64_t tiles = (positions + kGhostTile - 1) / kGhostTile;
  const int64_t width = (positions + tiles - 1) / tiles;
  at::Tensor buf_a = at::empty({batch * positions * width}, a.options());
  at::Tensor buf_g = at::empty({batch * positions * width}, g.options());
  std::vector<double> total(batch, 0.0);
  for (int64_t s = 0; s < positions; s += width) {
    const int64_t e = std::min(positions, s + width), w = e - s;
    at::Tensor gram_a = buf_a.narrow(0, 0, batch * e * w).view({batch, e, w});
    at::Tensor gram_g = buf_g.narrow(0, 0, batch * e * w).view({batch, e, w});
    at::bmm_out(gram_a, a.narrow(1, 0, e), a.narrow(1, s, w).transpose(1, 2));
    at::bmm_out(gram_g, g.narrow(1, 0, e), g.narrow(1, s, w).transpose(1, 2));
    add_weighted_products<scalar_t>(gram_a, gram_g, s, total);
  }
  return total;
}

// Direct norm: rows [r0, r0 + r) of every G_i = g_i^T a_i at a time, squared and summed.
template <typename scalar_t>
std::vector<double> direct_norm_sq(const at::Tensor& a, const at::Tensor& g) {
  const int64_t batch = a.size(0), d_in = a.size(2), d_out = g.size(2);
  const int64_t rows = std::clamp<int64_t>(kDirectBlock / std::max<int64_t>(batch * d_in, 1), 1,
                                           d_out);
  at::Tensor buf = at::empty({batch * rows * d_in}, a.options());
  std::vector<double> total(batch, 0.0);
  for (int64_t r0 = 0; r0 < d_out; r0 += rows) {
    const int64_t r = std::min(rows, d_out - r0), n = r * d_in;
    at::Tensor block = buf.narrow(0, 0, batch * n).view({batch, r, d_in});
    at::bmm_out(block, g.narrow(2, r0, r).transpose(1, 2), a);
    const scalar_t* p = block.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) total[i] += sum_squares(p + i * n, n);
    });
  }
  return total;
}

at::Tensor linear_norm_sq_cpu(const at::Tensor& a_in, const at::Tensor& g_in,
                              c10::string_view method) {
  check_pair("linear_norm_sq", a_in, g_in);
  TORCH_CHECK(method == "ghost" || method == "direct",
              "linear_norm_sq: method must be 'ghost' or 'direct', got '", std::string(method),
              "'");
  const bool wide = a_in.scalar_type() == at::kDouble || g_in.scalar_type() == at::kDouble;
  const at::ScalarType dtype = wide ? at::kDouble : at::kFloat;
  const int64_t batch = a_in.size(0);
  if (a_in.size(1) == 0 || a_in.size(2) == 0 || g_in.size(2) == 0) {
    return at::zeros({batch}, a_in.options().dtype(dtype));
  }
  const at::Tensor a = a_in.to(dtype), g = g_in.to(dtype);
  std::vector<double> total;
  AT_DISPATCH_FLOATING_TYPES(dtype, "linear_norm_sq", [&] {
    total = method == "ghost" ? ghost_norm_sq<scalar_t>(a, g) : direct_norm_sq<scalar_t>(a, g);
  });
  return at::tensor(total, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// Whether t (B, T, d) is a view of (T, B, d) memory (a recurrent layer's gate gradients on
// CPU): then the rows of all examples at steps [t0, t1) are one matrix, without a copy.
bool time_major(const at::Tensor& t) {
  return t.size(0) > 1 && t.size(1) > 1 && t.transpose(0, 1).is_contiguous();
}

// The scaled side's rows of one chunk into `scaled` (rows, width [+ 1]): side * factors, and
// with `ones` a last column holding the factors (a column of ones, scaled).
void scale_rows(at::Tensor& scaled, const at::Tensor& side, const at::Tensor& factors,
                bool ones) {
  const int64_t width = side.size(-1);
  if (!ones) {
    at::mul_out(scaled, side, factors);
    return;
  }
  at::Tensor values = scaled.narrow(-1, 0, width);
  at::mul_out(values, side, factors);
  scaled.narrow(-1, width, 1).copy_(factors.expand_as(scaled.narrow(-1, width, 1)));
}

// Adds one chunk's rows: x the scaled side's rows, y the other side's; with scale_a x is a's
// (out += y^T x), else g's (out += x^T y).
void add_chunk(at::Tensor& out, const at::Tensor& x, const at::Tensor& y, bool scale_a) {
  if (scale_a) {
    out.addmm_(y.t(), x);
  } else {
    out.addmm_(x.t(), y);
  }
}

// out += the clipped sum for a time-major unscaled side when every c_i != 0: per chunk of
// steps, the scaled side's rows scaled into a (steps, B, d) buffer in the same order, one GEMM.
void add_time_major(at::Tensor& out, const at::Tensor& scaled_side, const at::Tensor& other_side,
                    const at::Tensor& c, bool scale_a, bool ones) {
  const int64_t batch = other_side.size(0), positions = other_side.size(1);
  const int64_t width = scaled_side.size(2) + (ones ? 1 : 0);
  const int64_t steps = std::clamp<int64_t>(kChunkRows / batch, 1, positions);
  const at::Tensor other = other_side.to(out.scalar_type()).transpose(0, 1);  // (T, B, .) view
  const at::Tensor factors = c.view({1, batch, 1});
  at::Tensor buf = at::empty({steps * batch * width}, out.options());
  for (int64_t t0 = 0; t0 < positions; t0 += steps) {
    const int64_t n = std::min(steps, positions - t0), rows = n * batch;
    at::Tensor scaled = buf.narrow(0, 0, rows * width).view({n, batch, width});
    scale_rows(scaled,
               scaled_side.narrow(1, t0, n).transpose(0, 1).to(out.scalar_type()), factors, ones);
    add_chunk(out, scaled.view({rows, width}),
              other.narrow(0, t0, n).view({rows, other_side.size(2)}), scale_a);
  }
}

// out (d_out, d_in [+ 1]) += sum_i c_i g_i^T [a_i, 1] over the examples with c_i != 0,
// accumulating in out's dtype: with `ones`, a's rows get a trailing 1, so that out's last
// column is the biases' sum_i c_i sum_t g_it, from the same GEMM (no pass of its own over g).
// Runs of consecutive kept examples are cut into chunks of about kChunkRows rows; per chunk one
// operand (the narrower, a with `ones`) is scaled into a buffer and one GEMM adds
// (scaled g)^T a (or g^T (scaled a)) to the sum. Examples with c_i = 0 are never read. A
// time-major unscaled operand with every c_i != 0 is read in place (add_time_major).
void add_clipped_sum(at::Tensor& out, const at::Tensor& a, const at::Tensor& g,
                     const at::Tensor& scale, bool ones) {
  const int64_t batch = a.size(0), positions = a.size(1);
  const at::ScalarType acc = out.scalar_type();
  const at::Tensor c = scale.to(at::kCPU, at::kDouble).contiguous();
  const double* pc = c.data_ptr<double>();
  const bool scale_a = ones || a.size(2) < g.size(2);
  const at::Tensor& scaled_side = scale_a ? a : g;
  const at::Tensor& other_side = scale_a ? g : a;
  const int64_t width = scaled_side.size(2) + (ones ? 1 : 0);
  if (time_major(other_side) && std::all_of(pc, pc + batch, [](double v) { return v != 0.0; })) {
    add_time_major(out, scaled_side, other_side, c.to(acc), scale_a, ones);
    return;
  }
  const int64_t per_chunk = std::max<int64_t>(1, kChunkRows / std::max<int64_t>(positions, 1));
  at::Tensor buf = at::empty({std::min(per_chunk, batch) * positions * width}, out.options());
  for (int64_t i = 0; i < batch;) {
    if (pc[i] == 0.0) {
      ++i;
      continue;
    }
    int64_t j = i + 1;
    while (j < batch && j - i < per_chunk && pc[j] != 0.0) ++j;
    const int64_t n = j - i, rows = n * positions;
    at::Tensor factors = c.narrow(0, i, n).to(acc).view({n, 1, 1});
    at::Tensor scaled = buf.narrow(0, 0, rows * width).view({n, positions, width});
    scale_rows(scaled, scaled_side.narrow(0, i, n).to(acc), factors, ones);
    add_chunk(out, scaled.view({rows, width}),
              other_side.narrow(0, i, n).to(acc).reshape({rows, other_side.size(2)}), scale_a);
    i = j;
  }
}

at::ScalarType accumulation(const at::Tensor& a) {
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_scale(const char* op, const at::Tensor& scale, int64_t batch) {
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == batch, op,
              ": scale must have shape (B,) = (", batch, ",), got ", scale.sizes());
}

// sum_i c_i g_i^T a_i (add_clipped_sum), in float32 (float64 for float64 a), returned in a's
// dtype.
at::Tensor linear_clipped_sum_cpu(const at::Tensor& a, const at::Tensor& g,
                                  const at::Tensor& scale) {
  check_pair("linear_clipped_sum", a, g);
  check_scale("linear_clipped_sum", scale, a.size(0));
  at::Tensor out = at::zeros({g.size(2), a.size(2)}, a.options().dtype(accumulation(a)));
  add_clipped_sum(out, a, g, scale, false);
  return out.to(a.scalar_type());
}

// The clipped sums of maps sharing the output gradient d whose inputs a (B, T, sum widths)
// holds side by side: [(d_out, widths[k]) contiguous for each map] and, with `bias`, the
// biases' (d_out,) sum_i c_i sum_t d_it, all in a's dtype. One GEMM for all maps and the bias
// (a's rows with a trailing 1: narrower GEMMs run slower, a GEMV would read d again), its
// column blocks then copied out.
std::vector<at::Tensor> linear_uses_clipped_sum_cpu(const at::Tensor& a, const at::Tensor& d,
                                                    const at::Tensor& scale,
                                                    at::IntArrayRef widths, bool bias) {
  check_pair("linear_uses_clipped_sum", a, d);
  check_scale("linear_uses_clipped_sum", scale, a.size(0));
  int64_t total = 0;
  for (const int64_t w : widths) {
    TORCH_CHECK(w > 0, "linear_uses_clipped_sum: widths must be positive, got ", widths);
    total += w;
  }
  TORCH_CHECK(total == a.size(2), "linear_uses_clipped_sum: widths ", widths,
              " must add up to a's last dim ", a.size(2));
  at::Tensor out =
      at::zeros({d.size(2), total + (bias ? 1 : 0)}, a.options().dtype(accumulation(a)));
  add_clipped_sum(out, a, d, scale, bias);
  std::vector<at::Tensor> sums;
  int64_t offset = 0;
  for (const int64_t w : widths) {
    sums.push_back(out.narrow(1, offset, w).contiguous().to(a.scalar_type()));
    offset += w;
  }
  if (bias) sums.push_back(out.select(1, total).contiguous().to(a.scalar_type()));
  return sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("linear_norm_sq", &linear_norm_sq_cpu);
  m.impl("linear_clipped_sum", &linear_clipped_sum_cpu);
  m.impl("linear_uses_clipped_sum", &linear_uses_clipped_sum_cpu);
}

}  // namespace dpfast
