// Tensor-core (WMMA) kernels of the linear-map ops at TF32 or bf16 input precision with fp32
// accumulation; a (B, T, d_in) and g (B, T, d_out) are float32 and contiguous:
//   ghost norm:  per example, the 64 x 64 tile pairs (I <= J) of a a^T and g g^T, their
//                element-wise product summed in the block (tiles off the diagonal count twice);
//   direct norm: per example, each 64 x 64 tile of g^T a accumulated over T, squared and summed;
//   clipped sum: each 64 x 64 tile of sum_r (c_r g_r)^T a_r over all B*T rows, the scale of a
//                row's example applied while loading; rows of examples with c = 0 load as zeros
//                (in both operands, so a NaN or Inf there never reaches the product).
// Every block forms C = X^T Y for one 64 x 64 tile: X (K x M) and Y (K x N) are read through
// strides into shared memory, 16 rows of K at a time (rounded to the input precision), and
// multiplied by 4 warps of 2 x 2 WMMA fragments. Partial sums go to global memory and are added
// up by ATen, in a fixed order.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <torch/library.h>

#include <string>

#include "cuda/block_sum.cuh"

namespace dpfast {
namespace {

using namespace nvcuda;

constexpr int kTile = 64;     // C tile edge
constexpr int kDepth = 16;    // rows of K staged in shared memory at a time
constexpr int kThreads = 128; // 4 warps, each a 32 x 32 quarter of the tile
constexpr int64_t kPrecisionTf32 = 1, kPrecisionBf16 = 2;

// TF32 and bf16 WMMA need compute capability 8.0: device code for older targets only traps
// (the Python side refuses such GPUs with a clear error first).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define DPFAST_WMMA 1
#else
#define DPFAST_WMMA 0
#endif

// A K x M operand read from global memory: element (k, m) at ptr[k * k_stride + m * m_stride],
// 0 outside [0, rows) x [0, cols). With `scale`, row k belongs to example k / rows_per_scale:
// it reads as 0 where that example's scale is 0, and is multiplied by it if `apply_scale`.
struct Operand {
  const float* ptr;
  int64_t k_stride, m_stride, rows, cols;
  const float* scale;
  int64_t rows_per_scale;
  bool apply_scale;
};

#if DPFAST_WMMA
__device__ inline float load(const Operand& op, int64_t k, int64_t m) {
  if (k >= op.rows || m >= op.cols) return 0.f;
  const float v = op.ptr[k * op.k_stride + m * op.m_stride];
  if (op.scale == nullptr) return v;
  const float c = op.scale[k / op.rows_per_scale];
  if (c == 0.f) return 0.f;
  return op.apply_scale ? v * c : v;
}

// The WMMA fragments of each input precision: TF32 (float storage, k = 8) and bf16 (k = 16).
template <typename elem_t>
struct Fragments;

template <>
struct Fragments<float> {
  static constexpr int kK = 8;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  __device__ static float round(float v) { return wmma::__float_to_tf32(v); }
};

template <>
struct Fragments<__nv_bfloat16> {
  static constexpr int kK = 16;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  __device__ static __nv_bfloat16 round(float v) { return __float2bfloat16(v); }
};

// The shared-memory staging of X and Y rows, in the input precision.
template <typename elem_t>
struct Staging {
  __align__(32) elem_t x[kDepth * kTile];
  __align__(32) elem_t y[kDepth * kTile];
};

// Stages rows [k0, k0 + kDepth) of an operand's columns [m0, m0 + kTile) as tile[kk][mm];
// consecutive threads walk the operand's unit-stride dimension (coalesced loads).
template <typename elem_t>
__device__ void stage(const Operand& op, int64_t k0, int64_t m0, elem_t* tile) {
  for (int idx = threadIdx.x; idx < kDepth * kTile; idx += kThreads) {
    const bool along_m = op.m_stride == 1;
    const int kk = along_m ? idx / kTile : idx % kDepth;
    const int mm = along_m ? idx % kTile : idx / kDepth;
    tile[kk * kTile + mm] = Fragments<elem_t>::round(load(op, k0 + kk, m0 + mm));
  }
}

// c_tile (kTile x kTile, row-major, shared) = X^T Y over K = depth, for the C tile whose first
// row is m0 (a column of X) and first column n0 (a column of Y). All threads of the block call it.
template <typename elem_t>
__device__ void tile_product(const Operand& x, const Operand& y, int64_t depth, int64_t m0,
                             int64_t n0, float* c_tile, Staging<elem_t>& staged) {
  elem_t* xs = staged.x;
  elem_t* ys = staged.y;
  using F = Fragments<elem_t>;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  typename F::C acc[2][2];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    stage(x, k0, m0, xs);
    stage(y, k0, n0, ys);
    __syncthreads();
    for (int ks = 0; ks < kDepth; ks += F::kK) {
      typename F::A fa[2];
      typename F::B fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], xs + ks * kTile + wm + 16 * i, kTile);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], ys + ks * kTile + wn + 16 * j, kTile);
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      float* at = c_tile + (wm + 16 * i) * kTile + wn + 16 * j;
      wmma::store_matrix_sync(at, acc[i][j], kTile, wmma::mem_row_major);
    }
  }
  __syncthreads();
}

