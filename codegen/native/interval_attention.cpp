// sparsec's native CPU attention kernels: for patterns whose kept keys, row by row, are a few
// intervals (bands, windows, sinks, column runs), for block-sparse layouts (key runs per query
// tile), and for vertical-slash patterns (gathered columns, slashes key by key). codegen/native_build.py builds this file; codegen/attention_cpu_native.py calls it.
//
// Row i of a query head keeps keys lo[p][i] .. hi[p][i] (inclusive) of every piece p. The pieces
// are disjoint in every row, and each piece's bounds never decrease from one row to the next, so
// a tile of rows [a, a + R) keeps all of [lo[p][a + R - 1], hi[p][a]] (its "middle") and only
// the keys left and right of it need the element mask. For each (batch, query head, tile of
// block_m rows) the kernel runs flash attention over exactly the keys the tile's rows need:
// the middle in chunks of block_n keys for all block_m rows, unmasked; each edge per sub-tile
// of sub_m rows, so a row computes at most sub_m - 1 keys it does not keep on either side.
// Scores and products are MKL/BLAS sgemm calls (the sgemm_ torch links), the online softmax is
// vectorized here. fp32 throughout; a row that keeps no key returns 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Row-major C[M, N] = alpha * A[M, K] B[N, K]^T (BLAS is column-major: C^T = alpha * B A^T).
void scores(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float* C) {
  const float zero = 0.0f;
  sgemm_("T", "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &zero, C, &N);
}

// Row-major C[M, N] += A[M, K] B[K, N].
void accumulate(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  const float one = 1.0f;
  sgemm_("N", "N", &N, &M, &K, &one, B, &ldb, A, &lda, &one, C, &ldc);
}

// 16 floats as one value: GCC / Clang lower it to the widest vectors the target has.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline v16 load(const float* p) { v16 x; std::memcpy(&x, p, sizeof x); return x; }
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
inline v16 splat(float a) { return v16{} + a; }
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

// exp(x) for x <= 0 (scores less their row maximum), to ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by its degree-7 Taylor-like minimax polynomial (Cephes expf), times 2^n built in the
// exponent bits. Below -87 (where expf leaves the normal range) the result is ~1e-38, not 0:
// such a weight is below float resolution against the row's maximum, whose weight is 1.
inline v16 exp_nonpositive(v16 x) {
  x = vmax(x, splat(-87.0f));
  v16 t = x * 1.44269504088896341f;
  v16 n = __builtin_convertvector(__builtin_convertvector(t - 0.5f, vi16), v16);  // round(t): t <= 0
  v16 r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

float row_max(const float* s, int n) {
  v16 m = splat(-INFINITY);
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) m = vmax(m, load(s + j));
  float best = -INFINITY;
  for (int l = 0; l < kLanes; ++l) best = std::max(best, m[l]);
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
}

// s[j] = exp(s[j] - m); returns the sum.
float exp_sum(float* s, int n, float m) {
  v16 total{}, shift = splat(m);
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    v16 e = exp_nonpositive(load(s + j) - shift);
    store(s + j, e);
    total += e;
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += total[l];
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

struct Tile {  // one query tile of one head: operands and its rows' online-softmax state
  const float* q;  // the tile's first row
  const float* k;
  const float* v;
  int D, Dv;
  float scale;
  float* max;   // (rows)
  float* sum;   // (rows)
  float* acc;   // (rows, Dv)
  float* s;     // (rows, block_n) scratch
};

// Folds scores s[0 .. n) of row `row` into its online softmax: s becomes their weights exp(s - max)
// at the row's new maximum; the row's sum and accumulated output are rescaled to it.
void fold_row(Tile& t, int row, float* s, int n) {
  const float old_max = t.max[row];
  const float new_max = std::max(old_max, row_max(s, n));
  const float kept = exp_sum(s, n, new_max);
  if (old_max != -INFINITY && old_max != new_max) {
    const float c = std::exp(old_max - new_max);
    t.sum[row] *= c;
    float* o = t.acc + (int64_t)row * t.Dv;
    for (int d = 0; d < t.Dv; ++d) o[d] *= c;
  }
  t.sum[row] += kept;
  t.max[row] = new_max;
}

// Rows [r0, r0 + R) of the tile against keys [k0, k0 + C). masked: row r keeps only
// [lo[r], hi[r]] of them (lo / hi relative to the tile's first row).
void attend(Tile& t, int r0, int R, int k0, int C, const int32_t* lo, const int32_t* hi, bool masked) {
  scores(R, C, t.D, t.scale, t.q + (int64_t)r0 * t.D, t.D, t.k + (int64_t)k0 * t.D, t.D, t.s);
  for (int r = 0; r < R; ++r) {
    float* s = t.s + (int64_t)r * C;
    int a = 0, b = C;
    if (masked) {
      a = std::max(0, lo[r0 + r] - k0);
      b = std::min(C, hi[r0 + r] + 1 - k0);
      if (b <= a) {
        std::fill(s, s + C, 0.0f);
        continue;
      }
      std::fill(s, s + a, 0.0f);
      std::fill(s + b, s + C, 0.0f);
    }
    fold_row(t, r0 + r, s + a, b - a);
  }
  accumulate(R, t.Dv, C, t.s, C, t.v + (int64_t)k0 * t.Dv, t.Dv, t.acc + (int64_t)r0 * t.Dv, t.Dv);
}

void attend_range(Tile& t, int r0, int R, int k0, int k1, const int32_t* lo, const int32_t* hi, bool masked,
                  int block_n) {
  for (int c = k0; c < k1; c += block_n) attend(t, r0, R, c, std::min(block_n, k1 - c), lo, hi, masked);
}

// One piece for a tile of R rows (lo / hi: the piece's bounds from the tile's first row).
void attend_piece(Tile& t, int R, const int32_t* lo, const int32_t* hi, int sub_m, int block_n) {
  const int mid0 = lo[R - 1], mid1 = hi[0] + 1;  // kept by every row of the tile
  const bool middle = mid1 - mid0 >= sub_m;
  for (int s0 = 0; s0 < R; s0 += sub_m) {
    const int n = std::min(sub_m, R - s0);
    if (middle) {
      attend_range(t, s0, n, lo[s0], mid0, lo, hi, true, block_n);
      attend_range(t, s0, n, mid1, hi[s0 + n - 1] + 1, lo, hi, true, block_n);
    } else {  // from the sub-tile's first kept key to its last (ends never decrease)
      int first = s0, last = s0 + n - 1;
      while (first <= last && hi[first] < lo[first]) ++first;
      while (last >= first && hi[last] < lo[last]) --last;
      if (first <= last) attend_range(t, s0, n, lo[first], hi[last] + 1, lo, hi, true, block_n);
    }
  }
  if (middle) attend_range(t, 0, R, mid0, mid1, lo, hi, false, block_n);
}

// Row `row` of the tile against keys j = i + offsets[n] (i its query index) that the causal limit
// allows and that are not columns (is_column[j]: those are read with the gathered columns): their
// K and V rows read one by one, the scores folded into the row's online softmax. For a few keys a
// row, where tiles would compute a block of keys per row kept.
void attend_slashes(Tile& t, int row, int64_t i, const int32_t* offsets, int64_t count, int64_t limit,
                    const uint8_t* is_column, float* scores, int32_t* keys) {
  const float* q = t.q + (int64_t)row * t.D;
  int n = 0;
  for (int64_t o = 0; o < count; ++o) {
    const int64_t j = i + offsets[o];
    if (j < 0 || j > limit || is_column[j]) continue;
    const float* k = t.k + j * t.D;
    v16 dot{};
    int d = 0;
    for (; d + kLanes <= t.D; d += kLanes) dot += load(q + d) * load(k + d);
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += dot[l];
    for (; d < t.D; ++d) s += q[d] * k[d];
    scores[n] = s * t.scale;
    keys[n++] = (int32_t)j;
  }
  if (n == 0) return;
  fold_row(t, row, scores, n);
  float* acc = t.acc + (int64_t)row * t.Dv;
  for (int m = 0; m < n; ++m) {
    const float* v = t.v + (int64_t)keys[m] * t.Dv;
    const float p = scores[m];
    for (int d = 0; d < t.Dv; ++d) acc[d] += p * v[d];
  }
}

struct Problem {  // the tensors and shapes the entry points share
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t B, Hq, Hkv, Sq, Sk, D, Dv;
  const int32_t* q_heads;
  int64_t num_heads;
  float scale;

  bool valid() const {
    return B >= 1 && Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0 && Sq >= 1 && Sk >= 1 && D >= 1 && Dv >= 1 &&
           num_heads >= 1 && Sq <= INT32_MAX && Sk <= INT32_MAX && D <= INT32_MAX && Dv <= INT32_MAX;
  }
};

// Runs body(tile state, tile index, first row, rows, kv) for every (batch, listed head, query tile
// of block_m rows) on `threads` threads (kv: the head's (batch, kv head) row of K and V), then
// writes each row's output (0 for a row that kept no key).
template <typename Body>
void for_each_tile(const Problem& p, int64_t block_m, int64_t block_n, int64_t threads, Body body) {
  const int64_t group = p.Hq / p.Hkv, tiles = (p.Sq + block_m - 1) / block_m;
  const int64_t jobs = p.B * p.num_heads * tiles;
#pragma omp parallel num_threads((int)threads)
  {
    std::vector<float> max(block_m), sum(block_m), acc(block_m * p.Dv), s(block_m * block_n);
#pragma omp for schedule(dynamic)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t tile = job % tiles, bh = job / tiles, b = bh / p.num_heads, h = p.q_heads[bh % p.num_heads];
      const int64_t a = tile * block_m;
      const int R = (int)std::min<int64_t>(block_m, p.Sq - a);
      const int64_t kv = b * p.Hkv + h / group;
      Tile t{p.q + ((b * p.Hq + h) * p.Sq + a) * p.D, p.k + kv * p.Sk * p.D, p.v + kv * p.Sk * p.Dv, (int)p.D,
             (int)p.Dv, p.scale, max.data(), sum.data(), acc.data(), s.data()};
      std::fill(max.begin(), max.begin() + R, -INFINITY);
      std::fill(sum.begin(), sum.begin() + R, 0.0f);
      std::fill(acc.begin(), acc.begin() + (int64_t)R * p.Dv, 0.0f);
      body(t, tile, a, R, kv);
      float* o = p.out + ((b * p.Hq + h) * p.Sq + a) * p.Dv;
      for (int r = 0; r < R; ++r) {
        const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
        for (int64_t d = 0; d < p.Dv; ++d) o[r * p.Dv + d] = acc[r * p.Dv + d] * inv;
      }
    }
  }
}

}  // namespace

