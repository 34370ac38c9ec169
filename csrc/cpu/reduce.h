// Double-precision reductions of float buffers shared by the CPU kernels. Each keeps kLanes
// independent accumulators, so that the loops vectorise without reassociating one chain.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace dpfast {

// Grain of an at::parallel_for over items of `work` elements each: small jobs stay on one
// thread (waking the pool costs more than they do), as ATen's own kernels do.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
}

constexpr int kLanes = 8;

// sum_j x[j]^2 in double.
template <typename scalar_t>
double sum_squares(const scalar_t* x, int64_t n) {
  double lanes[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(x[j + l]);
      lanes[l] += v * v;
    }
  }
  double total = 0.0;
  for (; j < n; ++j) total += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// sum_j x[j] y[j] in acc_t (double unless asked; scalar_t where the caller sums short runs and
// adds them up in double itself).
template <typename acc_t = double, typename scalar_t>
inline __attribute__((always_inline)) acc_t sum_products(const scalar_t* x, const scalar_t* y,
                                                         int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<acc_t>(x[j + l]) * static_cast<acc_t>(y[j + l]);
    }
  }
  acc_t total = 0;
  for (; j < n; ++j) total += static_cast<acc_t>(x[j]) * static_cast<acc_t>(y[j]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace dpfast