// Block-wide total of each thread's `sum`, written by thread 0 to *slot.
__device__ inline void write_block_total(double sum, double* slot) {
  const double total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) *slot = total;
}
#endif  // DPFAST_WMMA

// Block (tile, i): tile pair p of example i; partial[i, p] = weight * sum (a a^T)(g g^T).
template <typename elem_t>
__global__ void ghost_norm_kernel(const float* __restrict__ a, const float* __restrict__ g,
                                  int64_t positions, int64_t d_in, int64_t d_out, int64_t tiles,
                                  double* __restrict__ partial) {
#if DPFAST_WMMA
  __shared__ Staging<elem_t> staged;
  __shared__ __align__(32) float gram_a[kTile * kTile];
  __shared__ __align__(32) float gram_g[kTile * kTile];
  const int64_t i = blockIdx.y, pair = blockIdx.x;
  int64_t first = 0, rest = pair;  // pair -> tiles (first, second), first <= second
  while (rest >= tiles - first) {
    rest -= tiles - first;
    ++first;
  }
  const int64_t second = first + rest;
  // Gram entries (s, t) = sum over features f of x[s, f] x[t, f]: K = features, M = N = T.
  const Operand xa{a + i * positions * d_in, 1, d_in, d_in, positions, nullptr, 1, false};
  const Operand xg{g + i * positions * d_out, 1, d_out, d_out, positions, nullptr, 1, false};
  tile_product(xa, xa, d_in, first * kTile, second * kTile, gram_a, staged);
  tile_product(xg, xg, d_out, first * kTile, second * kTile, gram_g, staged);
  double sum = 0.0;
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    sum += static_cast<double>(gram_a[idx]) * static_cast<double>(gram_g[idx]);
  }
  write_block_total((first == second ? 1.0 : 2.0) * sum, partial + i * gridDim.x + pair);
#else
  __trap();
#endif
}

// Block (tile, i): one 64 x 64 tile of G_i = g_i^T a_i; partial[i, tile] = its sum of squares.
template <typename elem_t>
__global__ void direct_norm_kernel(const float* __restrict__ a, const float* __restrict__ g,
                                   int64_t positions, int64_t d_in, int64_t d_out,
                                   double* __restrict__ partial) {
#if DPFAST_WMMA
  __shared__ Staging<elem_t> staged;
  __shared__ __align__(32) float block_g[kTile * kTile];
  const int64_t i = blockIdx.y, tile = blockIdx.x;
  const int64_t tiles_n = (d_in + kTile - 1) / kTile;
  const Operand x{g + i * positions * d_out, d_out, 1, positions, d_out, nullptr, 1, false};
  const Operand y{a + i * positions * d_in, d_in, 1, positions, d_in, nullptr, 1, false};
  tile_product(x, y, positions, (tile / tiles_n) * kTile, (tile % tiles_n) * kTile, block_g,
               staged);
  double sum = 0.0;
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const double v = block_g[idx];
    sum += v * v;
  }
  write_block_total(sum, partial + i * gridDim.x + tile);
#else
  __trap();
#endif
}

// Block (n-tile, m-tile): out[m0.., n0..] = sum over all B*T rows of (c g)^T a.
template <typename elem_t>
__global__ void clipped_sum_kernel(const float* __restrict__ a, const float* __restrict__ g,
                                   const float* __restrict__ scale, int64_t rows,
                                   int64_t positions, int64_t d_in, int64_t d_out,
                                   float* __restrict__ out) {
#if DPFAST_WMMA
  __shared__ Staging<elem_t> staged;
  __shared__ __align__(32) float sums[kTile * kTile];
  const int64_t m0 = blockIdx.y * static_cast<int64_t>(kTile);
  const int64_t n0 = blockIdx.x * static_cast<int64_t>(kTile);
  const Operand x{g, d_out, 1, rows, d_out, scale, positions, true};
  const Operand y{a, d_in, 1, rows, d_in, scale, positions, false};
  tile_product(x, y, rows, m0, n0, sums, staged);
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const int64_t m = m0 + idx / kTile, n = n0 + idx % kTile;
    if (m < d_out && n < d_in) out[m * d_in + n] = sums[idx];
  }
#else
  __trap();
#endif
}

