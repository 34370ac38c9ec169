// Per-example weight gradients of a depthwise 2-d convolution (rules/conv.py): for x (B, C, H, W)
// and the output gradient g (B, M C, Ho, Wo) of a conv with groups = C (channel multiplier M:
// output channel o reads input channel o / M),
//   G[b, o, ky, kx] = sum_{oy, ox} g[b, o, oy, ox] x[b, o / M, sy oy - py + dy ky, sx ox - px + dx kx]
// with out-of-range input positions zero (the padding; only the leading padding shifts the
// window, trailing padding only makes positions past the input read zero). One thread per plane
// (b, o): k_h k_w dot products over the plane's valid rows, each summed in the input's dtype over
// one output row (kLanes independent lanes) and across rows in double. A strided conv's input
// row is first split into its stride phases (x[s j + p] -> phase p, position j), so that every
// dot product reads both operands contiguously. oneDNN computes these as one grouped convolution
// with the output gradients as kernels, or one weight gradient with the batch folded into the
// groups; both run at a few GFLOP/s on large maps (8 x 96 channels at 112x112, stride 2: 25 ms).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "reduce.h"
#include "vector_clones.h"

namespace dpfast {
namespace {

// floor(a / b) for b > 0.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct Geometry {
  int64_t h, w, ho, wo, kh, kw, sy, sx, py, px, dy, dx;
};

// Where tap column kx reads: input column sx (ox + shift) + phase, for ox in [first, last).
struct Columns {
  int64_t phase, shift, first, last;
};

std::vector<Columns> tap_columns(const Geometry& k) {
  std::vector<Columns> columns(k.kw);
  for (int64_t kx = 0; kx < k.kw; ++kx) {
    const int64_t offset = k.dx * kx - k.px, shift = floor_div(offset, k.sx);
    // 0 <= sx ox + offset <= W - 1
    columns[kx] = {offset - shift * k.sx, shift, std::max<int64_t>(0, -shift),
                   std::min<int64_t>(k.wo, floor_div(k.w - 1 - offset, k.sx) + 1)};
  }
  return columns;
}

// One plane: x (H, W), g (Ho, Wo) -> out (kh, kw). With sx > 1 the plane is first copied into
// ``phases`` (H rows of sx phases of ceil(W / sx) values). acc: kh kw doubles of scratch.
template <typename scalar_t>
DPFAST_VECTOR_CLONES void plane_grads(const scalar_t* x, const scalar_t* __restrict__ g,
                                      scalar_t* __restrict__ out, const Geometry& k,
                                      const Columns* columns, scalar_t* phases,
                                      double* __restrict__ acc) {
  const int64_t phase_len = (k.w + k.sx - 1) / k.sx, row_len = k.sx > 1 ? k.sx * phase_len : k.w;
  if (k.sx > 1) {
    for (int64_t iy = 0; iy < k.h; ++iy) {
      for (int64_t p = 0; p < k.sx; ++p) {
        scalar_t* dst = phases + iy * row_len + p * phase_len;
        const scalar_t* src = x + iy * k.w + p;
        for (int64_t j = 0; j * k.sx + p < k.w; ++j) dst[j] = src[j * k.sx];
      }
    }
  }
  const scalar_t* rows = k.sx > 1 ? phases : x;
  std::fill(acc, acc + k.kh * k.kw, 0.0);
  for (int64_t oy = 0; oy < k.ho; ++oy) {
    const scalar_t* g_row = g + oy * k.wo;
    for (int64_t ky = 0; ky < k.kh; ++ky) {
      const int64_t iy = k.sy * oy - k.py + k.dy * ky;
      if (iy < 0 || iy >= k.h) continue;
      const scalar_t* x_row = rows + iy * row_len;
      for (int64_t kx = 0; kx < k.kw; ++kx) {
        const Columns& c = columns[kx];
        if (c.last <= c.first) continue;
        const scalar_t* src = x_row + c.phase * (k.sx > 1 ? phase_len : 1) + c.shift;
        const int64_t n = c.last - c.first;
        acc[ky * k.kw + kx] += static_cast<double>(
            sum_products<scalar_t>(g_row + c.first, src + c.first, n));
      }
    }
  }
  for (int64_t t = 0; t < k.kh * k.kw; ++t) out[t] = static_cast<scalar_t>(acc[t]);
}

at::Tensor depthwise_weight_grads_cpu(const at::Tensor& x_in, const at::Tensor& g_in,
                                      at::IntArrayRef kernel, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x_in.dim() == 4 && g_in.dim() == 4,
              "depthwise_weight_grads: x and g must be (B, C, H, W) and (B, M C, Ho, Wo), got ",
              x_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "depthwise_weight_grads: kernel, stride, padding and dilation take two values each");
  TORCH_CHECK(x_in.scalar_type() == g_in.scalar_type(),
              "depthwise_weight_grads: x and g must share a dtype");
  const int64_t batch = x_in.size(0), channels = x_in.size(1), outputs = g_in.size(1);
  TORCH_CHECK(g_in.size(0) == batch && channels > 0 && outputs % channels == 0,
              "depthwise_weight_grads: g must have the batch of x and a multiple of its ",
              channels, " channels, got ", g_in.sizes());
  const Geometry k{x_in.size(2), x_in.size(3), g_in.size(2), g_in.size(3), kernel[0], kernel[1],
                   stride[0],    stride[1],    padding[0],  padding[1],  dilation[0], dilation[1]};
  TORCH_CHECK(k.kh > 0 && k.kw > 0 && k.sy > 0 && k.sx > 0 && k.dy > 0 && k.dx > 0 && k.py >= 0 &&
                  k.px >= 0,
              "depthwise_weight_grads: kernel, stride and dilation must be positive, padding "
              "non-negative");
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  at::Tensor out = at::empty({batch, outputs, k.kh, k.kw}, x.options());
  const int64_t multiplier = outputs / channels, planes = batch * outputs;
  const int64_t phases_len = k.sx > 1 ? k.h * k.sx * ((k.w + k.sx - 1) / k.sx) : 0;
  const std::vector<Columns> columns = tap_columns(k);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_weight_grads", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, grain_for(k.ho * k.wo * k.kh * k.kw), [&](int64_t b, int64_t e) {
      std::vector<scalar_t> phases(phases_len);
      std::vector<double> acc(k.kh * k.kw);
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t example = plane / outputs, o = plane % outputs;
        const scalar_t* x_plane = px + (example * channels + o / multiplier) * k.h * k.w;
        plane_grads(x_plane, pg + plane * k.ho * k.wo, po + plane * k.kh * k.kw, k,
                    columns.data(), phases.data(), acc.data());
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace dpfast

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("depthwise_weight_grads", &dpfast::depthwise_weight_grads_cpu);
}
