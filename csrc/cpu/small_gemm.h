// C[:, cols] += A B[:, cols] for the few-row GEMMs of a recurrence step (A: rows x depth, the
// batch's states; B: depth x width, a transposed recurrent weight): register tiles of up to 8
// rows x 32 columns accumulated over the whole depth, so that B is read once per 8 rows and
// nothing is packed or copied (BLAS packs B on every call, which for 8 rows costs as much as the
// multiply-adds). The loops have fixed trip counts and vectorise in the caller's clone
// (vector_clones.h); the caller picks the columns, which is how threads share a step.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dpfast {

// Rows [0, kRows) x columns [0, cols) of C over depth k; kFull: cols == kCols, a trip count
// the compiler sees (the accumulators then live in vector registers).
template <int kRows, int kCols, bool kFull, typename scalar_t>
inline __attribute__((always_inline)) void gemm_tile(const scalar_t* __restrict__ a, int64_t lda,
                                                     const scalar_t* __restrict__ b, int64_t ldb,
                                                     scalar_t* __restrict__ c, int64_t ldc,
                                                     int64_t depth, int64_t cols) {
  const int64_t n = kFull ? kCols : cols;
  scalar_t acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < n; ++j) acc[r][j] = c[r * ldc + j];
  for (int64_t k = 0; k < depth; ++k) {
    const scalar_t* bk = b + k * ldb;
    for (int r = 0; r < kRows; ++r) {
      const scalar_t ark = a[r * lda + k];
      for (int64_t j = 0; j < n; ++j) acc[r][j] += ark * bk[j];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < n; ++j) c[r * ldc + j] = acc[r][j];
}

// Rows [0, rows) of C in tiles of kRows.
template <int kRows, int kCols, bool kFull, typename scalar_t>
inline __attribute__((always_inline)) int64_t gemm_rows(const scalar_t* a, int64_t lda,
                                                        const scalar_t* b, int64_t ldb,
                                                        scalar_t* c, int64_t ldc, int64_t r,
                                                        int64_t rows, int64_t depth, int64_t cols) {
  for (; r + kRows <= rows; r += kRows)
    gemm_tile<kRows, kCols, kFull>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, depth, cols);
  return r;
}

// Every row of C, for columns [0, cols) of C and B.
template <int kCols, bool kFull, typename scalar_t>
inline __attribute__((always_inline)) void gemm_columns(const scalar_t* a, int64_t lda,
                                                        const scalar_t* b, int64_t ldb,
                                                        scalar_t* c, int64_t ldc, int64_t rows,
                                                        int64_t depth, int64_t cols) {
  int64_t r = gemm_rows<8, kCols, kFull>(a, lda, b, ldb, c, ldc, 0, rows, depth, cols);
  r = gemm_rows<4, kCols, kFull>(a, lda, b, ldb, c, ldc, r, rows, depth, cols);
  gemm_rows<1, kCols, kFull>(a, lda, b, ldb, c, ldc, r, rows, depth, cols);
}

// C[r, j] += sum_k A[r, k] B[k, j] for rows [0, rows), columns [col0, col1) of C and B.
template <typename scalar_t>
inline __attribute__((always_inline)) void gemm_accumulate(
    const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc,
    int64_t rows, int64_t depth, int64_t col0, int64_t col1) {
  constexpr int kCols = 64 / sizeof(scalar_t) * 2;  // two vector registers of 512 bits
  for (int64_t j = col0; j < col1; j += kCols) {
    const int64_t cols = std::min<int64_t>(kCols, col1 - j);
    if (cols == kCols) {
      gemm_columns<kCols, true>(a, lda, b + j, ldb, c + j, ldc, rows, depth, cols);
    } else {
      gemm_columns<kCols, false>(a, lda, b + j, ldb, c + j, ldc, rows, depth, cols);
    }
  }
}

}  // namespace dpfast
