// W4A8 with AVX512-VNNI: bf16 activations, quantized here to int8 per row and weight group, times a
// 4-bit weight held two nibbles a byte in VNNI order; built and registered by w4a8.py as the torch
// operator slimserve::w4a8_linear, so compiled graphs call it without Python.
//
// y (M, N) bf16 = sum over groups g of (xq_g . (q_g - zero_g)) * scale_g * x_scale_g, where
//   xq_g = round(x_g / x_scale_g), x_scale_g = max|x_g| / 127 (at least 1e-12 / 127), half to even,
//   as QuantLinear's W4A8 reference computes them; the integer dot products are exact in int32.
//
// Weight order (`pack` in w4a8.py): blocks of 16 output rows, each as (K / 8, 16, 4) bytes whose low
// nibbles hold inputs 8j..8j+3 and high nibbles 8j+4..8j+7 of the 16 rows, so one 64-byte load gives
// two vpdpbusd operands (weights unsigned, 0..15) for 4 broadcast activations each. Scales (bf16)
// and zeros (uint8) as (N / 16, K / group, 16). Each thread takes R adjacent blocks and runs every
// activation row over them, MAX_CHUNK rows per pass, as w8a8.cpp does.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "nibbles.h"
#include "rows.h"

namespace {

using torch::stable::Tensor;

// Per weight stream: with 512, SmolLM2's 121 layers took 3-10 % longer at 1 row.
constexpr int64_t PREFETCH_BYTES = 2048;
// Activation rows per pass and blocks per task. SmolLM2-135M's 121 layers, g32: 4 x 3 took 3.7 / 6.4 /
// 18.3 / 63.7 ms at 1 / 8 / 32 / 128 rows, ahead of 4 x 2 (4.9-5.2 ms at 1 row), 4 x 4 (7.6 at 8
// rows, 87 at 128), 4 x 8 and 2 x 4 at every row count.
constexpr int MAX_CHUNK = 4;
constexpr int R = 3;

struct Args {
  const int8_t* xq;      // (M, K) activations quantized per group
  const float* x_scale;  // (M, G)
  const int32_t* x_sum;  // (M, G): sums of xq per group, for the zero points
  const uint8_t* w;
  const uint16_t* scale;
  const uint8_t* zero;
  uint16_t* y;
  int64_t M, N, K, G;
};

inline __m512i broadcast4(const int8_t* p) {
  int32_t four;
  __builtin_memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

// Rows [m0, m0 + M) of y for blocks [b0, b0 + B).
template <int M, int B>
void block(const Args& a, int64_t m0, int64_t b0) {
  __m512 y[M][B];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b) y[m][b] = _mm512_setzero_ps();
  const int64_t octets = a.K / 8, per_group = octets / a.G;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512i acc[M][B];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < B; ++b) acc[m][b] = _mm512_setzero_si512();
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
      __m512i lo[B], hi[B];
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const uint8_t* p = a.w + ((b0 + b) * octets + j) * 64;
        _mm_prefetch((const char*)(p + PREFETCH_BYTES), _MM_HINT_T0);  // a hint: past the end is harmless
        __m512i v = _mm512_loadu_si512(p);
        lo[b] = _mm512_and_si512(v, nibble);
        hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a.xq + (m0 + m) * a.K + 8 * j;
        __m512i x_lo = broadcast4(x), x_hi = broadcast4(x + 4);
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b)
          acc[m][b] = slimserve::dpbusd(slimserve::dpbusd(acc[m][b], lo[b], x_lo), hi[b], x_hi);
      }
    }
    for (int b = 0; b < B; ++b) {
      int64_t at = ((b0 + b) * a.G + g) * 16;
      __m512i zero = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(a.zero + at)));
      __m512 scale = slimserve::widen(a.scale + at, 0xFFFF);
      for (int m = 0; m < M; ++m) {
        int64_t mg = (m0 + m) * a.G + g;
        __m512i dot = _mm512_sub_epi32(acc[m][b], _mm512_mullo_epi32(zero, _mm512_set1_epi32(a.x_sum[mg])));
        y[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(a.x_scale[mg])), y[m][b]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      _mm256_storeu_si256((__m256i*)(a.y + (m0 + m) * a.N + (b0 + b) * 16), slimserve::to_bf16(y[m][b]));
}

// w8a8.cpp's scheduling, spelled again: the two written as one template in rows.h taking the block
// as a lambda ran 10-20 % slower (SmolLM2's 121 layers, 1 to 128 rows, alternating runs).
template <int B>
void task(const Args& a, int64_t b0) {
  for (int64_t m0 = 0; m0 < a.M; m0 += MAX_CHUNK)
    slimserve::with_rows<MAX_CHUNK>(a.M - m0, [&](auto m) { block<decltype(m)::value, B>(a, m0, b0); });
}

void product(const Args& a, int threads) {
  int64_t blocks = a.N / 16, tasks = blocks / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tasks; ++i) task<R>(a, i * R);
  if (blocks > tasks * R)  // the last block
    slimserve::with_rows<R - 1>(blocks - tasks * R, [&](auto b) { task<decltype(b)::value>(a, tasks * R); });
}

// One row's group of `size` (a multiple of 16) bf16 activations -> int8, its scale and its sum.
void quantize_group(const uint16_t* x, int64_t size, int8_t* q, float* scale, int32_t* sum) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < size; k += 16)
    amax = _mm512_max_ps(amax, _mm512_abs_ps(slimserve::widen(x + k, 0xFFFF)));
  float s = fmaxf(_mm512_reduce_max_ps(amax), 1e-12f) / 127.0f;
  const __m512 sv = _mm512_set1_ps(s);
  __m512i total = _mm512_setzero_si512();
  for (int64_t k = 0; k < size; k += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(slimserve::widen(x + k, 0xFFFF), sv));  // half to even
    v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    total = _mm512_add_epi32(total, v);
    _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtepi32_epi8(v));
  }
  *scale = s;
  *sum = _mm512_reduce_add_epi32(total);
}

// x (M, K) bf16, w (N / 16, K / 8, 16, 4) uint8, scale (N / 16, G, 16) bf16, zero likewise uint8.
Tensor w4a8_linear(Tensor x, Tensor w, Tensor scale, Tensor zero) {
  const int64_t G = slimserve::check_nibble_operands("w4a8_linear", x, w, scale, zero, 16);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 16;
  Tensor y = torch::stable::new_empty(x, {M, N});
  if (M == 0) return y;
  const int threads = torch::stable::get_num_threads();
  std::vector<int8_t> xq(M * K);
  std::vector<float> x_scale(M * G);
  std::vector<int32_t> x_sum(M * G);
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  const int64_t size = K / G;
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 8)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      int64_t at = m * K + g * size;
      quantize_group(xp + at, size, xq.data() + at, &x_scale[m * G + g], &x_sum[m * G + g]);
    }
  product(Args{xq.data(), x_scale.data(), x_sum.data(), (const uint8_t*)w.data_ptr(),
               (const uint16_t*)scale.data_ptr(), (const uint8_t*)zero.data_ptr(), (uint16_t*)y.data_ptr(),
               M, N, K, G},
          threads);
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(slimserve, CPU, m) { m.impl("w4a8_linear", TORCH_BOX(&w4a8_linear)); }
