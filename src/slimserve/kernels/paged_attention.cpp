// Paged attention with AVX512 (F, BW, VL, DQ), softmax(q kᵀ · scale) v over the positions each
// sequence's block table lists, scores, softmax and sums in fp32; q fp32 or bf16, the cache fp32 or
// bf16, the output in q's dtype. Built and registered by paged_attention.py as the torch operators
// slimserve::decode_attention (one query token per sequence, as models/attention.py's decode_attention
// computes it; only the order of the sums differs) and slimserve::prefill_attention (the last query
// tokens of each sequence, causal; below), so a compiled graph calls them without Python.
//
// Decode attention is the time to read the cache. One task per (sequence, KV head): its keys are read
// once, in position order, each widened once and dotted with the group's query heads; then its values
// once, added into the heads' fp32 sums. The blocks lie scattered, so each task prefetches its rows
// ahead of the one it reads (the values' during the keys' pass): 32 sequences of 64-128 positions, 3
// bf16 KV heads of 64, take 120 µs a layer on 2 Zen 5 cores (cache from DRAM), 360 without prefetching.

#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "rows.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t AHEAD = 16;  // rows prefetched ahead of the one read (12 to 32 ran alike, 64 slower)
constexpr int64_t TILE = 128;  // positions whose values stay in L1 while each 32-value slice of them is added

using slimserve::lanes;
using slimserve::widen;

inline void store(float* p, __m512 v, __mmask16 valid) { _mm512_mask_storeu_ps(p, valid, v); }
inline void store(uint16_t* p, __m512 v, __mmask16 valid) { _mm256_mask_storeu_epi16(p, valid, slimserve::to_bf16(v)); }

// e^x in 16 lanes: 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r to degree 6 (relative error
// 2e-7). With expf per score the whole call took 20-35% longer.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // e^-104 rounds to 0 in fp32; a NaN x stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: n · the first is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// D rounded up to 32: the length of the fp32 rows of q and sums, zero-padded.
inline int64_t padded(int64_t D) { return (D + 31) / 32 * 32; }

template <class T>
void widen_row(const T* row, int64_t D, float* to) {  // to (padded(D),)
  for (int64_t d = 0; d < padded(D); d += 16) _mm512_storeu_ps(to + d, widen(row + d, lanes(D - d)));
}

template <class C>
void prefetch(const C* row, int64_t D) {
  for (int64_t byte = 0; byte < D * (int64_t)sizeof(C); byte += 64) _mm_prefetch((const char*)row + byte, _MM_HINT_T0);
}

// One (sequence, KV head) pair's L positions, in order.
template <class C>
struct Positions {
  const C *keys, *values;  // its KV head's part of the cache
  const int64_t* rows;     // where position j < cached starts in keys and values
  int64_t L, cached;       // cached is L, or L - 1 with the last position's key and value in key_new, value_new
  const float *key_new = nullptr, *value_new = nullptr;
};

// scores (G, L) = q (G, padded(D)) · keysᵀ · scale: each key widened once for up to 8 heads at a
// time, their sums in registers.
template <class C>
void score_keys(const Positions<C>& p, const float* q, int64_t G, int64_t D, float scale, float* scores) {
  for (int64_t h0 = 0; h0 < G; h0 += 8)
    slimserve::with_rows<8>(std::min<int64_t>(8, G - h0), [&](auto heads) {
      constexpr int R = decltype(heads)::value;
      const float* qh[R];
      for (int h = 0; h < R; ++h) qh[h] = q + (h0 + h) * padded(D);
      auto score = [&](int64_t j, const auto* k) {
        __m512 acc[R];
        for (int h = 0; h < R; ++h) acc[h] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 kd = widen(k + d, lanes(D - d));
          for (int h = 0; h < R; ++h) acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(qh[h] + d), kd, acc[h]);
        }
        for (int h = 0; h < R; ++h) scores[(h0 + h) * p.L + j] = _mm512_reduce_add_ps(acc[h]) * scale;
      };
      for (int64_t j = 0; j < p.cached; ++j) {
        if (j + AHEAD < p.cached) prefetch(p.keys + p.rows[j + AHEAD], D), prefetch(p.values + p.rows[j + AHEAD], D);
        score(j, p.keys + p.rows[j]);
      }
      if (p.key_new) score(p.L - 1, p.key_new);
    });
}

