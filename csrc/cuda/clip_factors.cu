// CUDA kernels: clip factors c_i = min(1, C / (||g_i|| + eps)), 0 for non-finite or masked;
// total_clip_factors sums the per-layer squared norms of every example first, in the same launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "clip_factor.h"

namespace dpfast {
namespace {

// The (B,) keep mask as bool on `device` (undefined for no mask), after checking its shape.
at::Tensor device_keep(const c10::optional<at::Tensor>& mask, int64_t batch,
                       const at::Device& device) {
  if (!mask.has_value()) return at::Tensor();
  TORCH_CHECK(mask->dim() == 1 && mask->size(0) == batch,
              "mask must have shape (B,) = (", batch, ",), got ", mask->sizes());
  return mask->to(device, at::kBool).contiguous();
}

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
  const at::Tensor keep = device_keep(mask, batch, norm_sq.device());
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

// Thread i: n_i = scale * sum_k norms_k[i] in fp64 (tensor k is float64 where wide[k], else
// float32), then c_i; both written in out_t.
template <typename out_t>
__global__ void total_clip_factors_kernel(const int64_t* __restrict__ ptrs,
                                          const int64_t* __restrict__ wide, int64_t count,
                                          const bool* __restrict__ keep, double max_norm,
                                          double scale, out_t* __restrict__ norm_sq,
                                          out_t* __restrict__ factors, int64_t batch) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= batch) return;
  double total = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    total += wide[k] ? reinterpret_cast<const double*>(ptrs[k])[i]
                     : static_cast<double>(reinterpret_cast<const float*>(ptrs[k])[i]);
  }
  total *= scale;
  const bool kept = keep == nullptr || keep[i];
  norm_sq[i] = static_cast<out_t>(total);
  factors[i] = static_cast<out_t>(kept ? clip_factor(total, max_norm) : 0.0);
}

std::tuple<at::Tensor, at::Tensor> total_clip_factors_cuda(at::TensorList norm_sqs,
                                                           double max_norm,
                                                           const c10::optional<at::Tensor>& mask,
                                                           double norm_scale) {
  TORCH_CHECK(!norm_sqs.empty(), "total_clip_factors: empty list of norms");
  const int64_t batch = norm_sqs[0].numel(), count = static_cast<int64_t>(norm_sqs.size());
  const at::Device device = norm_sqs[0].device();
  std::vector<at::Tensor> norms;
  std::vector<int64_t> host(2 * count);
  bool any_wide = false;
  for (int64_t k = 0; k < count; ++k) {
    const at::Tensor& n = norm_sqs[k];
    TORCH_CHECK(n.dim() == 1 && n.size(0) == batch, "total_clip_factors: norm_sqs[", k,
                "] has shape ", n.sizes(), ", expected (", batch, ",)");
    TORCH_CHECK(n.device() == device, "total_clip_factors: norm_sqs[", k, "] is on ",
                n.device(), ", norm_sqs[0] on ", device);
    const bool wide = n.scalar_type() == at::kDouble;
    norms.push_back(wide ? n.contiguous() : n.to(at::kFloat).contiguous());
    host[k] = reinterpret_cast<int64_t>(norms.back().data_ptr());
    host[count + k] = wide;
    any_wide |= wide;
  }
  const at::Tensor keep = device_keep(mask, batch, device);
  const c10::cuda::CUDAGuard guard(device);
  const at::TensorOptions opts =
      norm_sqs[0].options().dtype(any_wide ? at::kDouble : at::kFloat);
  at::Tensor norm_sq = at::empty({batch}, opts), factors = at::empty({batch}, opts);
  if (batch == 0) return {norm_sq, factors};
  const at::Tensor meta =
      at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(device, /*non_blocking=*/true);
  const int64_t* ptrs = meta.data_ptr<int64_t>();
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>((batch + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "total_clip_factors_cuda", [&] {
    total_clip_factors_kernel<scalar_t>
        <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            ptrs, ptrs + count, count, keep.defined() ? keep.data_ptr<bool>() : nullptr,
            max_norm, norm_scale, norm_sq.data_ptr<scalar_t>(), factors.data_ptr<scalar_t>(),
            batch);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norm_sq, factors};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CUDA, m) {
  m.impl("clip_factors", &clip_factors_cuda);
  m.impl("total_clip_factors", &total_clip_factors_cuda);
}

}  // namespace dpfast
