// CPU kernel of the group-norm rules' per-example affine gradients (rules/group_norm.py,
// rules/timm_layers.py): for x (B, C, S) normalised per (example, group) of C/G channels,
// xhat = (x - mean) / sqrt(var + eps) (biased variance), and g the gradient of the layer's
// output, optionally after a ReLU on y = weight xhat + bias (timm's GroupNormAct):
//
//   dweight[i, c] = sum_s g'_ics xhat_ics,   dbias[i, c] = sum_s g'_ics,
//   g' = g, or g [y > 0] with relu.
//
// One pass for the mean, one for the variance (two-pass: exact where the mean is large against
// the spread) and one for the sums, per (example, group) block, in double, blocks in parallel:
// the PyTorch composition (recompute xhat, y, the ReLU's backward, the products) makes about ten
// passes over tensors of the input's size.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu/reduce.h"
#include "cpu/vector_clones.h"

namespace dpfast {
namespace {

template <typename scalar_t>
DPFAST_VECTOR_CLONES double block_sum(const scalar_t* __restrict__ x, int64_t n) {
  double lanes[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(x[j + l]);
  }
  double total = 0.0;
  for (; j < n; ++j) total += static_cast<double>(x[j]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename scalar_t>
DPFAST_VECTOR_CLONES double block_centred_squares(const scalar_t* __restrict__ x, int64_t n,
                                                  double mean) {
  double lanes[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double d = static_cast<double>(x[j + l]) - mean;
      lanes[l] += d * d;
    }
  }
  double total = 0.0;
  for (; j < n; ++j) {
    const double d = static_cast<double>(x[j]) - mean;
    total += d * d;
  }
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// (sum_s g' xhat, sum_s g') over one channel's n positions.
template <typename scalar_t>
DPFAST_VECTOR_CLONES void channel_sums(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ g, int64_t n, double mean,
                                       double rstd, double w, double b, bool relu, double* out) {
  double lw[kLanes] = {0.0}, lb[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double xh = (static_cast<double>(x[j + l]) - mean) * rstd;
      const double gv = static_cast<double>(g[j + l]);
      const double gg = (!relu || xh * w + b > 0.0) ? gv : 0.0;
      lw[l] += gg * xh;
      lb[l] += gg;
    }
  }
  double sw = 0.0, sb = 0.0;
  for (; j < n; ++j) {
    const double xh = (static_cast<double>(x[j]) - mean) * rstd;
    const double gg = (!relu || xh * w + b > 0.0) ? static_cast<double>(g[j]) : 0.0;
    sw += gg * xh;
    sb += gg;
  }
  for (int l = 0; l < kLanes; ++l) {
    sw += lw[l];
    sb += lb[l];
  }
  out[0] = sw;
  out[1] = sb;
}

std::tuple<at::Tensor, at::Tensor> group_norm_affine_grads_cpu(
    const at::Tensor& x_in, const at::Tensor& g_in, int64_t groups, double eps,
    const c10::optional<at::Tensor>& weight_in, const c10::optional<at::Tensor>& bias_in,
    bool relu) {
  TORCH_CHECK(x_in.dim() >= 2 && x_in.sizes() == g_in.sizes(),
              "group_norm_affine_grads: x and g must be (B, C, *S) alike, got ", x_in.sizes(),
              " and ", g_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && g_in.device().is_cpu(),
              "group_norm_affine_grads: the cpp kernel takes CPU tensors");
  TORCH_CHECK(x_in.scalar_type() == g_in.scalar_type(),
              "group_norm_affine_grads: x and g must share a dtype");
  const int64_t batch = x_in.size(0), channels = x_in.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0, "group_norm_affine_grads: ", channels,
              " channels do not split into ", groups, " groups");
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  const int64_t positions = batch * channels ? x.numel() / (batch * channels) : 0;
  const int64_t per_group = channels / groups;
  auto per_channel = [&](const c10::optional<at::Tensor>& t, double fill) {
    if (t.has_value() && t->defined()) return t->detach().to(at::kDouble).contiguous();
    return at::full({channels}, fill, x.options().dtype(at::kDouble));
  };
  const at::Tensor weight = per_channel(weight_in, 1.0), bias = per_channel(bias_in, 0.0);
  at::Tensor sums = at::empty({batch, channels, 2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_affine_grads", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
    const double *pw = weight.data_ptr<double>(), *pb = bias.data_ptr<double>();
    double* out = sums.data_ptr<double>();
    const int64_t block = per_group * positions;
    at::parallel_for(0, batch * groups, grain_for(3 * block), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t first = (unit / groups) * channels + (unit % groups) * per_group;
        const scalar_t* xb = px + first * positions;
        const double mean = block ? block_sum(xb, block) / block : 0.0;
        const double var = block ? block_centred_squares(xb, block, mean) / block : 0.0;
        const double rstd = 1.0 / std::sqrt(var + eps);
        for (int64_t k = 0; k < per_group; ++k) {
          const int64_t c = first % channels + k;
          channel_sums(xb + k * positions, pg + (first + k) * positions, positions, mean, rstd,
                       pw[c], pb[c], relu, out + (first + k) * 2);
        }
      }
    });
  });
  return {sums.select(2, 0).to(x.scalar_type()), sums.select(2, 1).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("group_norm_affine_grads", &group_norm_affine_grads_cpu);
}

}  // namespace dpfast
