// CPU kernel of embedding_norm_sq: ids (B, T) and g (B, T, d); example i's table gradient adds
// g_it to row ids_it, so per example the rows of equal ids are summed (a segmented reduction
// over the positions sorted by id) before their squares are added up. Parallel over examples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/reduce.h"
#include "embedding_args.h"

namespace dpfast {
namespace {

at::Tensor embedding_norm_sq_cpu(const at::Tensor& ids_in, const at::Tensor& g_in,
                                 int64_t num_embeddings, c10::optional<int64_t> padding_idx) {
  const at::Tensor ids = checked_embedding_ids(ids_in, g_in, num_embeddings);
  const at::ScalarType dtype = g_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = ids.size(0), positions = ids.size(1), dim = g_in.size(2);
  const at::Tensor g = g_in.contiguous();
  const int64_t* pid = ids.data_ptr<int64_t>();
  const int64_t skip = padding_idx.has_value() ? *padding_idx : -1;
  std::vector<double> total(batch, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "embedding_norm_sq",
                                  [&] {
    const scalar_t* pg = g.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(positions * dim), [&](int64_t begin, int64_t end) {
      std::vector<std::pair<int64_t, int64_t>> order;  // (id, position)
      std::vector<double> row(dim);
      for (int64_t i = begin; i < end; ++i) {
        order.clear();
        for (int64_t t = 0; t < positions; ++t) {
          const int64_t id = pid[i * positions + t];
          if (id != skip) order.emplace_back(id, t);
        }
        std::sort(order.begin(), order.end());
        double norm_sq = 0.0;
        for (size_t k = 0; k < order.size();) {
          std::fill(row.begin(), row.end(), 0.0);
          size_t next = k;
          for (; next < order.size() && order[next].first == order[k].first; ++next) {
            const scalar_t* src = pg + (i * positions + order[next].second) * dim;
            for (int64_t j = 0; j < dim; ++j) row[j] += static_cast<double>(src[j]);
          }
          norm_sq += sum_squares(row.data(), dim);
          k = next;
        }
        total[i] = norm_sq;
      }
    });
  });
  return at::tensor(total, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) { m.impl("embedding_norm_sq", &embedding_norm_sq_cpu); }

}  // namespace dpfast
