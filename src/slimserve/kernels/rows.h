// Helpers shared by the C++ CPU kernels beside this file.
#pragma once

#include <stdint.h>

#include <type_traits>

namespace slimserve {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// f(std::integral_constant<int, rows>) for 1 <= rows <= Max: a kernel's row count as a template
// argument, so its accumulators are an array of known size the compiler keeps in registers.
template <int Max, class F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, f);
  }
  f(std::integral_constant<int, Max>{});
}

}  // namespace slimserve
