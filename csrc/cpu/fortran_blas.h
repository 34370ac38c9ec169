// Fortran BLAS GEMM with 32-bit integers (LP64), as libtorch_cpu exports it and ATen's own
// cpublas calls it (MKL or OpenBLAS builds): for kernels that run one small GEMM per example on
// the calling thread. Weak references: null where no loaded library exports them (no syrk is
// exported), and the caller then takes its own fallback.
#pragma once

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}
