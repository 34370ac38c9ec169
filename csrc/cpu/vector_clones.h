// DPFAST_VECTOR_CLONES: compile a function's element loops for AVX-512, AVX2 and the baseline
// and pick one at load time (GCC/Clang target_clones, an ifunc: x86-64 Linux). The extension is
// built for the baseline ISA so that one wheel runs everywhere; without this its loops would
// use SSE2 only. GCC 12 and newer name the levels x86-64-v4 and -v3, which bring FMA: a clone
// for plain "avx2" multiplies and adds separately (the LSTM sequence ran 18 ms against 15 with
// FMA). Elsewhere the macro is empty.
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
