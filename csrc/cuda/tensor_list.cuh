// Tensor-list metadata for one-launch multi-tensor CUDA kernels: each tensor is cut into chunks
// of a fixed number of work units; the blocks of one launch cover the chunks of every tensor
// (block b works on chunk b - first[k] of the tensor k whose range holds b).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dpfast {

// Device-side view of a tensor list: data pointers, work units per tensor, and the first block
// of each tensor (first[k] <= b < first[k + 1]; first has size + 1 entries).
struct TensorListView {
  const int64_t* ptrs;
  const int64_t* units;
  const int64_t* first;
  int64_t size;
};

// The tensor whose block range holds `block` (binary search over first[0..size]).
__device__ inline int64_t tensor_of_block(const TensorListView& list, int64_t block) {
  int64_t lo = 0, hi = list.size - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (list.first[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Host side: builds the metadata of `tensors` (units[k] work units each, `per_block` units per
// block) in one device tensor, copied with a single host-to-device transfer.
class TensorListMeta {
 public:
  TensorListMeta(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& units,
                 int64_t per_block, const at::Device& device) {
    const int64_t n = static_cast<int64_t>(tensors.size());
    std::vector<int64_t> host(3 * n + 1);
    int64_t blocks = 0;
    for (int64_t k = 0; k < n; ++k) {
      host[k] = reinterpret_cast<int64_t>(tensors[k].data_ptr());
      host[n + k] = units[k];
      host[2 * n + k] = blocks;
      blocks += (units[k] + per_block - 1) / per_block;
    }
    host[3 * n] = blocks;
    blocks_ = blocks;
    size_ = n;
    meta_ = at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(device, /*non_blocking=*/true);
  }

  TensorListView view() const {
    const int64_t* p = meta_.data_ptr<int64_t>();
    return TensorListView{p, p + size_, p + 2 * size_, size_};
  }
  int64_t blocks() const { return blocks_; }

 private:
  at::Tensor meta_;
  int64_t blocks_ = 0, size_ = 0;
};

}  // namespace dpfast
