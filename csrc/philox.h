// Philox4x32-10 counter-based generator (Salmon et al., SC'11) and Box-Muller normals.
// Counter-based: the noise for element j of tensor k depends only on (seed, k, j), so the
// result is the same however the work is split across threads or blocks.
#pragma once

#include <cmath>
#include <cstdint>

#include "clip_factor.h"  // DPFAST_HOST_DEVICE

namespace dpfast {

struct Philox4 {
  uint32_t v[4];
};

DPFAST_HOST_DEVICE inline void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

DPFAST_HOST_DEVICE inline Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, ctr.v[0], &hi0, &lo0);
    mulhilo32(kM1, ctr.v[2], &hi1, &lo1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Uniform in (0, 1] with 53 random bits from two 32-bit words.
DPFAST_HOST_DEVICE inline double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return (static_cast<double>(bits) + 1.0) * (1.0 / 9007199254740992.0);
}

// Two independent standard normals for (seed, stream, pair index), computed in double.
DPFAST_HOST_DEVICE inline void normal_pair(uint64_t seed, uint32_t stream, uint64_t pair,
                                           double* z0, double* z1) {
  const Philox4 r = philox4x32_10(
      Philox4{{static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32), stream, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const double u1 = uniform53(r.v[0], r.v[1]);
  const double u2 = uniform53(r.v[2], r.v[3]);
  const double radius = sqrt(-2.0 * log(u1));
  const double angle = 6.283185307179586476925286766559 * u2;
  *z0 = radius * cos(angle);
  *z1 = radius * sin(angle);
}

}  // namespace dpfast
