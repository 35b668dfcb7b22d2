// W8A8's integer product: y (M, N) fp32 = (x (M, K) uint8 @ w (N, K) int8ᵀ - corr (N)) * scale (N),
// with x the int8 activations + 128 and corr = 128 * the weight's row sums, so y is the signed product
// times the weight scales. Built and called by w8a8.py; AVX512-VNNI, OpenMP.
//
// The weight is held in VNNI order: blocks of 16 output rows, each as (K / 4, 16, 4) bytes, so one
// vpdpbusd multiplies 4 activations (broadcast) with 4 weights of each of 16 rows and adds the four
// products into that row's int32 lane. Each thread takes R adjacent blocks at a time and runs every
// activation row over them, MAX_CHUNK rows per pass: the blocks are read from memory once, later
// passes find them in cache. int32 sums are exact (|sum| < 255 * 128 * K).

#include <immintrin.h>
#include <stdint.h>

namespace {

constexpr int64_t PREFETCH_BYTES = 1024;  // per weight stream
// Activation rows per pass and blocks per task: 4 x 3 accumulators. 8 x 3 spilled GCC's register
// allocation into copies; 4 x 3 beat 8 x 1, 8 x 2, 5 x 3 and 6 x 3 from 1 to 512 rows.
constexpr int MAX_CHUNK = 4;
constexpr int R = 3;

struct Args {
  const uint8_t* x;
  const int8_t* w;
  const int32_t* corr;
  const float* scale;
  float* y;
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
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      int32_t four;
      __builtin_memcpy(&four, a.x + (m0 + m) * a.K + 4 * j, 4);
      __m512i xv = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) acc[m][b] = _mm512_dpbusd_epi32(acc[m][b], xv, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    int64_t n = (b0 + b) * 16;
    __m512i corr = _mm512_loadu_si512(a.corr + n);
    __m512 scale = _mm512_loadu_ps(a.scale + n);
    for (int m = 0; m < M; ++m)
      _mm512_storeu_ps(a.y + (m0 + m) * a.N + n, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][b], corr)), scale));
  }
}

template <int B>
void task(const Args& a, int64_t b0) {
  for (int64_t m0 = 0; m0 < a.M; m0 += MAX_CHUNK) {
    switch (a.M - m0 < MAX_CHUNK ? a.M - m0 : MAX_CHUNK) {
      case 1: block<1, B>(a, m0, b0); break;
      case 2: block<2, B>(a, m0, b0); break;
      case 3: block<3, B>(a, m0, b0); break;
      default: block<4, B>(a, m0, b0); break;
    }
  }
}

}  // namespace

// Returns 0, or 1 when N is not a multiple of 16 or K of 4 (nothing written).
extern "C" int w8a8_matmul(const uint8_t* x, const int8_t* w, const int32_t* corr, const float* scale, float* y,
                           int64_t M, int64_t N, int64_t K, int threads) {
  if (N % 16 != 0 || K % 4 != 0 || M < 1) return 1;
  Args a{x, w, corr, scale, y, M, N, K};
  int64_t blocks = N / 16, tasks = blocks / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tasks; ++i) task<R>(a, i * R);
  switch (blocks - tasks * R) {
    case 1: task<1>(a, tasks * R); break;
    case 2: task<2>(a, tasks * R); break;
  }
  return 0;
}
