// CPU kernel: fused multi-tensor Gaussian noise, grads[k] = (grads[k] + std * z) * scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "philox.h"

namespace dpfast {
namespace {

constexpr int64_t kPairsPerChunk = 256;

// x86-64: an AVX2+FMA clone and a baseline clone, the loader picking the one the CPU runs (GCC
// and Clang ifunc). Elsewhere (ARM, ...) one build for the target's own vector unit.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DPFAST_X86_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define DPFAST_X86_CLONES
#endif

// z[2i], z[2i + 1] = the normal pair (seed, stream, first + i) for i < count <= kPairsPerChunk:
// philox_block and box_muller of philox.h, with the lanes as the inner loop of every stage
// (structure of arrays), so that each loop vectorises.
DPFAST_X86_CLONES void normal_pairs(
    double* __restrict__ z, uint64_t seed, uint32_t stream, int64_t first, int64_t count) {
  uint32_t a[kPairsPerChunk], b[kPairsPerChunk], c[kPairsPerChunk], d[kPairsPerChunk];
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t pair = static_cast<uint64_t>(first + i);
    a[i] = static_cast<uint32_t>(pair);
    b[i] = static_cast<uint32_t>(pair >> 32);
    c[i] = stream;
    d[i] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t i = 0; i < count; ++i) philox_round(a[i], b[i], c[i], d[i], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t i = 0; i < count; ++i) {
    box_muller(Philox4{{a[i], b[i], c[i], d[i]}}, &z[2 * i], &z[2 * i + 1]);
  }
}

// Element j of tensor k takes normal number (j % 2) of Philox pair (seed, stream k, j / 2).
void add_noise_one(at::Tensor& g, double std, double scale, uint64_t seed, uint32_t stream) {
  const int64_t n = g.numel();
  const int64_t pairs = (n + 1) / 2;
  const int64_t chunks = (pairs + kPairsPerChunk - 1) / kPairsPerChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_noise_", [&] {
    scalar_t* p = g.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 4, [&](int64_t chunk_begin, int64_t chunk_end) {
      double z[2 * kPairsPerChunk];
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t first = chunk * kPairsPerChunk;
        const int64_t count = std::min(kPairsPerChunk, pairs - first);
        normal_pairs(z, seed, stream, first, count);
        const int64_t j0 = 2 * first, width = std::min(2 * count, n - j0);
        for (int64_t j = 0; j < width; ++j) {
          p[j0 + j] = static_cast<scalar_t>((static_cast<double>(p[j0 + j]) + std * z[j]) * scale);
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
