// W4A16 with AVX512-BF16: bf16 activations times a 4-bit weight in w4a8.cpp's order (w4a8.py's
// `pack`), summed in fp32; built and registered by w4a16.py as the torch operator
// slimserve::w4a16_linear, so compiled graphs call it without Python.
//
// y (M, N) bf16 = sum over groups g of scale_g * (x_g . (q_g - zero_g)), computed as
//   scale_g * (x_g . (q_g + 128) - (zero_g + 128) * sum(x_g)):
// a nibble q or'ed into the bf16 bits 0x4300 is the bf16 number 128 + q (exact), so one byte
// shuffle and one ternary logic op turn 16 rows x 2 nibbles into a vdpbf16ps operand whose pairs
// meet two adjacent activations (broadcast). The products are exact in fp32; the group sums of x
// are taken once per call. Each thread takes R adjacent blocks of 16 rows and runs every activation
// row over them, MAX_CHUNK rows per pass, as w4a8.cpp does. Past GEMM_ROWS rows (a prefill), the
// weight is dequantized to bf16 here and multiplied by torch's matmul (oneDNN's bf16 GEMM).

#include <immintrin.h>
#include <stdint.h>

#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "nibbles.h"
#include "rows.h"

namespace {

using torch::stable::Tensor;

// Per weight stream: with 512, SmolLM2's 121 layers took 8 % longer at 1 row (1024 and 4096 ran alike).
constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int MAX_CHUNK = 4;
constexpr int R = 2;  // 3 ran alike (5 % slower at 1 row, 3 % faster at 8)
// More rows than this: the weight dequantized to bf16 and multiplied by torch's bf16 GEMM, which is
// faster there: the dot products above decode the nibbles again for every 4 rows.
constexpr int64_t GEMM_ROWS = 256;

struct Args {
  const uint16_t* x;     // (M, K) bf16
  const float* x_sum;    // (M, G)
  const uint8_t* w;
  const uint16_t* scale;
  const uint8_t* zero;
  uint16_t* y;
  int64_t M, N, K, G;
};

inline __m512bh broadcast_pair(const uint16_t* p) {  // x[k], x[k + 1] in every 32-bit lane
  int32_t two;
  __builtin_memcpy(&two, p, 4);
  return (__m512bh)_mm512_set1_epi32(two);
}

// Bytes 4d + i and 4d + j of each 32-bit lane d to its bytes 0 and 2 (each 128-bit lane alike).
inline __m512i pair_control(int i, int j) {
  alignas(64) int8_t c[64];
  for (int at = 0; at < 64; at += 4) {
    int d = at % 16;
    c[at] = (int8_t)(d + i), c[at + 1] = -128, c[at + 2] = (int8_t)(d + j), c[at + 3] = -128;
  }
  return _mm512_load_si512(c);
}

// The low nibbles q of bytes 0 and 2 of each 32-bit lane, as the bf16 pair (128 + q0, 128 + q2).
inline __m512bh plus_128(__m512i v) {
  return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300),
                                             0xEA);  // (v & nibbles) | bits of 128
}