// Pieces of key intervals a row (module comment). Returns 0, or 1 when an argument is out of range
// (nothing is written then).
extern "C" int sparsec_interval_attention(
    const float* q, const float* k, const float* v, float* out,
    int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, int64_t Dv,
    const int32_t* q_heads, int64_t num_heads, const int32_t* lo, const int32_t* hi, int64_t pieces,
    float scale, int64_t block_m, int64_t sub_m, int64_t block_n, int64_t threads) {
  const Problem p{q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, q_heads, num_heads, scale};
  if (!p.valid() || pieces < 0 || block_m < 1 || sub_m < 1 || sub_m > block_m || block_n < 1 || threads < 1)
    return 1;
  for_each_tile(p, block_m, block_n, threads, [&](Tile& t, int64_t, int64_t a, int R, int64_t) {
    for (int64_t piece = 0; piece < pieces; ++piece)
      attend_piece(t, R, lo + piece * Sq + a, hi + piece * Sq + a, (int)sub_m, (int)block_n);
  });
  return 0;
}

// Key runs a query tile: every row of tile `i` (rows i * block_m ...) keeps keys run_lo[r] ..
// run_hi[r] (inclusive) of runs r = run_ptr[i] .. run_ptr[i + 1] - 1, except those past its own
// limit row_hi[row] (the causal rule; Sk - 1 without it), non-decreasing over rows: a block-sparse
// layout at its block size. A run's chunks past the tile's first row's limit run under the mask.
extern "C" int sparsec_block_runs_attention(
    const float* q, const float* k, const float* v, float* out,
    int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, int64_t Dv,
    const int32_t* q_heads, int64_t num_heads, const int64_t* run_ptr, const int32_t* run_lo,
    const int32_t* run_hi, const int32_t* row_hi, float scale, int64_t block_m, int64_t block_n,
    int64_t threads) {
  const Problem p{q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, q_heads, num_heads, scale};
  if (!p.valid() || block_m < 1 || block_n < 1 || threads < 1) return 1;
  const std::vector<int32_t> zeros(Sq, 0);  // rows keep every key of a run up to their limit
  for_each_tile(p, block_m, block_n, threads, [&](Tile& t, int64_t tile, int64_t a, int R, int64_t) {
    const int32_t* lo = zeros.data() + a;
    const int32_t* hi = row_hi + a;
    for (int64_t r = run_ptr[tile]; r < run_ptr[tile + 1]; ++r) {
      const int k1 = std::min(run_hi[r], hi[R - 1]) + 1;  // no row of the tile reads past this
      for (int c = run_lo[r]; c < k1; c += (int)block_n) {
        const int C = std::min((int)block_n, k1 - c);
        attend(t, 0, R, c, C, lo, hi, c + C - 1 > hi[0]);
      }
    }
  });
  return 0;
}

