// y (M, N) = x (M, K) @ w (N, K)ᵀ * scale (N): bf16 activations, int8 weights (W8A16), for the few
// rows of a decode step; AVX512 (its BF16 dot products where the CPU has them), OpenMP. Built and
// registered by w8a16.py as the torch operator slimserve::w8a16_matmul (torch's stable C++ API), so
// compiled graphs call it without Python.
// With zero points, groups: y = x @ (scale (N, G) * (w + 128 - zero (N, G)))ᵀ per group of K / G
// columns, the weight rounded to bf16 as torch rounds the dequantized weight (exact before rounding);
// past GEMM_ROWS rows (a prefill) that weight is dequantized here and multiplied by torch's matmul.
//
// Each thread takes blocks of R adjacent weight rows (contiguous in memory), widens 32 weights at a
// time to bf16 (exact: an int8 has at most 8 significant bits) and multiplies them with up to 8
// activation rows by vdpbf16ps, which sums pairs of bf16 products into fp32. The weight is read
// from memory once whatever the row count; more than 8 rows take the block again in chunks of 8,
// from cache. Software prefetch runs PREFETCH_BYTES ahead of the block: the hardware prefetcher
// alone streamed 13 GB/s on two Zen 4 cores, 33 with it. Built without AVX512-BF16 (the -mavx512bf16
// flag), the same bf16 values are held as fp32 lanes and multiplied by two FMAs per 32 weights:
// products exact in fp32 as vdpbf16ps's, sums in another order.

#include <immintrin.h>
#include <stdint.h>

#include <optional>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "rows.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using slimserve::bf16_to_float;
using slimserve::float_to_bf16;

constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int MAX_CHUNK = 8;  // activation rows per pass: MAX_CHUNK x R accumulators in registers
// More rows than this with zero points: the weight dequantized to bf16 once and multiplied by torch's
// bf16 GEMM (oneDNN), which the dot products below, widening the weight again for every 8 rows, trail
// from about 50 rows: SmolLM2's 121 layers in groups of 32 take 26 / 55 / 103 ms at 32 / 64 / 128 rows
// with the dot products, 21 / 31 / 49 in the GEMM alone, and dequantizing them takes 16.
constexpr int64_t GEMM_ROWS = 48;

#ifdef __AVX512BF16__
using Wide = __m512bh;  // 32 bf16 weights

// lo and hi, 16 fp32 each, as 32 bf16 in order, rounded to nearest even.
inline Wide pack(__m512 lo, __m512 hi) { return _mm512_cvtne2ps_pbh(hi, lo); }

// acc + the products of 32 bf16 activations at x with w, summed in pairs into 16 fp32 lanes.
inline __m512 dot(__m512 acc, const uint16_t* x, Wide w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x), w);
}

inline void store(uint16_t* out, Wide w) { _mm512_storeu_si512(out, (__m512i)w); }
#else
struct Wide {  // 32 bf16 weights as fp32 lanes: the first 16, the last 16
  __m512 lo, hi;
};

inline Wide pack(__m512 lo, __m512 hi) { return {slimserve::round_bf16(lo), slimserve::round_bf16(hi)}; }

inline __m512 dot(__m512 acc, const uint16_t* x, Wide w) {
  acc = _mm512_fmadd_ps(slimserve::widen(x, 0xFFFF), w.lo, acc);
  return _mm512_fmadd_ps(slimserve::widen(x + 16, 0xFFFF), w.hi, acc);
}

inline void store(uint16_t* out, Wide w) {
  _mm256_storeu_si256((__m256i*)out, slimserve::to_bf16(w.lo));
  _mm256_storeu_si256((__m256i*)(out + 16), slimserve::to_bf16(w.hi));
}
#endif

// 32 int8 weights -> 32 bf16, in order.
inline Wide widen(const int8_t* p) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
#ifdef __AVX512BF16__
  return pack(lo, hi);
#else
  return {lo, hi};  // exact: an int8 has at most 8 significant bits
#endif
}

// 32 int8 weights w -> 32 bf16 of w * scale + offset, in order. With offset = -scale * (zero - 128)
// each lane is scale * (w + 128 - zero) exactly in fp32 (17 significant bits at most) before the
// one rounding to bf16.
inline Wide widen(const int8_t* p, __m512 scale, __m512 offset) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  return pack(_mm512_fmadd_ps(lo, scale, offset), _mm512_fmadd_ps(hi, scale, offset));
}

struct Args {
  const uint16_t* x;
  const int8_t* w;
  const uint16_t* scale;  // (N) or, with zero, (N, G)
  const uint8_t* zero;    // (N, G), or null: one scale per row, no zero point
  uint16_t* y;
  int64_t M, N, K, G;
};

