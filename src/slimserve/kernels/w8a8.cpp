// W8A8 with AVX512-VNNI on an int8 weight w (N, K) held in VNNI order; built and registered by w8a8.py
// as the torch operators slimserve::w8a8_matmul and slimserve::w8a8_linear, so compiled graphs call them
// without Python.
//
// w8a8_matmul: y (M, N) fp32 = (x (M, K) uint8 @ wᵀ - corr (N)) * scale (N), with x the int8
//   activations + 128 and corr = 128 * w's row sums: the signed product times the weight scales.
// w8a8_linear: the same for bf16 activations quantized here per row, as QuantLinear does it in torch
//   (row scale max|x| / 127, at least 1e-12 / 127; round half to even; clamp to +-127), times the row
//   scales and rounded to bf16: one call for what is a dozen torch operations otherwise.
//
// VNNI order: blocks of 16 output rows, each as (K / 4, 16, 4) bytes, so one vpdpbusd multiplies 4
// activations (broadcast) with 4 weights of each of 16 rows and adds the four products into that
// row's int32 lane. Each thread takes R adjacent blocks at a time and runs every activation row over
// them, MAX_CHUNK rows per pass: the blocks are read from memory once, later passes find them in
// cache. int32 sums are exact (|sum| < 255 * 128 * K).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "rows.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t PREFETCH_BYTES = 1024;  // per weight stream
// Activation rows per pass and blocks per task: 8 x 3 accumulators, 3 weight and 1 activation
// registers. SmolLM2-135M's 121 layers on 2 Zen 5 cores, one weight per shape (so from cache): 0.82
// / 1.45 / 4.86 / 13.8 / 223 ms at 1 / 8 / 32 / 128 / 2048 rows, where 4 x 3 took 0.88 / 1.99 / 6.61 /
// 18.8 / 304 (before rows.h's dpbusd, 4 x 3 was the fastest: larger blocks left registers for the
// stack); 7 x 3, 6 x 4, 6 x 3 and 4 x 4 were slower from 8 rows. 32 rows run at 85 % of the cores'
// vpdpbusd rate (about 2 a cycle: 1,047 G int8 products a second measured), 2048 rows at 93 %.
constexpr int MAX_CHUNK = 8;
constexpr int R = 3;

struct Args {
  const uint8_t* x;
  const int8_t* w;
  const int32_t* corr;
  const float* scale;
  const float* row_scale;  // w8a8_linear: per activation row, and y is y_bf16
  float* y;
  uint16_t* y_bf16;
  int64_t M, N, K;
};

// Rows [m0, m0 + M) of y for blocks [b0, b0 + B).
template <int M, int B>
void block(const Args& a, int64_t m0, int64_t b0) {
  __m512i acc[M][B];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b) acc[m][b] = _mm512_setzero_si512();
  const int64_t quads = a.K / 4;
  const int8_t* w = a.w + b0 * quads * 64;
  for (int64_t j = 0; j < quads; ++j) {
    __m512i wv[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      const int8_t* p = w + (b * quads + j) * 64;
      _mm_prefetch((const char*)(p + PREFETCH_BYTES), _MM_HINT_T0);  // a hint: past the end is harmless
      wv[b] = _mm512_loadu_si512(p);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      int32_t four;
      __builtin_memcpy(&four, a.x + (m0 + m) * a.K + 4 * j, 4);
      __m512i xv = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) acc[m][b] = slimserve::dpbusd(acc[m][b], xv, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    int64_t n = (b0 + b) * 16;
    __m512i corr = _mm512_loadu_si512(a.corr + n);
    __m512 scale = _mm512_loadu_ps(a.scale + n);
    for (int m = 0; m < M; ++m) {
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][b], corr)), scale);
      int64_t at = (m0 + m) * a.N + n;
      if (a.row_scale)
        _mm256_storeu_si256((__m256i*)(a.y_bf16 + at), slimserve::to_bf16(_mm512_mul_ps(y, _mm512_set1_ps(a.row_scale[m0 + m]))));
      else
        _mm512_storeu_ps(a.y + at, y);
    }
  }
}

template <int B>
void task(const Args& a, int64_t b0) {
  for (int64_t m0 = 0; m0 < a.M; m0 += MAX_CHUNK)
    slimserve::with_rows<MAX_CHUNK>(a.M - m0, [&](auto m) { block<decltype(m)::value, B>(a, m0, b0); });
}

