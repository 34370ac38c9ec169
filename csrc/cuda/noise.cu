// CUDA kernel: fused multi-tensor Gaussian noise, grads[k] = (grads[k] + std * z) * scale, in
// one launch per dtype for the whole list. The noise is the same function as the CPU kernel's
// (philox.h): element j of tensor k takes normal j % 2 of Philox pair (seed, stream k, j / 2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "philox.h"
#include "tensor_list.cuh"

namespace dpfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPairsPerThread = 8;
constexpr int64_t kPairsPerBlock = kThreads * kPairsPerThread;

// Block b draws the pairs [chunk * kPairsPerBlock, ...) of tensor k = tensor_of_block(b);
// consecutive threads take consecutive pairs (coalesced writes).
template <typename scalar_t>
__global__ void add_noise_kernel(TensorListView list, const int64_t* __restrict__ numel,
                                 const int64_t* __restrict__ stream, double std, double scale,
                                 uint64_t seed) {
  const int64_t k = tensor_of_block(list, blockIdx.x);
  scalar_t* p = reinterpret_cast<scalar_t*>(list.ptrs[k]);
  const int64_t n = numel[k];
  const int64_t first = (blockIdx.x - list.first[k]) * kPairsPerBlock;
  for (int64_t r = 0; r < kPairsPerThread; ++r) {
    const int64_t pair = first + r * kThreads + threadIdx.x;
    if (pair >= list.units[k]) return;
    double z0, z1;
    box_muller(philox_block(seed, static_cast<uint32_t>(stream[k]), static_cast<uint64_t>(pair)),
               &z0, &z1);
    const int64_t j = 2 * pair;
    p[j] = static_cast<scalar_t>((static_cast<double>(p[j]) + std * z0) * scale);
    if (j + 1 < n) {
      p[j + 1] = static_cast<scalar_t>((static_cast<double>(p[j + 1]) + std * z1) * scale);
    }
  }
}

void add_noise_cuda(at::TensorList grads, double std, double scale, int64_t seed) {
  TORCH_CHECK(std >= 0.0, "add_noise_: std must be >= 0, got ", std);
  if (grads.empty()) return;
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  // Contiguous work tensors (copies of non-contiguous gradients, copied back at the end),
  // grouped by dtype: one launch per dtype.
  std::vector<at::Tensor> work(grads.size());
  std::map<at::ScalarType, std::vector<size_t>> by_dtype;
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& g = grads[k];
    TORCH_CHECK(g.device() == device, "add_noise_: grads[", k, "] is on ", g.device(),
                ", grads[0] on ", device);
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "add_noise_: grads[", k,
                "] must be floating point, got ", g.scalar_type());
    work[k] = g.is_contiguous() ? g : g.contiguous();
    if (g.numel() > 0) by_dtype[g.scalar_type()].push_back(k);
  }
  for (const auto& [dtype, members] : by_dtype) {
    std::vector<at::Tensor> tensors;
    std::vector<int64_t> pairs, extra;  // extra: numel, then stream index, per tensor
    for (size_t k : members) {
      tensors.push_back(work[k]);
      pairs.push_back((work[k].numel() + 1) / 2);
    }
    for (size_t k : members) extra.push_back(work[k].numel());
    for (size_t k : members) extra.push_back(static_cast<int64_t>(k));
    const TensorListMeta meta(tensors, pairs, kPairsPerBlock, device);
    const at::Tensor extra_dev =
        at::tensor(extra, at::TensorOptions().dtype(at::kLong)).to(device, true);
    const int64_t* numel = extra_dev.data_ptr<int64_t>();
    const int64_t* stream = numel + members.size();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "add_noise_cuda", [&] {
      add_noise_kernel<scalar_t>
          <<<meta.blocks(), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              meta.view(), numel, stream, std, scale, static_cast<uint64_t>(seed));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (size_t k = 0; k < grads.size(); ++k) {
    if (!grads[k].is_contiguous()) grads[k].copy_(work[k]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CUDA, m) { m.impl("add_noise_", &add_noise_cuda); }

}  // namespace dpfast