// Columns and slashes (MInference's vertical-slash): row i keeps the gathered columns kc / vc
// (B, Hkv, columns, D), their first count[i] (those the causal limit allows: non-decreasing),
// computed as a piece of the interval kernel over them; and keys i + offsets[n] up to row_hi[i]
// that are not columns (attend_slashes). Tiles of block_m rows, edges per sub_m rows.
extern "C" int sparsec_column_slash_attention(
    const float* q, const float* k, const float* v, float* out,
    int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, int64_t Dv,
    const int32_t* q_heads, int64_t num_heads, const float* kc, const float* vc, int64_t columns,
    const int32_t* count, const int32_t* offsets, int64_t num_offsets, const int32_t* row_hi,
    const uint8_t* is_column, float scale, int64_t block_m, int64_t sub_m, int64_t block_n, int64_t threads) {
  const Problem p{q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, q_heads, num_heads, scale};
  if (!p.valid() || columns < 0 || num_offsets < 0 || block_m < 1 || sub_m < 1 || sub_m > block_m ||
      block_n < 1 || threads < 1)
    return 1;
  std::vector<int32_t> zeros(Sq, 0), last(Sq);
  for (int64_t i = 0; i < Sq; ++i) last[i] = count[i] - 1;
  for_each_tile(p, block_m, block_n, threads, [&](Tile& t, int64_t, int64_t a, int R, int64_t kv) {
    thread_local std::vector<float> scores;
    thread_local std::vector<int32_t> keys;
    scores.resize(num_offsets + 1);
    keys.resize(num_offsets + 1);
    if (columns > 0) {
      Tile c = t;
      c.k = kc + kv * columns * D;
      c.v = vc + kv * columns * Dv;
      attend_piece(c, R, zeros.data() + a, last.data() + a, (int)sub_m, (int)block_n);
    }
    for (int r = 0; r < R; ++r)
      attend_slashes(t, r, a + r, offsets, num_offsets, row_hi[a + r], is_column, scores.data(), keys.data());
  });
  return 0;
}
