// C[:, cols] += A B[:, cols] for the few-row GEMMs of a recurrence step (A: rows x depth, the
// batch's states; B: depth x width, a transposed recurrent weight): register tiles of 6-8 rows x
// two vectors of columns accumulated over the whole depth, so that B is read once per tile and
// nothing is packed or copied (BLAS packs B on every call, which for 8 rows costs as much as the
// multiply-adds). The tiles are written with GCC/Clang vector types, as wide as the CPU's
// registers (vector_bytes; kTileRows rows so that accumulators, B's vectors and A's broadcast
// fit the register file), so that the accumulators stay in registers whatever the
// auto-vectoriser decides: plain loops tiled 8 x 32
// floats spilled on AVX2 and ran at half this speed (char-LSTM step, 64 x 128 by 128 x 512:
// 210 -> 100 us on 2 cores' worth of AVX2). Columns past the last whole tile take one-vector
// tiles, then a scalar loop. The caller's clone (vector_clones.h) picks the instructions; the
// caller picks the columns, which is how threads share a step.
#pragma once

#include <cstdint>
#include <cstring>

namespace dpfast {

// The widest vector registers of this CPU in bytes: 64 (AVX-512), 32 (AVX2) or 16.
inline int vector_bytes() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const int bytes = __builtin_cpu_supports("avx512f") ? 64
                           : __builtin_cpu_supports("avx2")  ? 32
                                                             : 16;
  return bytes;
#else
  return 16;
#endif
}

template <int kBytes, typename scalar_t>
struct VectorOf {
  typedef scalar_t type __attribute__((vector_size(kBytes)));
};

// Rows [0, kRows) x columns [0, kVecs vectors) of C over depth k, accumulated in registers.
template <int kRows, int kVecs, int kBytes, typename scalar_t>
inline __attribute__((always_inline)) void gemm_tile(const scalar_t* __restrict__ a, int64_t lda,
                                                     const scalar_t* __restrict__ b, int64_t ldb,
                                                     scalar_t* __restrict__ c, int64_t ldc,
                                                     int64_t depth) {
  typedef typename VectorOf<kBytes, scalar_t>::type V;
  constexpr int kLanes = kBytes / sizeof(scalar_t);
  // The accumulators start at zero and C is added at the end: loading C first put a (cache-
  // missing) load at the head of every FMA chain, a fifth of an LSTM step's time.
  V acc[kRows][kVecs] = {};
  for (int64_t k = 0; k < depth; ++k) {
    V bk[kVecs];
    for (int v = 0; v < kVecs; ++v) std::memcpy(&bk[v], b + k * ldb + v * kLanes, kBytes);
    for (int r = 0; r < kRows; ++r) {
      const scalar_t ark = a[r * lda + k];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += ark * bk[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      V cv;
      std::memcpy(&cv, c + r * ldc + v * kLanes, kBytes);
      cv += acc[r][v];
      std::memcpy(c + r * ldc + v * kLanes, &cv, kBytes);
    }
  }
}

// Rows per register tile: kRows x 2 accumulators plus 2 vectors of B and A's broadcast must fit
// the register file: 8 rows in AVX-512's 32 registers, 6 in the 16 of AVX2 and SSE (8 rows
// there spilled to the stack inside the depth loop: char-LSTM step ~1.5x slower).
template <int kBytes>
constexpr int kTileRows = kBytes == 64 ? 8 : 6;

// Every row of C for the kVecs vectors of columns from c (and b): tiles of kTileRows rows,
// then of 4, 2 and 1 for the rest (so B is read about rows / kTileRows + 3 times).
template <int kVecs, int kBytes, typename scalar_t>
inline __attribute__((always_inline)) void gemm_column_block(const scalar_t* a, int64_t lda,
                                                             const scalar_t* b, int64_t ldb,
                                                             scalar_t* c, int64_t ldc,
                                                             int64_t rows, int64_t depth) {
  constexpr int kRows = kTileRows<kBytes>;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    gemm_tile<kRows, kVecs, kBytes>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, depth);
  if (r + 4 <= rows) {
    gemm_tile<4, kVecs, kBytes>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, depth);
    r += 4;
  }
  if (r + 2 <= rows) {
    gemm_tile<2, kVecs, kBytes>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, depth);
    r += 2;
  }
  if (r < rows) gemm_tile<1, kVecs, kBytes>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, depth);
}

// gemm_accumulate with vectors of kBytes.
template <int kBytes, typename scalar_t>
inline __attribute__((always_inline)) void gemm_accumulate_with(
    const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc,
    int64_t rows, int64_t depth, int64_t col0, int64_t col1) {
  constexpr int kLanes = kBytes / sizeof(scalar_t);
  int64_t j = col0;
  for (; j + 2 * kLanes <= col1; j += 2 * kLanes)
    gemm_column_block<2, kBytes>(a, lda, b + j, ldb, c + j, ldc, rows, depth);
  for (; j + kLanes <= col1; j += kLanes)
    gemm_column_block<1, kBytes>(a, lda, b + j, ldb, c + j, ldc, rows, depth);
  for (; j < col1; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t sum = c[r * ldc + j];
      for (int64_t k = 0; k < depth; ++k) sum += a[r * lda + k] * b[k * ldb + j];
      c[r * ldc + j] = sum;
    }
  }
}

// C[r, j] += sum_k A[r, k] B[k, j] for rows [0, rows), columns [col0, col1) of C and B. Every
// clone of the caller holds the three widths; the one of this CPU's registers runs.
template <typename scalar_t>
inline __attribute__((always_inline)) void gemm_accumulate(
    const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc,
    int64_t rows, int64_t depth, int64_t col0, int64_t col1) {
  switch (vector_bytes()) {
    case 64:
      return gemm_accumulate_with<64>(a, lda, b, ldb, c, ldc, rows, depth, col0, col1);
    case 32:
      return gemm_accumulate_with<32>(a, lda, b, ldb, c, ldc, rows, depth, col0, col1);
    default:
      return gemm_accumulate_with<16>(a, lda, b, ldb, c, ldc, rows, depth, col0, col1);
  }
}

}  // namespace dpfast