// Rows [m0, m0 + M) of y for blocks [b0, b0 + B).
template <int M, int B>
void block(const Args& a, int64_t m0, int64_t b0) {
  __m512 y[M][B];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b) y[m][b] = _mm512_setzero_ps();
  const int64_t octets = a.K / 8, per_group = octets / a.G;
  const __m512i first = pair_control(0, 1), second = pair_control(2, 3);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[M][B];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < B; ++b) acc[m][b] = _mm512_setzero_ps();
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
      __m512bh w[B][4];  // inputs 8j + (0, 1), (2, 3), (4, 5), (6, 7) of the block's 16 rows, as 128 + q
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const uint8_t* p = a.w + ((b0 + b) * octets + j) * 64;
        _mm_prefetch((const char*)(p + PREFETCH_BYTES), _MM_HINT_T0);  // a hint: past the end is harmless
        const __m512i lo = _mm512_loadu_si512(p), hi = _mm512_srli_epi16(lo, 4);
        w[b][0] = plus_128(_mm512_shuffle_epi8(lo, first));
        w[b][1] = plus_128(_mm512_shuffle_epi8(lo, second));
        w[b][2] = plus_128(_mm512_shuffle_epi8(hi, first));
        w[b][3] = plus_128(_mm512_shuffle_epi8(hi, second));
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const uint16_t* x = a.x + (m0 + m) * a.K + 8 * j;
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512bh xv = broadcast_pair(x + 2 * i);
#pragma GCC unroll 4
          for (int b = 0; b < B; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], w[b][i], xv);
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      const int64_t at = ((b0 + b) * a.G + g) * 16;
      const __m512 scale = slimserve::widen(a.scale + at, 0xFFFF);
      const __m512 zero = slimserve::widen(a.zero + at, 0xFFFF);
      const __m512 offset = _mm512_mul_ps(scale, _mm512_add_ps(zero, _mm512_set1_ps(128.0f)));
      for (int m = 0; m < M; ++m) {
        y[m][b] = _mm512_fmadd_ps(acc[m][b], scale, y[m][b]);
        y[m][b] = _mm512_fnmadd_ps(offset, _mm512_set1_ps(a.x_sum[(m0 + m) * a.G + g]), y[m][b]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      _mm256_storeu_si256((__m256i*)(a.y + (m0 + m) * a.N + (b0 + b) * 16), slimserve::to_bf16(y[m][b]));
}

// w8a8.cpp's and w4a8.cpp's scheduling, spelled a third time: written once in rows.h, taking the
// block as a lambda, it ran w4a8.cpp 5-20 % slower again at 8 and 32 rows (3 of 4 alternating runs).
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

// The weight as (N, K) bf16, scale * (q - zero) rounded to bf16, into out.
void dequantize(const Args& a, uint16_t* out, int threads) {
  const int64_t octets = a.K / 8, per_group = octets / a.G;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < a.N / 16; ++b)
    for (int64_t j = 0; j < octets; ++j) {
      const int64_t at = (b * a.G + j / per_group) * 16;
      const __m512 scale = slimserve::widen(a.scale + at, 0xFFFF);
      const __m512 zero = slimserve::widen(a.zero + at, 0xFFFF);
      const __m512i v = _mm512_loadu_si512(a.w + (b * octets + j) * 64);
      alignas(64) uint8_t lo[64], hi[64];  // inputs 8j..8j+3 and 8j+4..8j+7 of row r at bytes 4r..4r+3
      _mm512_store_si512(lo, _mm512_and_si512(v, nibble));
      _mm512_store_si512(hi, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
      for (int r = 0; r < 16; r += 2) {  // rows r and r + 1, 8 inputs each
        const int quad = 4 * (r & ~3);  // rows r & ~3 .. (r & ~3) + 3
        const __m128i l = _mm_load_si128((const __m128i*)(lo + quad)), h = _mm_load_si128((const __m128i*)(hi + quad));
        const __m128i bytes = r & 2 ? _mm_unpackhi_epi32(l, h) : _mm_unpacklo_epi32(l, h);
        const __m512i index = _mm512_inserti64x4(_mm512_set1_epi32(r), _mm256_set1_epi32(r + 1), 1);  // r x8, r+1 x8
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
        const __m512 weight = _mm512_mul_ps(_mm512_sub_ps(q, _mm512_permutexvar_ps(index, zero)),
                                            _mm512_permutexvar_ps(index, scale));
        const __m256i values = slimserve::to_bf16(weight);
        uint16_t* to = out + (b * 16 + r) * a.K + 8 * j;
        _mm_storeu_si128((__m128i*)to, _mm256_castsi256_si128(values));
        _mm_storeu_si128((__m128i*)(to + a.K), _mm256_extracti128_si256(values, 1));
      }
    }
}

// x (M, K) bf16, w (N / 16, K / 8, 16, 4) uint8, scale (N / 16, G, 16) bf16, zero likewise uint8.
Tensor w4a16_linear(Tensor x, Tensor w, Tensor scale, Tensor zero) {
  const int64_t G = slimserve::check_nibble_operands("w4a16_linear", x, w, scale, zero, 8);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 16;
  const int threads = torch::stable::get_num_threads();
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  Args args{xp, nullptr, (const uint8_t*)w.data_ptr(), (const uint16_t*)scale.data_ptr(),
            (const uint8_t*)zero.data_ptr(), nullptr, M, N, K, G};
  if (M > GEMM_ROWS) {
    Tensor weight = torch::stable::new_empty(x, {N, K});
    dequantize(args, (uint16_t*)weight.data_ptr(), threads);
    return torch::stable::matmul(x, torch::stable::transpose(weight, 0, 1));
  }
  Tensor y = torch::stable::new_empty(x, {M, N});
  if (M == 0) return y;
  const int64_t size = K / G;
  std::vector<float> x_sum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0;
      for (int64_t k = 0; k < size; ++k) sum += slimserve::bf16_to_float(xp[m * K + g * size + k]);
      x_sum[m * G + g] = sum;
    }
  args.x_sum = x_sum.data(), args.y = (uint16_t*)y.data_ptr();
  product(args, threads);
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(slimserve, CPU, m) { m.impl("w4a16_linear", TORCH_BOX(&w4a16_linear)); }
