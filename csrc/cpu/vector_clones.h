// DPFAST_VECTOR_CLONES: compile a function's element loops for AVX-512, AVX2 and the baseline
// and pick one at load time (GCC/Clang target_clones, an ifunc: x86-64 Linux). The extension is
// built for the baseline ISA so that one wheel runs everywhere; without this its loops would
// use SSE2 only. Elsewhere the macro is empty.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define DPFAST_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define DPFAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DPFAST_VECTOR_CLONES
#endif
