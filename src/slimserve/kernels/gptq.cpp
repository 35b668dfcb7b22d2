// GPTQ's column steps inside one block of columns, for quant/gptq.py (loaded with ctypes by
// kernels/gptq.py). Each step is a few vector operations over the weight's output rows, so in
// torch the loop is bound by per-operation overhead. Rows are independent in GPTQ, so each thread
// takes a range of rows through every column of the run without synchronizing.
//
// wt (in, out) holds the weight transposed, so column `col` is the contiguous row wt[col]. For the
// columns c0 <= col < c1 of the block [i1, i2), which share one scale and zero point per row:
//   q = clamp(round(w / scale) + zero, 0, 2^bits - 1)       (round half to even, as torch.round)
//   err = w - (q - zero) * scale                              -> delta[col - i1]
//   wt[j] -= spread[col - i1, j - i1] * err  for col < j < i2 (spread (i2 - i1, i2 - i1))
// as gptq_columns_reference in kernels/gptq.py, in fp32.

#include <math.h>
#include <stdint.h>

extern "C" int gptq_columns(float* wt, float* qt, float* delta, const float* spread, const float* scale,
                            const float* zero, int64_t out, int64_t i1, int64_t c0, int64_t c1, int64_t i2,
                            int bits, int threads) {
  const float max_q = (float)((1 << bits) - 1);
  const int64_t width = i2 - i1;
  const int64_t chunk = 64;  // rows per task: a multiple of 16 lanes
  const int64_t tasks = (out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r0 = task * chunk, r1 = r0 + chunk < out ? r0 + chunk : out;
    for (int64_t col = c0; col < c1; ++col) {
      const int64_t i = col - i1;
      const float* w = wt + col * out;
      float* q = qt + col * out;
      float* err = delta + i * out;
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) {
        float v = nearbyintf(w[r] / scale[r]) + zero[r];
        v = v < 0.0f ? 0.0f : (v > max_q ? max_q : v);
        q[r] = v;
        err[r] = w[r] - (v - zero[r]) * scale[r];
      }
      for (int64_t j = col + 1; j < i2; ++j) {
        const float f = spread[i * width + (j - i1)];
        float* target = wt + j * out;
#pragma omp simd
        for (int64_t r = r0; r < r1; ++r) target[r] -= f * err[r];
      }
    }
  }
  return 0;
}
