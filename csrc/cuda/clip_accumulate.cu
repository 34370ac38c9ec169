// CUDA kernel: multi-tensor clip-and-accumulate of materialised per-example gradients.
//   pass 1 (one launch per dtype): n_i = sum_k ||g_k[i]||^2 over every tensor, in fp64 as on
//          the CPU (a float32 gradient above 1.8e19 would overflow an fp32 sum of squares and
//          be dropped instead of clipped);
//   pass 2: clip factors c_i (clip_factor.h, fp64; 0 for masked or non-finite examples);
//   pass 3 (one launch per dtype pair): summed_k[j] += sum_i c_i g_k[i, j], rows with c_i = 0
//          skipped exactly so that a non-finite example never reaches the sum.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "clip_accumulate_args.h"
#include "clip_factor.h"
#include "cuda/block_sum.cuh"
#include "tensor_list.cuh"

namespace dpfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kNormElemsPerBlock = kThreads * 16;  // pass 1: one chunk of one example
constexpr int64_t kColumnsPerBlock = kThreads;         // pass 3: one column per thread

// Pass 3 sums c_i g_i in fp32 (fp64 for fp64 inputs): each term is bounded by C.
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

// Pass 1. Block (b, i): the squares of example i's elements in chunk b of its tensor.
template <typename scalar_t>
__global__ void norms_kernel(TensorListView list, double* __restrict__ norm_sq) {
  using acc_t = double;
  const int64_t k = tensor_of_block(list, blockIdx.x);
  const int64_t n = list.units[k];
  const int64_t begin = (blockIdx.x - list.first[k]) * kNormElemsPerBlock;
  const int64_t end = begin + kNormElemsPerBlock < n ? begin + kNormElemsPerBlock : n;
  const scalar_t* row = reinterpret_cast<const scalar_t*>(list.ptrs[k]) + blockIdx.y * n;
  acc_t sum = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const acc_t v = static_cast<acc_t>(row[j]);
    sum += v * v;
  }
  const double total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) atomicAdd(&norm_sq[blockIdx.y], total);
}

// Pass 2.
__global__ void factors_kernel(const double* __restrict__ norm_sq, const bool* __restrict__ keep,
                               double* __restrict__ factors, double max_norm, int64_t batch) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= batch) return;
  const bool kept = keep == nullptr || keep[i];
  factors[i] = kept ? clip_factor(norm_sq[i], max_norm) : 0.0;
}

// Pass 3. Thread t of block b: column j of its tensor, summed over the batch (coalesced rows).
template <typename in_t, typename out_t>
__global__ void accumulate_kernel(TensorListView in, const int64_t* __restrict__ out_ptrs,
                                  const double* __restrict__ factors, int64_t batch) {
  using acc_t = typename Accumulate<in_t>::type;
  const int64_t k = tensor_of_block(in, blockIdx.x);
  const int64_t n = in.units[k];
  const int64_t j = (blockIdx.x - in.first[k]) * kColumnsPerBlock + threadIdx.x;
  if (j >= n) return;
  const in_t* g = reinterpret_cast<const in_t*>(in.ptrs[k]);
  acc_t sum = 0;
  for (int64_t i = 0; i < batch; ++i) {
    const double c = factors[i];
    if (c == 0.0) continue;
    sum += static_cast<acc_t>(c) * static_cast<acc_t>(g[i * n + j]);
  }
  out_t* out = reinterpret_cast<out_t*>(out_ptrs[k]);
  out[j] = static_cast<out_t>(static_cast<acc_t>(out[j]) + sum);
}

at::Tensor clip_accumulate_cuda(at::TensorList per_example, at::TensorList summed,
                                double max_norm, const c10::optional<at::Tensor>& mask) {
  const int64_t batch = check_clip_accumulate_args(per_example, summed, mask);
  const at::Device device = per_example[0].device();
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(batch <= 65535, "clip_accumulate_ (cuda): at most 65535 examples per call, got ",
              batch);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor keep;
  if (mask.has_value()) {
    keep = mask->to(device, at::kBool).contiguous();
  }
  std::vector<at::Tensor> grads, outs;
  for (size_t k = 0; k < per_example.size(); ++k) {
    TORCH_CHECK(per_example[k].device() == device && summed[k].device() == device,
                "clip_accumulate_: all tensors must be on ", device);
    grads.push_back(per_example[k].contiguous());
    outs.push_back(summed[k].is_contiguous() ? summed[k] : at::zeros_like(summed[k]).contiguous());
  }
  const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor norm_sq = at::zeros({batch}, options);
  at::Tensor factors = at::empty({batch}, options);

  // Groups of tensors with one input dtype (pass 1) / one (input, output) dtype pair (pass 3).
  std::map<at::ScalarType, std::vector<size_t>> by_in;
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>> by_pair;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (grads[k].numel() == 0) continue;
    by_in[grads[k].scalar_type()].push_back(k);
    by_pair[{grads[k].scalar_type(), outs[k].scalar_type()}].push_back(k);
  }
  if (batch > 0) {
    for (const auto& [dtype, members] : by_in) {
      std::vector<at::Tensor> tensors;
      std::vector<int64_t> units;
      for (size_t k : members) {
        tensors.push_back(grads[k]);
        units.push_back(grads[k].numel() / batch);
      }
      const TensorListMeta meta(tensors, units, kNormElemsPerBlock, device);
      const dim3 grid(static_cast<unsigned>(meta.blocks()), static_cast<unsigned>(batch));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clip_norms_cuda", [&] {
        norms_kernel<scalar_t>
            <<<grid, kThreads, 0, stream>>>(meta.view(), norm_sq.data_ptr<double>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    factors_kernel<<<static_cast<unsigned>((batch + kThreads - 1) / kThreads), kThreads, 0,
                     stream>>>(norm_sq.data_ptr<double>(),
                               keep.defined() ? keep.data_ptr<bool>() : nullptr,
                               factors.data_ptr<double>(), max_norm, batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (const auto& [dtypes, members] : by_pair) {
      std::vector<at::Tensor> tensors;
      std::vector<int64_t> units, out_ptrs;
      for (size_t k : members) {
        tensors.push_back(grads[k]);
        units.push_back(outs[k].numel());
        out_ptrs.push_back(reinterpret_cast<int64_t>(outs[k].data_ptr()));
      }
      const TensorListMeta meta(tensors, units, kColumnsPerBlock, device);
      const at::Tensor out_dev =
          at::tensor(out_ptrs, at::TensorOptions().dtype(at::kLong)).to(device, true);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes.first, "clip_sum_in", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, dtypes.second, "clip_sum_out", [&] {
              accumulate_kernel<in_t, scalar_t>
                  <<<static_cast<unsigned>(meta.blocks()), kThreads, 0, stream>>>(
                      meta.view(), out_dev.data_ptr<int64_t>(), factors.data_ptr<double>(),
                      batch);
            });
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  for (size_t k = 0; k < outs.size(); ++k) {
    if (!summed[k].is_contiguous()) summed[k].add_(outs[k]);
  }
  return norm_sq.to(norms_dtype(per_example));
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CUDA, m) { m.impl("clip_accumulate_", &clip_accumulate_cuda); }

}  // namespace dpfast
