// sigmoid and tanh written so that element loops calling them vectorise (vector_clones.h):
// float32 takes an exp of float arithmetic and one bit cast (Cody-Waite reduction by ln 2, a
// degree-6 polynomial on |r| <= ln 2 / 2, 2^n built in the exponent bits; within 2 ulp of exp,
// the argument clamped to [-87, 88] where exp is a normal float); float64 calls std::exp and
// std::tanh (it serves the reference checks, not speed).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dpfast {

inline __attribute__((always_inline)) float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;  // not fmin/fmax: those keep NaN apart
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2): adding and subtracting 1.5 2^23 rounds to an integer (no floor call,
  // which vectorises only with -fno-trapping-math).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline __attribute__((always_inline)) float sigmoid_of(float x) {
  return 1.0f / (1.0f + exp_approx(-x));
}

// tanh(x) = 2 sigmoid(2 x) - 1: absolute error ~1e-7.
inline __attribute__((always_inline)) float tanh_of(float x) {
  return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f;
}

inline double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline double tanh_of(double x) { return std::tanh(x); }

}  // namespace dpfast