// weights (G, L): scores -> e^(score - its head's max), in place; totals (G,): their sums.
void softmax_numerators(float* weights, int64_t G, int64_t L, float* totals) {
  for (int64_t h = 0; h < G; ++h) {
    float* s = weights + h * L;
    __m512 max = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < L; j += 16) max = _mm512_max_ps(max, _mm512_mask_loadu_ps(max, lanes(L - j), s + j));
    max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 valid = lanes(L - j);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(widen(s + j, valid), max)));
      store(s + j, e, valid);
      total = _mm512_add_ps(total, e);
    }
    totals[h] = _mm512_reduce_add_ps(total);
  }
}

// sums (G, padded(D)) = weights (G, L) · values: each 32-value slice of up to 8 heads' sums in
// registers while a TILE of positions passes (a sum kept in memory waited on its own store).
template <class C>
void add_values(const Positions<C>& p, const float* weights, int64_t G, int64_t D, float* sums) {
  std::fill(sums, sums + G * padded(D), 0.f);
  for (int64_t t = 0; t < p.L; t += TILE)
    for (int64_t h0 = 0; h0 < G; h0 += 8)
      slimserve::with_rows<8>(std::min<int64_t>(8, G - h0), [&](auto heads) {
        constexpr int R = decltype(heads)::value;
        for (int64_t d = 0; d < D; d += 32) {
          __m512 acc[R][2];
          for (int h = 0; h < R; ++h)
            for (int i = 0; i < 2; ++i) acc[h][i] = _mm512_loadu_ps(sums + (h0 + h) * padded(D) + d + 16 * i);
          auto add = [&](int64_t j, const auto* v) {
            const __m512 vd[2] = {widen(v + d, lanes(D - d)), widen(v + d + 16, lanes(D - d - 16))};
            for (int h = 0; h < R; ++h) {
              const __m512 w = _mm512_set1_ps(weights[(h0 + h) * p.L + j]);
              for (int i = 0; i < 2; ++i) acc[h][i] = _mm512_fmadd_ps(w, vd[i], acc[h][i]);
            }
          };
          for (int64_t j = t; j < std::min(p.cached, t + TILE); ++j) {
            if (d == 0 && j + AHEAD < p.cached) prefetch(p.values + p.rows[j + AHEAD], D);  // long contexts
            add(j, p.values + p.rows[j]);
          }
          if (p.value_new && t + TILE >= p.L) add(p.L - 1, p.value_new);
          for (int h = 0; h < R; ++h)
            for (int i = 0; i < 2; ++i) _mm512_storeu_ps(sums + (h0 + h) * padded(D) + d + 16 * i, acc[h][i]);
        }
      });
}

struct Args {
  const void *q, *k_cache, *v_cache, *k_new, *v_new;  // k_new, v_new null when absent
  int64_t q_stride, k_new_stride, v_new_stride;        // between sequences: their rows may be views of a wider one
  bool new_bf16;
  const int64_t *block_tables, *context_lens;
  void* out;
  int64_t n, H, Hkv, D, num_blocks, block_size, max_blocks, sliding_window;
  float scale;
};

// The first position a query at position `pos` sees (models/attention.py's causal_allowed; a decode
// query is at its context's last position).
int64_t first_seen(int64_t pos, int64_t sliding_window) {
  return sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
}

// Every block table entry (sequence i) for positions [first, end) lies in the cache: checked before a
// parallel loop, which cannot raise.
void check_blocks(const char* op, const int64_t* table, int64_t i, int64_t first, int64_t end, int64_t block_size,
                  int64_t num_blocks) {
  for (int64_t b = first / block_size; b * block_size < end; ++b)
    STD_TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, op, ": block table entry (", i, ", ", b, ") is ",
                    table[b], ", outside the cache's ", num_blocks, " blocks");
}

