// float16 / bfloat16 storage types for the CPU kernels, converting exactly as c10::Half and c10::BFloat16 do
// (IEEE round-to-nearest-even from float; NaN -> canonical quiet NaN), so that outputs keep the bits the ATen
// kernels produced. Dispatch on the wk_dtype codes of ../weightkit.h.
#pragma once
#include <cstdint>
#include <cstring>

#include "../weightkit.h"

namespace weightkit {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct bf16 {
  uint16_t bits;
  operator float() const { return bits_float(static_cast<uint32_t>(bits) << 16); }
  static bf16 from(float f) {
    if (f != f) return bf16{0x7FC0};
    const uint32_t u = float_bits(f);
    return bf16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
  }
};

struct f16 {
  uint16_t bits;
  operator float() const {
    // normal and subnormal halves through float arithmetic on the exponent-shifted bits (both exact)
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    const uint32_t sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * bits_float(0x7800000u);  // * 2^-112
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t value = two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
    return bits_float(sign | value);
  }
  static f16 from(float f) {
    // scale so that the float addition performs the rounding to the half's precision (round to nearest even)
    float base = (f < 0 ? -f : f) * bits_float(0x77800000u) * bits_float(0x08800000u);  // * 2^112 * 2^-110
    const uint32_t w = float_bits(f), shl1 = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1 & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = float_bits(base);
    const uint32_t exp_bits = (b >> 13) & 0x00007C00u, mantissa_bits = b & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return f16{static_cast<uint16_t>((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign))};
  }
};

template <typename T>
inline T from_float(float v) {
  return T::from(v);
}
template <>
inline float from_float<float>(float v) {
  return v;
}

// Calls f(T{}) with T the storage type of a float dtype code; false for any other code.
template <typename F>
bool dispatch_float(int dtype, F&& f) {
  switch (dtype) {
    case WK_F32: f(float{}); return true;
    case WK_F16: f(f16{}); return true;
    case WK_BF16: f(bf16{}); return true;
    default: return false;
  }
}

}  // namespace weightkit
