// Philox4x32-10 counter-based generator (Salmon et al., SC'11) and Box-Muller normals.
// Counter-based: the noise for element j of tensor k depends only on (seed, k, j), so the
// result is the same however the work is split across threads, blocks or SIMD lanes.
//
// Box-Muller runs in double with branch-free polynomial log and sincos (no libm calls), so
// that the CPU loop vectorises and the CUDA kernel computes the same function. The radius
// uniform has 52 random bits: the noise reaches sqrt(-2 ln 2^-52) = 8.49 standard deviations.
// (A 24-bit float32 uniform would cut the Gaussian at 5.77 sigma, and a bounded noise support
// is a privacy leak: an output beyond it reveals which neighbouring dataset produced it.)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "clip_factor.h"  // DPFAST_HOST_DEVICE

namespace dpfast {

struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// One Philox round on the counter words (a, b, c, d) with round key (k0, k1).
DPFAST_HOST_DEVICE inline void philox_round(uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d,
                                            uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * a;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c;
  const uint32_t na = static_cast<uint32_t>(p1 >> 32) ^ b ^ k0;
  const uint32_t nc = static_cast<uint32_t>(p0 >> 32) ^ d ^ k1;
  b = static_cast<uint32_t>(p1);
  d = static_cast<uint32_t>(p0);
  a = na;
  c = nc;
}

DPFAST_HOST_DEVICE inline Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    philox_round(ctr.v[0], ctr.v[1], ctr.v[2], ctr.v[3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

DPFAST_HOST_DEVICE inline uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

DPFAST_HOST_DEVICE inline double double_of(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// Everything below is straight-line double arithmetic and bit operations (no int <-> double
// conversion instructions, no branches), so that a loop over lanes vectorises with AVX2.
constexpr uint64_t kOne = 0x3FF0000000000000ull;  // bits of 1.0
constexpr double kRound = 6755399441055744.0;     // 1.5 * 2^52: x + kRound rounds x to an integer

// A uniform in [0, 1) with 52 random bits from two 32-bit words.
DPFAST_HOST_DEVICE inline double unit52(uint32_t hi, uint32_t lo) {
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 12;
  return double_of(kOne | bits) - 1.0;
}

// -2 ln(u) for u in (0, 1], relative error below 1e-13: u = m 2^e with m in [sqrt(1/2),
// sqrt(2)), ln m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, as an odd series.
DPFAST_HOST_DEVICE inline double minus_two_log(double u) {
  const uint64_t b = bits_of(u);
  const uint64_t mantissa = b & 0x000FFFFFFFFFFFFFull;
  // m > sqrt(2) (mantissa bits of sqrt 2 = 0x3FF6A09E667F3BCD): halve m, raise the exponent.
  // Integer compares and selects only: a double compare is not if-converted without
  // -fno-trapping-math, and the loop would not vectorise.
  const uint64_t high = mantissa > 0x6A09E667F3BCDull ? 1u : 0u;
  const double m = double_of(mantissa | (kOne - (high << 52)));
  // The biased exponent as a double: its bits placed in the mantissa of 2^52.
  const double e =
      double_of(0x4330000000000000ull | ((b >> 52) + high)) - 4503599627370496.0 - 1023.0;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double p = 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  return -2.0 * (e * 0.6931471805599453 + 2.0 * s * p);
}

// sin and cos of 2 pi t for t in [0, 1), absolute error below 1e-14: q = round(4 t) quarter
// turns and a remainder 2 pi (t - q / 4) in [-pi/4, pi/4] (Taylor series), rotated by q.
DPFAST_HOST_DEVICE inline void sincos_turns(double t, double* sin_out, double* cos_out) {
  const double shifted = 4.0 * t + kRound;
  const double quarter = shifted - kRound;
  const uint64_t q = bits_of(shifted) & 3;  // quarter mod 4, from the low mantissa bits
  const double x = 6.283185307179586 * (t - 0.25 * quarter);
  const double x2 = x * x;
  double s = -1.0 / 1307674368000.0;  // -1/15!
  s = s * x2 + 1.0 / 6227020800.0;
  s = s * x2 - 1.0 / 39916800.0;
  s = s * x2 + 1.0 / 362880.0;
  s = s * x2 - 1.0 / 5040.0;
  s = s * x2 + 1.0 / 120.0;
  s = s * x2 - 1.0 / 6.0;
  s = x + x * x2 * s;
  double c = 1.0 / 87178291200.0;  // 1/14!
  c = c * x2 - 1.0 / 479001600.0;
  c = c * x2 + 1.0 / 3628800.0;
  c = c * x2 - 1.0 / 40320.0;
  c = c * x2 + 1.0 / 720.0;
  c = c * x2 - 1.0 / 24.0;
  c = c * x2 + 0.5;
  c = 1.0 - x2 * c;
  const bool swap = q & 1;  // an odd quarter turn: sin <- cos, cos <- -sin
  const double rs = swap ? c : s, rc = swap ? -s : c;
  const bool negate = q >= 2;  // a half turn negates both
  *sin_out = negate ? -rs : rs;
  *cos_out = negate ? -rc : rc;
}

// Two independent standard normals from one Philox block (Box-Muller): radius from words 0-1,
// angle from words 2-3.
DPFAST_HOST_DEVICE inline void box_muller(const Philox4& r, double* z0, double* z1) {
  const double u = 1.0 - unit52(r.v[0], r.v[1]);  // (0, 1]: radius up to 8.49 sigma
  const double v = minus_two_log(u);
  const double radius = sqrt(v > 0.0 ? v : 0.0);
  double s, c;
  sincos_turns(unit52(r.v[2], r.v[3]), &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

// The Philox block of (seed, stream, pair index).
DPFAST_HOST_DEVICE inline Philox4 philox_block(uint64_t seed, uint32_t stream, uint64_t pair) {
  return philox4x32_10(
      Philox4{{static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32), stream, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace dpfast