// out (n, H, D) for q of type Q and a cache of type C, one task per (sequence, KV head): q and out
// rows task * G + h are its heads.
template <class Q, class C>
void attend(const Args& a, int threads) {
  const int64_t G = a.H / a.Hkv, D = a.D, Dp = padded(D);
  auto widen_new = [&](const void* from, int64_t offset, float* to) {  // its dtype may be q's, not the cache's
    if (a.new_bf16) widen_row((const uint16_t*)from + offset, D, to);
    else widen_row((const float*)from + offset, D, to);
  };
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> q(G * Dp), sums(G * Dp), totals(G), key_new(Dp), value_new(Dp), weights;
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < a.n * a.Hkv; ++task) {
      const int64_t i = task / a.Hkv, kv = task % a.Hkv, ctx = a.context_lens[i];
      const int64_t first = first_seen(ctx - 1, a.sliding_window), L = ctx - first;
      const int64_t head_size = a.num_blocks * a.block_size * D;
      Positions<C> p{(const C*)a.k_cache + kv * head_size, (const C*)a.v_cache + kv * head_size, nullptr, L,
                     a.k_new ? L - 1 : L};
      rows.resize(p.cached);  // position first + j lives in block table[b] at offset o
      const int64_t* table = a.block_tables + i * a.max_blocks;
      for (int64_t j = 0, b = first / a.block_size, o = first % a.block_size; j < p.cached; ++j) {
        rows[j] = (table[b] * a.block_size + o) * D;
        if (++o == a.block_size) o = 0, ++b;
      }
      p.rows = rows.data();
      for (int64_t j = 0; j < std::min(AHEAD, p.cached); ++j)
        prefetch(p.keys + rows[j], D), prefetch(p.values + rows[j], D);
      if (a.k_new) {
        widen_new(a.k_new, i * a.k_new_stride + kv * D, key_new.data());
        widen_new(a.v_new, i * a.v_new_stride + kv * D, value_new.data());
        p.key_new = key_new.data(), p.value_new = value_new.data();
      }
      for (int64_t h = 0; h < G; ++h) widen_row((const Q*)a.q + i * a.q_stride + (kv * G + h) * D, D, q.data() + h * Dp);

      weights.resize(G * L);
      score_keys(p, q.data(), G, D, a.scale, weights.data());
      softmax_numerators(weights.data(), G, L, totals.data());
      add_values(p, weights.data(), G, D, sums.data());
      for (int64_t h = 0; h < G; ++h)
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(sums.data() + h * Dp + d), _mm512_set1_ps(1 / totals[h]));
          store((Q*)a.out + (task * G + h) * D + d, o, lanes(D - d));
        }
    }
  }
}

bool fp32_or_bf16(const Tensor& t) {
  return t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::BFloat16;
}

// (n, heads, D) with each sequence's heads contiguous; sequences any stride apart (q, k and v are
// views of the fused projection's output).
bool rows_contiguous(const Tensor& t) { return t.dim() == 3 && t.strides()[2] == 1 && t.strides()[1] == t.size(2); }

// Every context fits its table, and every block read lies in the cache: checked before the parallel
// loop, which cannot raise.
void check_tables(const Args& a) {
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t ctx = a.context_lens[i], table_end = a.max_blocks * a.block_size;
    STD_TORCH_CHECK(ctx >= 1 && ctx <= table_end, "decode_attention: sequence ", i, " has context length ", ctx,
                    ", outside 1 to the ", table_end, " positions its block table holds");
    check_blocks("decode_attention", a.block_tables + i * a.max_blocks, i, first_seen(ctx - 1, a.sliding_window),
                 a.k_new ? ctx - 1 : ctx, a.block_size, a.num_blocks);
  }
}

// f(Q{}, C{}) for q's and the cache's element types: float, or uint16_t holding bf16.
template <class F>
void by_dtypes(const Tensor& q, const Tensor& cache, F&& f) {
  const bool q_bf16 = q.scalar_type() == ScalarType::BFloat16, cache_bf16 = cache.scalar_type() == ScalarType::BFloat16;
  if (q_bf16) cache_bf16 ? f(uint16_t{}, uint16_t{}) : f(uint16_t{}, float{});
  else cache_bf16 ? f(float{}, uint16_t{}) : f(float{}, float{});
}

// The operands both operators share: q (rows, H, D), the cache, the block tables, the window.
void check_operands(const char* name, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                    const Tensor& block_tables, int64_t sliding_window) {
  STD_TORCH_CHECK(rows_contiguous(q) && fp32_or_bf16(q), name,
                  " needs an (n, H, D) fp32 or bf16 q, each token's (H, D) contiguous");
  const int64_t H = q.size(1), D = q.size(2);
  STD_TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() && fp32_or_bf16(k_cache) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes(), name,
                  " needs contiguous (Hkv, num_blocks, block_size, D) k_cache and v_cache of one shape, both fp32 ",
                  "or both bf16");
  const int64_t Hkv = k_cache.size(0);
  STD_TORCH_CHECK(k_cache.size(3) == D, name, ": q has head dim ", D, ", the cache ", k_cache.size(3));
  STD_TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, name, ": q's ", H, " heads are not a multiple of the cache's ", Hkv,
                  " KV heads");
  STD_TORCH_CHECK(block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.scalar_type() == ScalarType::Long, name,
                  " needs contiguous (n, max_blocks) int64 block_tables");
  STD_TORCH_CHECK(sliding_window >= 0, name, ": sliding_window is ", sliding_window, ", not 0 (none) or more");
}

