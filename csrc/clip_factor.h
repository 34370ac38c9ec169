// The clip factor of DP-SGD, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DPFAST_HOST_DEVICE __host__ __device__
#else
#define DPFAST_HOST_DEVICE
#endif

namespace dpfast {

// Added to the norm before dividing, as in Opacus and the seed paper.
constexpr double kClipEps = 1e-6;

// c = min(1, C / (sqrt(n) + eps)) computed in double with IEEE sqrt and division, so that
// ||c g|| <= C holds for the norm that was measured. A non-finite n (NaN or +Inf from a
// non-finite gradient) gives c = 0, and so does a negative n: a squared norm below 0 was
// computed with cancellation (a ghost norm of crafted inputs) and says nothing about the
// gradient's size, so the example is left out rather than kept unclipped.
DPFAST_HOST_DEVICE inline double clip_factor(double norm_sq, double max_norm) {
  if (!(norm_sq - norm_sq == 0.0)) return 0.0;  // x - x is NaN exactly when x is NaN or +-Inf
  if (norm_sq < 0.0) return 0.0;
  const double norm = sqrt(norm_sq);
  const double c = max_norm / (norm + kClipEps);
  return c < 1.0 ? c : 1.0;
}

}  // namespace dpfast
