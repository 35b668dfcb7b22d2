// Matrix-vector products for batch-1 decode with AVX512 (F, BW, VL):
// y (M, N) = x (M, K) @ (w (N, K) * scales (N,)).T + bias, each weight widened to fp32 in registers
// and summed in fp32, as kernels/gemv.py's torch expression computes it (only the order of the sums
// differs). Weights fp32, bf16 or int8, read in their plain (N, K) layout; activations fp32 or bf16,
// and y in their dtype. Built and registered by gemv.py as the torch operator slimserve::gemv, so a
// compiled graph calls it without Python.
//
// One row's product is the time to read the weight. bf16 activations are widened to fp32 once; each
// thread then streams a contiguous range of weight rows in address order, one row at a time, which
// keeps the hardware prefetcher on one long stream. Blocks of 8 rows read side by side, each row a
// stream of its own, read SmolLM2-135M's bf16 layers from DRAM at a third of that speed (rows of 576
// values: each stream ends before the prefetcher has learnt it), though as fast from cache.
// Software prefetch runs PREFETCH_BYTES ahead of the row read: SmolLM2-135M's 121 bf16 layers, one
// row, 2 threads, took 6.1-6.3 ms with it against 7.1-7.4 without (same minutes, alternating runs).

#include <immintrin.h>
#include <stdint.h>

#include <optional>
#include <type_traits>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "rows.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int ACC = 4;  // accumulators per dot product
constexpr int64_t PREFETCH_BYTES = 4096;  // 1024 ran 5 % slower, 8192 and 16384 alike

using slimserve::widen;  // fp32 and bf16 weights

inline __m512 widen(const int8_t* p, __mmask16 valid) {  // 16 int8 weights widened to fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(valid, p)));
}

inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = slimserve::float_to_bf16(v); }

// An optional (N,) fp32 or bf16 vector: scales or bias.
struct PerRow {
  const void* p = nullptr;
  bool bf16 = false;
  float operator[](int64_t n) const {
    return bf16 ? slimserve::bf16_to_float(((const uint16_t*)p)[n]) : ((const float*)p)[n];
  }
};

// x (K,) fp32 . w (K,), in ACC interleaved fp32 sums (independent FMA chains).
template <class W>
float dot(const float* x, const W* w, int64_t K) {
  constexpr __mmask16 all = 0xFFFF;
  __m512 acc[ACC];
  for (int i = 0; i < ACC; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * ACC <= K; k += 16 * ACC)
#pragma GCC unroll 8
    for (int i = 0; i < ACC; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * i), widen(w + k + 16 * i, all), acc[i]);
  for (int i = 0; k < K; k += 16, ++i) {
    const __mmask16 valid = slimserve::lanes(K - k);
    acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, x + k), widen(w + k, valid), acc[i]);
  }
  for (int i = 1; i < ACC; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

// y (M, N) = xf (M, K) fp32 . w (N, K)ᵀ * scale + bias; each thread streams a contiguous range of
// weight rows in order, every activation row over each weight row while it is in L1.
template <class X, class W>
void product(const float* xf, const W* w, PerRow scale, PerRow bias, X* y, int64_t M, int64_t N, int64_t K,
             int threads) {
  const int64_t row_bytes = K * (int64_t)sizeof(W);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const char* ahead = (const char*)(w + n * K) + PREFETCH_BYTES;
    // Non-temporal: the weight is read once a step; cache stays with activations and the KV cache.
    for (int64_t byte = 0; byte < row_bytes; byte += 64)
      _mm_prefetch(ahead + byte, _MM_HINT_NTA);  // a hint: past the end is harmless
    for (int64_t m = 0; m < M; ++m) {
      float v = dot(xf + m * K, w + n * K, K);
      if (scale.p) v *= scale[n];
      if (bias.p) v += bias[n];
      store(y + m * N + n, v);
    }
  }
}

template <class X, class W>
void run(const Tensor& x, const Tensor& w, PerRow scale, PerRow bias, Tensor& y, int threads) {
  const int64_t M = x.size(0), K = x.size(1);
  const X* xp = (const X*)x.data_ptr();
  std::vector<float> widened;
  if constexpr (!std::is_same_v<X, float>) {
    widened.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) widened[i] = slimserve::bf16_to_float(xp[i]);
  }
  const float* xf = std::is_same_v<X, float> ? (const float*)xp : widened.data();
  product(xf, (const W*)w.data_ptr(), scale, bias, (X*)y.data_ptr(), M, w.size(0), K, threads);
}

// run<X, W> for the weight's dtype.
template <class X>
void run_for_weight(const Tensor& x, const Tensor& w, PerRow scale, PerRow bias, Tensor& y, int threads) {
  switch (w.scalar_type()) {
    case ScalarType::Float: return run<X, float>(x, w, scale, bias, y, threads);
    case ScalarType::BFloat16: return run<X, uint16_t>(x, w, scale, bias, y, threads);
    default: return run<X, int8_t>(x, w, scale, bias, y, threads);  // int8, as gemv checked
  }
}

PerRow per_row(const std::optional<Tensor>& v, int64_t N, const char* name) {
  if (!v.has_value()) return {};
  const ScalarType t = v->scalar_type();
  STD_TORCH_CHECK(v->dim() == 1 && v->size(0) == N && v->is_contiguous() &&
                  (t == ScalarType::Float || t == ScalarType::BFloat16),
                  "gemv: ", name, " must be a contiguous fp32 or bf16 vector of one value per output row (", N, ")");
  return {v->data_ptr(), t == ScalarType::BFloat16};
}

Tensor gemv(Tensor x, Tensor w, std::optional<Tensor> scales, std::optional<Tensor> bias) {
  const ScalarType xt = x.scalar_type(), wt = w.scalar_type();
  STD_TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (xt == ScalarType::Float || xt == ScalarType::BFloat16),
                  "gemv needs contiguous 2-D fp32 or bf16 activations");
  STD_TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                  (wt == ScalarType::Float || wt == ScalarType::BFloat16 || wt == ScalarType::Char),
                  "gemv needs a contiguous 2-D fp32, bf16 or int8 weight");
  const int64_t N = w.size(0);
  STD_TORCH_CHECK(x.size(1) == w.size(1), "gemv: the activations have ", x.size(1), " columns, the weight ",
                  w.size(1));
  const PerRow sp = per_row(scales, N, "scales"), bp = per_row(bias, N, "bias");
  Tensor y = torch::stable::new_empty(x, {x.size(0), N});
  if (x.size(0) == 0 || N == 0) return y;
  const int threads = torch::stable::get_num_threads();
  if (xt == ScalarType::Float) run_for_weight<float>(x, w, sp, bp, y, threads);
  else run_for_weight<uint16_t>(x, w, sp, bp, y, threads);
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(slimserve, CPU, m) { m.impl("gemv", TORCH_BOX(&gemv)); }