Tensor decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens,
                        std::optional<Tensor> k_new, std::optional<Tensor> v_new, double scale,
                        int64_t sliding_window) {
  check_operands("decode_attention", q, k_cache, v_cache, block_tables, sliding_window);
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0);
  STD_TORCH_CHECK(block_tables.size(0) == n, "decode_attention: block_tables has ", block_tables.size(0),
                  " rows for q's ", n, " sequences");
  STD_TORCH_CHECK((context_lens.dim() == 1 || (context_lens.dim() == 2 && context_lens.size(1) == 1)) &&
                  context_lens.is_contiguous() && context_lens.scalar_type() == ScalarType::Long &&
                  context_lens.size(0) == n, "decode_attention needs contiguous (n,) or (n, 1) int64 context_lens");
  STD_TORCH_CHECK(k_new.has_value() == v_new.has_value(),
                  "decode_attention: k_new and v_new come together or not at all");
  if (k_new.has_value())
    for (const Tensor& t : {*k_new, *v_new})
      STD_TORCH_CHECK(rows_contiguous(t) && t.scalar_type() == k_new->scalar_type() && fp32_or_bf16(t) &&
                      t.size(0) == n && t.size(1) == Hkv && t.size(2) == D,
                      "decode_attention needs (n, Hkv, D) k_new and v_new, both fp32 or both bf16, each ",
                      "sequence's (Hkv, D) contiguous");
  Tensor out = torch::stable::new_empty(q, {n, H, D});
  const Args a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_new ? k_new->data_ptr() : nullptr,
               v_new ? v_new->data_ptr() : nullptr, q.strides()[0], k_new ? k_new->strides()[0] : 0,
               v_new ? v_new->strides()[0] : 0, k_new && k_new->scalar_type() == ScalarType::BFloat16,
               (const int64_t*)block_tables.data_ptr(), (const int64_t*)context_lens.data_ptr(), out.data_ptr(),
               n, H, Hkv, D, k_cache.size(1), k_cache.size(2), block_tables.size(1), sliding_window, (float)scale};
  check_tables(a);
  if (n == 0 || H == 0) return out;
  by_dtypes(q, k_cache, [&](auto q_type, auto cache_type) {
    attend<decltype(q_type), decltype(cache_type)>(a, torch::stable::get_num_threads());
  });
  return out;
}


// ---- Prefill: several query tokens per sequence, the last of its context, each attending the
// positions up to its own (and within the sliding window). One task per (sequence, KV head, up to
// QUERY_ROWS of its query tokens), whose rows are its tokens times the KV head's query heads. Its
// queries are transposed, rows in lanes, so that the scores of 8 positions for 48 rows are 24
// multiply-adds per dimension with each key's value broadcast: the keys (its positions up to its last
// query) are only widened to fp32, never transposed; then softmax down each row's lane; then the values,
// added for 6 rows x 64 dimensions at a time in registers.

constexpr int64_t QUERY_ROWS = 16;  // query tokens per task
constexpr int64_t CHUNK = 64;       // value dimensions per pass over a task's positions

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return slimserve::bf16_to_float(v); }

struct PrefillArgs {
  const void *q, *k_cache, *v_cache;
  int64_t q_stride;  // between tokens: q may be a view of the fused projection
  const int64_t *block_tables, *query_starts, *context_lens;
  void* out;
  int64_t n, H, Hkv, D, num_blocks, block_size, max_blocks, sliding_window;
  float scale;
};

// scores (L, Rp) = keys (L, Dk) · qt (D, Rp), Rp a multiple of 16: 8 positions by 3 x 16 rows at a time.
void score_positions(const float* keys, int64_t L, int64_t Dk, const float* qt, int64_t D, int64_t Rp,
                     float* scores) {
  for (int64_t j0 = 0; j0 < L; j0 += 8)
    slimserve::with_rows<8>(L - j0, [&](auto positions) {
      constexpr int J = decltype(positions)::value;
      for (int64_t z0 = 0; z0 < Rp / 16; z0 += 3)
        slimserve::with_rows<3>(Rp / 16 - z0, [&](auto lanes16) {
          constexpr int Z = decltype(lanes16)::value;
          __m512 acc[J][Z];
          for (int j = 0; j < J; ++j)
            for (int z = 0; z < Z; ++z) acc[j][z] = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; ++d) {
            __m512 qd[Z];
            for (int z = 0; z < Z; ++z) qd[z] = _mm512_loadu_ps(qt + d * Rp + (z0 + z) * 16);
            for (int j = 0; j < J; ++j) {
              const __m512 k = _mm512_set1_ps(keys[(j0 + j) * Dk + d]);
              for (int z = 0; z < Z; ++z) acc[j][z] = _mm512_fmadd_ps(k, qd[z], acc[j][z]);
            }
          }
          for (int j = 0; j < J; ++j)
            for (int z = 0; z < Z; ++z) _mm512_storeu_ps(scores + (j0 + j) * Rp + (z0 + z) * 16, acc[j][z]);
        });
    });
}

