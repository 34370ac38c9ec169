// CPU kernel: fused multi-tensor Gaussian noise, grads[k] = (grads[k] + std * z) * scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox.h"

namespace dpfast {
namespace {

// Element j of tensor k takes normal number (j % 2) of Philox pair (seed, stream k, j / 2).
void add_noise_one(at::Tensor& g, double std, double scale, uint64_t seed, uint32_t stream) {
  const int64_t n = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_noise_", [&] {
    scalar_t* p = g.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 1) / 2, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        double z[2];
        normal_pair(seed, stream, static_cast<uint64_t>(pair), &z[0], &z[1]);
        for (int64_t h = 0; h < 2 && 2 * pair + h < n; ++h) {
          const int64_t j = 2 * pair + h;
          p[j] = static_cast<scalar_t>((static_cast<double>(p[j]) + std * z[h]) * scale);
        }
      }
    });
  });
}

void add_noise_cpu(at::TensorList grads, double std, double scale, int64_t seed) {
  TORCH_CHECK(std >= 0.0, "add_noise_: std must be >= 0, got ", std);
  for (size_t k = 0; k < grads.size(); ++k) {
    at::Tensor g = grads[k];
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "add_noise_: grads[", k,
                "] must be floating point, got ", g.scalar_type());
    if (g.is_contiguous()) {
      add_noise_one(g, std, scale, static_cast<uint64_t>(seed), static_cast<uint32_t>(k));
    } else {
      at::Tensor tmp = g.contiguous();
      add_noise_one(tmp, std, scale, static_cast<uint64_t>(seed), static_cast<uint32_t>(k));
      g.copy_(tmp);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) { m.impl("add_noise_", &add_noise_cpu); }

}  // namespace dpfast
