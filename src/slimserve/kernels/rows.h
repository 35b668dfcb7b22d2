// Helpers shared by the C++ CPU kernels beside this file.
#pragma once

#include <immintrin.h>
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

// 16 fp32 rounded to bf16's precision as float_to_bf16 rounds them, kept in fp32 lanes (AVX512F).
inline __m512 round_bf16(__m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xFFFF0000)));
}

// 16 fp32 -> 16 bf16: float_to_bf16 in lanes (AVX512F).
inline __m256i to_bf16(__m512 v) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16));
}

// The first `left` of 16 lanes (all 16 from 16 on, none at 0 or below).
inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); }

// 16 values at p (`valid` lanes of them, the rest 0) widened to fp32.
inline __m512 widen(const float* p, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, p); }

inline __m512 widen(const uint16_t* p, __mmask16 valid) {  // bf16: its bits are fp32's upper half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, p)), 16));
}

inline __m512 widen(const uint8_t* p, __mmask16 valid) {  // uint8 (zero points)
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, p)));
}

// acc + the dot products of 4 unsigned bytes of u with 4 signed bytes of s, in each int32 lane
// (vpdpbusd, AVX512-VNNI), written in place. Through the intrinsic, GCC 12 copied every accumulator
// to another register and back each iteration (about two moves per product in a 4 x 3 block, and
// a 6 x 4 block's accumulators went to the stack); tying the output to the input avoids both.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
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