// scores (L, Rp) -> e^(score - its row's max) in place, down each lane; totals (Rp,): their sums.
void softmax_lanes(float* scores, int64_t L, int64_t Rp, float* totals) {
  for (int64_t r = 0; r < Rp; r += 16) {
    __m512 max = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) max = _mm512_max_ps(max, _mm512_loadu_ps(scores + j * Rp + r));
    for (int64_t j = 0; j < L; ++j) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j * Rp + r), max));
      _mm512_storeu_ps(scores + j * Rp + r, e);
      total = _mm512_add_ps(total, e);
    }
    _mm512_storeu_ps(totals + r, total);
  }
}

// sums (R, Vp) = weightsᵀ · values for weights (L, Rp) and values (L, Vp), Vp a multiple of CHUNK: 6
// rows by CHUNK at a time.
void add_value_rows(const float* weights, int64_t L, int64_t R, int64_t Rp, const float* values, int64_t Vp,
                    float* sums) {
  for (int64_t r0 = 0; r0 < R; r0 += 6)
    slimserve::with_rows<6>(R - r0, [&](auto rows) {
      constexpr int M = decltype(rows)::value;
      for (int64_t d = 0; d < Vp; d += CHUNK) {
        __m512 acc[M][4];
        for (int m = 0; m < M; ++m)
          for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; ++j) {
          __m512 v[4];
          for (int i = 0; i < 4; ++i) v[i] = _mm512_loadu_ps(values + j * Vp + d + 16 * i);
          for (int m = 0; m < M; ++m) {
            const __m512 w = _mm512_set1_ps(weights[j * Rp + r0 + m]);
            for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_fmadd_ps(w, v[i], acc[m][i]);
          }
        }
        for (int m = 0; m < M; ++m)
          for (int i = 0; i < 4; ++i) _mm512_storeu_ps(sums + (r0 + m) * Vp + d + 16 * i, acc[m][i]);
      }
    });
}

template <class Q, class C>
void prefill(const PrefillArgs& a, int threads) {
  const int64_t G = a.H / a.Hkv, D = a.D, Dk = padded(D), Vp = (D + CHUNK - 1) / CHUNK * CHUNK;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, its first query token of the task)
  for (int64_t i = 0; i < a.n; ++i)
    for (int64_t t = a.query_starts[i]; t < a.query_starts[i + 1]; t += QUERY_ROWS) blocks.emplace_back(i, t);
  const int64_t head_size = a.num_blocks * a.block_size * D;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> keys, values, qt, scores, totals, sums;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < (int64_t)blocks.size() * a.Hkv; ++task) {
      const auto [i, t0] = blocks[task / a.Hkv];
      const int64_t kv = task % a.Hkv, t1 = std::min(t0 + QUERY_ROWS, a.query_starts[i + 1]);
      const int64_t last = a.context_lens[i] - (a.query_starts[i + 1] - t0);  // token t0's position
      const int64_t first = first_seen(last, a.sliding_window), L = last + (t1 - t0) - first;
      const int64_t R = (t1 - t0) * G, Rp = (R + 15) / 16 * 16;  // row (t - t0) * G + h: token t, head h
      const C *k_head = (const C*)a.k_cache + kv * head_size, *v_head = (const C*)a.v_cache + kv * head_size;
      const int64_t* table = a.block_tables + i * a.max_blocks;

      keys.resize(L * Dk), values.resize(L * Vp);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t p = first + j, row = (table[p / a.block_size] * a.block_size + p % a.block_size) * D;
        widen_row(k_head + row, D, &keys[j * Dk]);
        for (int64_t d = 0; d < Vp; d += 16) _mm512_storeu_ps(&values[j * Vp + d], widen(v_head + row + d, lanes(D - d)));
      }
      qt.assign(D * Rp, 0.f);  // times the scale
      for (int64_t r = 0; r < R; ++r) {
        const Q* from = (const Q*)a.q + (t0 + r / G) * a.q_stride + (kv * G + r % G) * D;
        for (int64_t d = 0; d < D; ++d) qt[d * Rp + r] = scalar(from[d]) * a.scale;
      }
      scores.resize(L * Rp);
      score_positions(keys.data(), L, Dk, qt.data(), D, Rp, scores.data());
      for (int64_t j = 0; j < L; ++j) {  // rows whose token may not see position first + j
        const int64_t p = first + j, from = std::max<int64_t>(0, p - last) * G;
        const int64_t to = a.sliding_window > 0 ? std::min(R, (p - last + a.sliding_window) * G) : R;
        float* s = scores.data() + j * Rp;
        std::fill(s, s + from, -INFINITY);
        std::fill(s + std::max(from, to), s + Rp, -INFINITY);
      }
      totals.resize(Rp);
      softmax_lanes(scores.data(), L, Rp, totals.data());
      sums.resize(R * Vp);
      add_value_rows(scores.data(), L, R, Rp, values.data(), Vp, sums.data());
      for (int64_t r = 0; r < R; ++r) {
        Q* to = (Q*)a.out + ((t0 + r / G) * a.H + kv * G + r % G) * D;
        const __m512 inverse = _mm512_set1_ps(1 / totals[r]);
        for (int64_t d = 0; d < D; d += 16)
          store(to + d, _mm512_mul_ps(_mm512_loadu_ps(sums.data() + r * Vp + d), inverse), lanes(D - d));
      }
    }
  }
}

