// Block-wide sum of one double per thread (kThreads threads, a power of two) through shared
// memory; every thread gets the result.
#pragma once

namespace dpfast {

template <int kThreads>
__device__ inline double block_sum(double value) {
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  return partial[0];
}

}  // namespace dpfast
