// CUDA kernel of embedding_norm_sq, a segmented reduction: ids (B, T), g (B, T, d). The valid
// positions are sorted by key = example * V + id (ATen's sort), so the rows of one (example,
// id) pair form a segment; block s sums the rows of segment s per column in fp64 and writes the
// sum of squares of that sum; thread i then adds up example i's segments (a contiguous range of
// the sorted keys) in order, so the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_sum.cuh"
#include "embedding_args.h"

namespace dpfast {
namespace {

constexpr int kThreads = 256;

// Block s: segment s = rows[offsets[s] .. offsets[s] + counts[s]) of g viewed as (B*T, dim).
template <typename scalar_t>
__global__ void segment_norms_kernel(const scalar_t* __restrict__ g,
                                     const int64_t* __restrict__ rows,
                                     const int64_t* __restrict__ offsets,
                                     const int64_t* __restrict__ counts, int64_t dim,
                                     double* __restrict__ segment_norm) {
  const int64_t s = blockIdx.x, begin = offsets[s], end = begin + counts[s];
  double sum_sq = 0.0;
  for (int64_t j = threadIdx.x; j < dim; j += kThreads) {
    double column = 0.0;
    for (int64_t r = begin; r < end; ++r) column += static_cast<double>(g[rows[r] * dim + j]);
    sum_sq += column * column;
  }
  const double total = block_sum<kThreads>(sum_sq);
  if (threadIdx.x == 0) segment_norm[s] = total;
}

// Thread i: the sum over the segments whose key lies in [i * V, (i + 1) * V).
__device__ int64_t lower_bound(const int64_t* keys, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename out_t>
__global__ void example_norms_kernel(const int64_t* __restrict__ keys,
                                     const double* __restrict__ segment_norm, int64_t segments,
                                     int64_t num_embeddings, out_t* __restrict__ out,
                                     int64_t batch) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= batch) return;
  const int64_t first = lower_bound(keys, segments, i * num_embeddings);
  const int64_t last = lower_bound(keys, segments, (i + 1) * num_embeddings);
  double total = 0.0;
  for (int64_t s = first; s < last; ++s) total += segment_norm[s];
  out[i] = static_cast<out_t>(total);
}

at::Tensor embedding_norm_sq_cuda(const at::Tensor& ids_in, const at::Tensor& g_in,
                                  int64_t num_embeddings, c10::optional<int64_t> padding_idx) {
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor ids = checked_embedding_ids(ids_in, g_in, num_embeddings);
  const int64_t batch = ids.size(0), positions = ids.size(1), dim = g_in.size(2);
  const at::ScalarType out_type = g_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({batch}, g_in.options().dtype(out_type));
  const at::TensorOptions longs = ids.options();
  at::Tensor keys = (at::arange(batch, longs).view({batch, 1}) * num_embeddings + ids).flatten();
  at::Tensor rows = at::arange(batch * positions, longs);
  if (padding_idx.has_value()) {
    const at::Tensor valid = ids.flatten() != *padding_idx;
    keys = keys.masked_select(valid);
    rows = rows.masked_select(valid);
  }
  if (keys.numel() == 0 || dim == 0) return out;
  const auto sorted = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted);
  rows = rows.index_select(0, std::get<1>(sorted)).contiguous();
  const auto unique = at::unique_consecutive(sorted_keys, /*return_inverse=*/false,
                                             /*return_counts=*/true);
  const at::Tensor segment_keys = std::get<0>(unique).contiguous();
  const at::Tensor counts = std::get<2>(unique).contiguous();
  const at::Tensor offsets = (counts.cumsum(0) - counts).contiguous();
  const int64_t segments = segment_keys.numel();
  at::Tensor segment_norm = at::empty({segments}, g_in.options().dtype(at::kDouble));
  const at::Tensor g = g_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "segment_norms", [&] {
    segment_norms_kernel<scalar_t><<<static_cast<unsigned>(segments), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
        counts.data_ptr<int64_t>(), dim, segment_norm.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int blocks = static_cast<int>((batch + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES(out_type, "example_norms", [&] {
    example_norms_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        segment_keys.data_ptr<int64_t>(), segment_norm.data_ptr<double>(), segments,
        num_embeddings, out.data_ptr<scalar_t>(), batch);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CUDA, m) { m.impl("embedding_norm_sq", &embedding_norm_sq_cuda); }

}  // namespace dpfast
