// CUDA kernel: clip factors c_i = min(1, C / (||g_i|| + eps)), 0 for non-finite or masked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "clip_factor.h"

namespace dpfast {
namespace {

template <typename scalar_t>
__global__ void clip_factors_kernel(const scalar_t* __restrict__ norm_sq,
                                    const bool* __restrict__ keep, scalar_t* __restrict__ out,
                                    double max_norm, int64_t batch) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= batch) return;
  const bool kept = keep == nullptr || keep[i];
  out[i] = static_cast<scalar_t>(kept ? clip_factor(static_cast<double>(norm_sq[i]), max_norm)
                                      : 0.0);
}

at::Tensor clip_factors_cuda(const at::Tensor& norm_sq, double max_norm,
                             const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(norm_sq.dim() == 1, "norm_sq must have shape (B,), got ", norm_sq.sizes());
  TORCH_CHECK(norm_sq.scalar_type() == at::kFloat || norm_sq.scalar_type() == at::kDouble,
              "clip_factors: norm_sq must be float32 or float64, got ", norm_sq.scalar_type());
  const int64_t batch = norm_sq.size(0);
  at::Tensor keep;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == batch,
                "mask must have shape (B,) = (", batch, ",), got ", mask->sizes());
    keep = mask->to(norm_sq.device(), at::kBool).contiguous();
  }
  const c10::cuda::CUDAGuard guard(norm_sq.device());
  const at::Tensor n = norm_sq.contiguous();
  at::Tensor out = at::empty_like(n);
  if (batch == 0) return out;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>((batch + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "clip_factors_cuda", [&] {
    clip_factors_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        n.data_ptr<scalar_t>(), keep.defined() ? keep.data_ptr<bool>() : nullptr,
        out.data_ptr<scalar_t>(), max_norm, batch);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CUDA, m) { m.impl("clip_factors", &clip_factors_cuda); }

}  // namespace dpfast