// Rows [m0, m0 + M) of y for weight rows [n, n + R); Grouped: with zero points (a.zero).
template <int M, int R, bool Grouped>
void block(const Args& a, int64_t m0, int64_t n) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* w = a.w + n * a.K;
  const int8_t* end = a.w + a.N * a.K;
  const int64_t group = a.K / a.G;
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 scale[R], offset[R];
    for (int r = 0; r < R && Grouped; ++r) {
      float s = bf16_to_float(a.scale[(n + r) * a.G + g]);
      scale[r] = _mm512_set1_ps(s);
      offset[r] = _mm512_set1_ps(-s * (float)(a.zero[(n + r) * a.G + g] - 128));
    }
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      for (int j = 0; j < (R + 1) / 2; ++j) {  // R x 32 bytes per step: R / 2 cache lines
        const int8_t* p = w + PREFETCH_BYTES + k * R + j * 64;
        if (p < end) _mm_prefetch((const char*)p, _MM_HINT_T0);
      }
      Wide wv[R];
      for (int r = 0; r < R; ++r) {
        if constexpr (Grouped)
          wv[r] = widen(w + r * a.K + k, scale[r], offset[r]);
        else
          wv[r] = widen(w + r * a.K + k);
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = dot(acc[m][r], a.x + (m0 + m) * a.K + k, wv[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float scale = Grouped ? 1.0f : bf16_to_float(a.scale[n + r]);
    for (int m = 0; m < M; ++m) a.y[(m0 + m) * a.N + n + r] = float_to_bf16(_mm512_reduce_add_ps(acc[m][r]) * scale);
  }
}

template <int R, bool Grouped>
void rows(const Args& a, int64_t n) {
  for (int64_t m0 = 0; m0 < a.M; m0 += MAX_CHUNK)
    slimserve::with_rows<MAX_CHUNK>(a.M - m0, [&](auto m) { block<decltype(m)::value, R, Grouped>(a, m0, n); });
}

template <int R, bool Grouped>
void run(const Args& a, int threads) {
  int64_t blocks = a.N / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; ++i) rows<R, Grouped>(a, i * R);
  for (int64_t n = blocks * R; n < a.N; ++n) rows<1, Grouped>(a, n);
}

template <bool Grouped>
void run(const Args& a, int threads) {
  if (a.M <= 2)
    run<4, Grouped>(a, threads);  // fewer rows: more weight rows per step keep the loads busy
  else
    run<2, Grouped>(a, threads);
}

// The grouped weight (a.zero) as (N, K) bf16 into out, each value rounded as block() rounds it.
void dequantize(const Args& a, uint16_t* out, int threads) {
  const int64_t group = a.K / a.G;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t g = 0; g < a.G; ++g) {
      const float s = bf16_to_float(a.scale[n * a.G + g]);
      const __m512 scale = _mm512_set1_ps(s), offset = _mm512_set1_ps(-s * (float)(a.zero[n * a.G + g] - 128));
      for (int64_t k = g * group; k < (g + 1) * group; k += 32)
        store(out + n * a.K + k, widen(a.w + n * a.K + k, scale, offset));
    }
}

// x (M, K) bf16, w (N, K) int8, scale (N) bf16; or with zero points, scale (N, G) bf16 and zero (N, G) uint8.
Tensor w8a16_matmul(Tensor x, Tensor w, Tensor scale, std::optional<Tensor> zero) {
  STD_TORCH_CHECK(x.dim() == 2 && x.scalar_type() == ScalarType::BFloat16 && x.is_contiguous(),
                  "w8a16_matmul needs contiguous 2-D bf16 activations");
  STD_TORCH_CHECK(w.dim() == 2 && w.scalar_type() == ScalarType::Char && w.is_contiguous(),
                  "w8a16_matmul needs a contiguous 2-D int8 weight");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  STD_TORCH_CHECK(w.size(1) == K, "w8a16_matmul: the activations have ", K, " columns, the weight ", w.size(1));
  const int64_t G = zero.has_value() && scale.dim() == 2 ? scale.size(1) : 1;
  STD_TORCH_CHECK(scale.dim() == (zero.has_value() ? 2 : 1) && scale.size(0) == N &&
                  scale.scalar_type() == ScalarType::BFloat16 && scale.is_contiguous(),
                  "w8a16_matmul needs bf16 scales (N), or (N, groups) with zero points");
  STD_TORCH_CHECK(!zero.has_value() || (zero->sizes().equals(scale.sizes()) &&
                                        zero->scalar_type() == ScalarType::Byte && zero->is_contiguous()),
                  "w8a16_matmul needs uint8 zeros shaped as the scales");
  STD_TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 32 == 0,
                  "w8a16_matmul needs groups of a multiple of 32 columns, got ", K, " columns in ", G, " groups");
  Args a{(const uint16_t*)x.data_ptr(), (const int8_t*)w.data_ptr(), (const uint16_t*)scale.data_ptr(),
         zero.has_value() ? (const uint8_t*)zero->data_ptr() : nullptr, nullptr, M, N, K, G};
  const int threads = torch::stable::get_num_threads();
  if (zero.has_value() && M > GEMM_ROWS) {
    Tensor weight = torch::stable::new_empty(x, {N, K});
    dequantize(a, (uint16_t*)weight.data_ptr(), threads);
    return torch::stable::matmul(x, torch::stable::transpose(weight, 0, 1));
  }
  Tensor y = torch::stable::new_empty(x, {M, N});
  if (M == 0 || N == 0) return y;
  a.y = (uint16_t*)y.data_ptr();
  if (zero.has_value())
    run<true>(a, threads);
  else
    run<false>(a, threads);
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(slimserve, CPU, m) { m.impl("w8a16_matmul", TORCH_BOX(&w8a16_matmul)); }