void product(const Args& a, int threads) {
  int64_t blocks = a.N / 16, tasks = blocks / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tasks; ++i) task<R>(a, i * R);
  if (blocks > tasks * R)  // the last 1 or 2 blocks
    slimserve::with_rows<R - 1>(blocks - tasks * R, [&](auto b) { task<decltype(b)::value>(a, tasks * R); });
}

// One bf16 row -> uint8 activations + 128 and its scale, as QuantLinear._w8a8 computes them.
void quantize_row(const uint16_t* x, int64_t K, uint8_t* q, float* scale) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16)
    amax = _mm512_max_ps(amax, _mm512_abs_ps(slimserve::widen(x + k, slimserve::lanes(K - k))));
  float s = fmaxf(_mm512_reduce_max_ps(amax), 1e-12f) / 127.0f;
  *scale = s;
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 mask = slimserve::lanes(K - k);
    __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(slimserve::widen(x + k, mask), sv));  // half to even
    v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtepi32_epi8(_mm512_add_epi32(v, _mm512_set1_epi32(128))));
  }
}

// x (M, K) of `x_type`, w (N / 16, K / 4, 16, 4) int8, corr (N,) int32, scale (N,) fp32.
void check_operands(const char* op, const Tensor& x, ScalarType x_type, const Tensor& w, const Tensor& corr,
                    const Tensor& scale) {
  STD_TORCH_CHECK(x.dim() == 2 && x.scalar_type() == x_type && x.is_contiguous(), op, " needs contiguous 2-D ",
                  x_type == ScalarType::Byte ? "uint8" : "bf16", " activations");
  STD_TORCH_CHECK(w.dim() == 4 && w.size(2) == 16 && w.size(3) == 4 && w.scalar_type() == ScalarType::Char &&
                  w.is_contiguous(), op, " needs w8a8.pack's weight");
  STD_TORCH_CHECK(w.size(1) * 4 == x.size(1), op, ": the activations have ", x.size(1), " columns, the weight ",
                  w.size(1) * 4);
  const int64_t N = w.size(0) * 16;
  STD_TORCH_CHECK(corr.dim() == 1 && corr.size(0) == N && corr.scalar_type() == ScalarType::Int && corr.is_contiguous(),
                  op, " needs pack's int32 row sums (N,)");
  STD_TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == ScalarType::Float &&
                  scale.is_contiguous(), op, " needs fp32 weight scales (N,)");
}

// x_u8 (M, K) uint8 -> y (M, N) fp32.
Tensor w8a8_matmul(Tensor x, Tensor w, Tensor corr, Tensor scale) {
  check_operands("w8a8_matmul", x, ScalarType::Byte, w, corr, scale);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 16;
  Tensor y = torch::stable::new_empty(x, {M, N}, ScalarType::Float);
  product(Args{(const uint8_t*)x.data_ptr(), (const int8_t*)w.data_ptr(), (const int32_t*)corr.data_ptr(),
               (const float*)scale.data_ptr(), nullptr, (float*)y.data_ptr(), nullptr, M, N, K},
          torch::stable::get_num_threads());
  return y;
}

// x (M, K) bf16 -> y (M, N) bf16.
Tensor w8a8_linear(Tensor x, Tensor w, Tensor corr, Tensor scale) {
  check_operands("w8a8_linear", x, ScalarType::BFloat16, w, corr, scale);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 16;
  Tensor y = torch::stable::new_empty(x, {M, N});
  const int threads = torch::stable::get_num_threads();
  std::vector<uint8_t> xq(M * K);
  std::vector<float> row_scale(M);
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 8)
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, xq.data() + m * K, &row_scale[m]);
  product(Args{xq.data(), (const int8_t*)w.data_ptr(), (const int32_t*)corr.data_ptr(), (const float*)scale.data_ptr(),
               row_scale.data(), nullptr, (uint16_t*)y.data_ptr(), M, N, K},
          threads);
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(slimserve, CPU, m) {
  m.impl("w8a8_matmul", TORCH_BOX(&w8a8_matmul));
  m.impl("w8a8_linear", TORCH_BOX(&w8a8_linear));
}