// Every sequence's queries fit its context, its context its table, and every block read lies in the
// cache: checked before the parallel loop, which cannot raise.
void check_prefill_tables(const PrefillArgs& a, int64_t T) {
  STD_TORCH_CHECK(a.query_starts[0] == 0 && a.query_starts[a.n] == T, "prefill_attention: query_starts runs from ",
                  a.query_starts[0], " to ", a.query_starts[a.n], ", not from 0 to q's ", T, " tokens");
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t queries = a.query_starts[i + 1] - a.query_starts[i], ctx = a.context_lens[i];
    const int64_t table_end = a.max_blocks * a.block_size;
    STD_TORCH_CHECK(queries >= 0 && queries <= ctx && ctx <= table_end, "prefill_attention: sequence ", i, " has ",
                    queries, " queries and context length ", ctx, ", not 0 <= queries <= context <= the ", table_end,
                    " positions its block table holds");
    if (queries > 0)
      check_blocks("prefill_attention", a.block_tables + i * a.max_blocks, i,
                   first_seen(ctx - queries, a.sliding_window), ctx, a.block_size, a.num_blocks);
  }
}

bool long_vector(const Tensor& t, int64_t size) {
  return t.dim() == 1 && t.is_contiguous() && t.scalar_type() == ScalarType::Long && t.size(0) == size;
}

Tensor prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_starts,
                         Tensor context_lens, double scale, int64_t sliding_window) {
  check_operands("prefill_attention", q, k_cache, v_cache, block_tables, sliding_window);
  const int64_t n = block_tables.size(0), T = q.size(0), H = q.size(1), D = q.size(2);
  STD_TORCH_CHECK(long_vector(query_starts, n + 1) && long_vector(context_lens, n), "prefill_attention needs ",
                  "contiguous int64 query_starts (n + 1,) and context_lens (n,) for the block tables' n sequences");
  Tensor out = torch::stable::new_empty(q, {T, H, D});
  const PrefillArgs a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), q.strides()[0],
                      (const int64_t*)block_tables.data_ptr(), (const int64_t*)query_starts.data_ptr(),
                      (const int64_t*)context_lens.data_ptr(), out.data_ptr(), n, H, k_cache.size(0), D,
                      k_cache.size(1), k_cache.size(2), block_tables.size(1), sliding_window, (float)scale};
  check_prefill_tables(a, T);
  if (T == 0 || H == 0) return out;
  by_dtypes(q, k_cache, [&](auto q_type, auto cache_type) {
    prefill<decltype(q_type), decltype(cache_type)>(a, torch::stable::get_num_threads());
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(slimserve, CPU, m) {
  m.impl("decode_attention", TORCH_BOX(&decode_attention));
  m.impl("prefill_attention", TORCH_BOX(&prefill_attention));
}