void check_pair(const char* op, const at::Tensor& a, const at::Tensor& g, int64_t precision) {
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3 && a.size(0) == g.size(0) && a.size(1) == g.size(1),
              op, ": a (B, T, d_in) and g (B, T, d_out) must agree in B and T, got a ",
              a.sizes(), " and g ", g.sizes());
  TORCH_CHECK(a.is_cuda() && g.is_cuda() && a.device() == g.device(), op,
              ": a and g must be on one CUDA device");
  TORCH_CHECK(precision == kPrecisionTf32 || precision == kPrecisionBf16, op,
              ": precision must be 1 (TF32) or 2 (bf16), got ", precision);
  TORCH_CHECK(a.size(0) <= 65535, op, ": at most 65535 examples per call, got ", a.size(0));
}

template <typename elem_t>
void launch_norms(const at::Tensor& a, const at::Tensor& g, bool ghost, at::Tensor& partial,
                  dim3 grid, int64_t tiles, cudaStream_t stream) {
  const int64_t positions = a.size(1), d_in = a.size(2), d_out = g.size(2);
  if (ghost) {
    ghost_norm_kernel<elem_t><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<float>(), g.data_ptr<float>(), positions, d_in, d_out, tiles,
        partial.data_ptr<double>());
  } else {
    direct_norm_kernel<elem_t><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<float>(), g.data_ptr<float>(), positions, d_in, d_out,
        partial.data_ptr<double>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear_norm_sq_tc(const at::Tensor& a_in, const at::Tensor& g_in,
                             c10::string_view method, int64_t precision) {
  check_pair("linear_norm_sq_tc", a_in, g_in, precision);
  TORCH_CHECK(method == "ghost" || method == "direct",
              "linear_norm_sq_tc: method must be 'ghost' or 'direct', got '", std::string(method),
              "'");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const int64_t batch = a_in.size(0), positions = a_in.size(1);
  const int64_t d_in = a_in.size(2), d_out = g_in.size(2);
  const at::TensorOptions floats = a_in.options().dtype(at::kFloat);
  if (batch == 0 || positions == 0 || d_in == 0 || d_out == 0) return at::zeros({batch}, floats);
  const at::Tensor a = a_in.to(at::kFloat).contiguous(), g = g_in.to(at::kFloat).contiguous();
  const bool ghost = method == "ghost";
  int64_t tiles, blocks;
  if (ghost) {
    tiles = (positions + kTile - 1) / kTile;
    blocks = tiles * (tiles + 1) / 2;
  } else {
    tiles = 0;
    blocks = ((d_out + kTile - 1) / kTile) * ((d_in + kTile - 1) / kTile);
  }
  at::Tensor partial = at::empty({batch, blocks}, a.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (precision == kPrecisionTf32) {
    launch_norms<float>(a, g, ghost, partial, grid, tiles, stream);
  } else {
    launch_norms<__nv_bfloat16>(a, g, ghost, partial, grid, tiles, stream);
  }
  return partial.sum(1).to(at::kFloat);
}

at::Tensor linear_clipped_sum_tc(const at::Tensor& a_in, const at::Tensor& g_in,
                                 const at::Tensor& scale_in, int64_t precision) {
  check_pair("linear_clipped_sum_tc", a_in, g_in, precision);
  const int64_t batch = a_in.size(0), positions = a_in.size(1);
  const int64_t d_in = a_in.size(2), d_out = g_in.size(2);
  TORCH_CHECK(scale_in.dim() == 1 && scale_in.size(0) == batch,
              "linear_clipped_sum_tc: scale must have shape (B,) = (", batch, ",), got ",
              scale_in.sizes());
  const c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor out = at::zeros({d_out, d_in}, a_in.options().dtype(at::kFloat));
  if (batch == 0 || positions == 0 || d_in == 0 || d_out == 0) {
    return out.to(a_in.scalar_type());
  }
  const int64_t tiles_m = (d_out + kTile - 1) / kTile, tiles_n = (d_in + kTile - 1) / kTile;
  TORCH_CHECK(tiles_m <= 65535, "linear_clipped_sum_tc: d_out = ", d_out, " is too large");
  const at::Tensor a = a_in.to(at::kFloat).contiguous(), g = g_in.to(at::kFloat).contiguous();
  const at::Tensor scale = scale_in.to(a.device(), at::kFloat).contiguous();
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = batch * positions;
  if (precision == kPrecisionTf32) {
    clipped_sum_kernel<float><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<float>(), g.data_ptr<float>(), scale.data_ptr<float>(), rows, positions,
        d_in, d_out, out.data_ptr<float>());
  } else {
    clipped_sum_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<float>(), g.data_ptr<float>(), scale.data_ptr<float>(), rows, positions,
        d_in, d_out, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.to(a_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CUDA, m) {
  m.impl("linear_norm_sq_tc", &linear_norm_sq_tc);
  m.impl("linear_clipped_sum_tc", &linear_clipped_sum_tc);
}

}  // namespace dpfast
