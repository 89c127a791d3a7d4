// sparsec's native CPU attention kernels: for patterns whose kept keys, row by row, are a few
// intervals (bands, windows, sinks, column runs), for block-sparse layouts (key runs per query
// tile), and for vertical-slash patterns (gathered columns; slashes 16 rows at a time).
// codegen/native_build.py builds this file; codegen/attention_cpu_native.py calls it.
//
// Row i of a query head keeps keys lo[p][i] .. hi[p][i] (inclusive) of every piece p. The pieces
// are disjoint in every row, and each piece's bounds never decrease from one row to the next, so
// a tile of rows [a, a + R) keeps all of [lo[p][a + R - 1], hi[p][a]] (its "middle") and only
// the keys left and right of it need the element mask. For each (batch, query head, tile of
// block_m rows) the kernel runs flash attention over exactly the keys the tile's rows need:
// the middle in chunks of block_n keys for all block_m rows, unmasked; each edge per sub-tile
// of sub_m rows, so a row computes at most sub_m - 1 keys it does not keep on either side.
// Consecutive pieces may run as a group: per sub-tile, one pass over all the keys any of them keeps
// there, under their mask (attend_group), for pieces of short runs near one another.
// Scores and products are MKL/BLAS sgemm calls (the sgemm_ torch links), the online softmax is
// vectorized here. fp32 throughout; a row that keeps no key returns 0.
//
// softcap > 0 caps the logits (Gemma 2's attention-logit soft-capping): every score s = scale q.k
// the kernels compute becomes softcap * tanh(s / softcap), in (-softcap, softcap), before the mask
// and the online softmax see it; softcap = 0 leaves the scores (and the work) as they are.
//
// sinks (GPT-OSS's attention sinks; null: none) holds a logit z_h per query head h: one more term of
// every row's softmax that takes probability mass but has no value, out_i = sum_j exp(s_ij) v_j /
// (sum_j exp(s_ij) + exp(z_h)) over the keys the row keeps (never capped). It costs nothing in the
// loops: a row's online softmax starts from the sink (max z_h, sum exp(z_h - z_h) = 1, output 0)
// instead of from nothing (max -inf, sum 0), so a row that keeps no key still returns 0. z_h = -inf
// is no sink for head h (the state starts from nothing, as without sinks).
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

// tanh(x), to ~1e-7 relative. |x| >= 0.625: (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.29 (no
// cancellation; e underflows to ~1e-38 past |x| ~ 43, giving 1); below, where 1 - e would lose
// the digits of a small x, Cephes tanhf's odd polynomial x + x^3 P(x^2). The sign is x's.
inline v16 vtanh(v16 x) {
  const v16 a = x < 0.0f ? -x : x;
  const v16 e = exp_nonpositive(-2.0f * a);
  const v16 by_exp = (1.0f - e) / (1.0f + e);
  const v16 z = a * a;
  v16 p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const v16 by_poly = p * z * a + a;
  const v16 t = a < 0.625f ? by_poly : by_exp;
  return x < 0.0f ? -t : t;
}

// Logit soft-capping: cap * tanh(x / cap), every lane.
inline v16 soft_cap(v16 x, float cap) { return cap * vtanh(x * (1.0f / cap)); }

// s[j] = cap * tanh(s[j] / cap) for j in [0, n): the scores a row keeps, capped before its mask
// (a masked key's -inf must stay -inf) and its softmax.
void soft_cap(float* s, int n, float cap) {
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) store(s + j, soft_cap(load(s + j), cap));
  for (; j < n; ++j) s[j] = cap * std::tanh(s[j] / cap);
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
  float softcap;  // > 0: scores capped to softcap * tanh(score / softcap); 0: as they are
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

// Row `row`'s scores s[0 .. C) of which it keeps [a, b): folded into its online softmax (fold_row),
// the rest zeroed (no weight in the products); all zeroed when it keeps none. Scores in [a, b)
// are capped (t.softcap) by the caller, before it masks any of them.
void fold_span(Tile& t, int row, float* s, int C, int a, int b) {
  if (b <= a) {
    std::fill(s, s + C, 0.0f);
    return;
  }
  std::fill(s, s + a, 0.0f);
  std::fill(s + b, s + C, 0.0f);
  fold_row(t, row, s + a, b - a);
}

// Caps a row's scores s[a, b) when the tile soft-caps (only those it may keep: the rest get no weight).
inline void cap_span(const Tile& t, float* s, int a, int b) {
  if (t.softcap > 0.0f && b > a) soft_cap(s + a, b - a, t.softcap);
}

// Rows [r0, r0 + R) of the tile against keys [k0, k0 + C). masked: row r keeps only
// [lo[r], hi[r]] of them (lo / hi relative to the tile's first row).
void attend(Tile& t, int r0, int R, int k0, int C, const int32_t* lo, const int32_t* hi, bool masked) {
  scores(R, C, t.D, t.scale, t.q + (int64_t)r0 * t.D, t.D, t.k + (int64_t)k0 * t.D, t.D, t.s);
  for (int r = 0; r < R; ++r) {
    const int a = masked ? std::max(0, lo[r0 + r] - k0) : 0;
    const int b = masked ? std::min(C, hi[r0 + r] + 1 - k0) : C;
    cap_span(t, t.s + (int64_t)r * C, a, b);
    fold_span(t, r0 + r, t.s + (int64_t)r * C, C, a, b);
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

// Rows [r0, r0 + R) of the tile against keys [k0, k0 + C), row r keeping only its keys in the m
// pieces lo[p * stride + r] .. hi[p * stride + r] (disjoint; relative to the tile's first row).
// keep: C bytes of scratch.
void attend_group_chunk(Tile& t, int r0, int R, int k0, int C, const int32_t* lo, const int32_t* hi, int64_t stride,
                        int m, uint8_t* keep) {
  scores(R, C, t.D, t.scale, t.q + (int64_t)r0 * t.D, t.D, t.k + (int64_t)k0 * t.D, t.D, t.s);
  for (int r = 0; r < R; ++r) {
    float* s = t.s + (int64_t)r * C;
    int a = C, b = 0;
    std::fill(keep, keep + C, 0);
    for (int p = 0; p < m; ++p) {
      const int pa = std::max(0, lo[p * stride + r0 + r] - k0), pb = std::min(C, hi[p * stride + r0 + r] + 1 - k0);
      if (pb <= pa) continue;
      std::fill(keep + pa, keep + pb, 1);
      a = std::min(a, pa);
      b = std::max(b, pb);
    }
    cap_span(t, s, a, b);
    for (int j = a; j < b; ++j)
      if (!keep[j]) s[j] = -INFINITY;  // out of the row's pieces: no weight (zeroed below)
    fold_span(t, r0 + r, s, C, a, b);
    for (int j = a; j < b; ++j)
      if (!keep[j]) s[j] = 0.0f;
  }
  accumulate(R, t.Dv, C, t.s, C, t.v + (int64_t)k0 * t.Dv, t.Dv, t.acc + (int64_t)r0 * t.Dv, t.Dv);
}

// A group of m pieces for a tile of R rows (lo / hi: the first piece's bounds from the tile's first
// row; piece p at p * stride): per sub-tile of sub_m rows, every key from the first any of its rows
// keeps in any piece to the last, under the pieces' mask. For pieces that keep short runs near one
// another (a frame-transposed head's offsets that wrap into the neighbouring frame: codegen/
// frame_coverage.py), one pass over their span instead of one a piece.
void attend_group(Tile& t, int R, const int32_t* lo, const int32_t* hi, int64_t stride, int m, int sub_m,
                  int block_n, uint8_t* keep) {
  for (int s0 = 0; s0 < R; s0 += sub_m) {
    const int n = std::min(sub_m, R - s0);
    int first = INT32_MAX, last = -1;
    for (int p = 0; p < m; ++p)
      for (int r = s0; r < s0 + n; ++r) {
        const int32_t l = lo[p * stride + r], h = hi[p * stride + r];
        if (h < l) continue;
        first = std::min(first, (int)l);
        last = std::max(last, (int)h);
      }
    for (int c = first; c <= last; c += block_n)
      attend_group_chunk(t, s0, n, c, std::min(block_n, last + 1 - c), lo, hi, stride, m, keep);
  }
}

// Lane l of the result: the sum of the 16 lanes of r[bit_reversed(l)] (a transposing tree of
// shuffles and adds: 16 horizontal sums for the price of about two).
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi16{__VA_ARGS__})
#endif
inline v16 halves8(v16 a, v16 b) {
  return SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline v16 halves4(v16 a, v16 b) {
  return SHUFFLE(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         SHUFFLE(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline v16 halves2(v16 a, v16 b) {
  return SHUFFLE(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         SHUFFLE(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline v16 halves1(v16 a, v16 b) {
  return SHUFFLE(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         SHUFFLE(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
#undef SHUFFLE
constexpr int kBitReversed[kLanes] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

inline v16 lane_sums(const v16* r) {
  v16 x[8], y[4];
  for (int i = 0; i < 8; ++i) x[i] = halves8(r[2 * i], r[2 * i + 1]);
  for (int i = 0; i < 4; ++i) y[i] = halves4(x[2 * i], x[2 * i + 1]);
  return halves1(halves2(y[0], y[1]), halves2(y[2], y[3]));
}

// Per-lane products of q[0 .. D) and k[0 .. D) summed over 16-lane chunks (lane_sums finishes
// the dot product); the tail past the last whole chunk is added into lane 0.
inline v16 row_products(const float* q, const float* k, int D) {
  v16 a{}, b{};
  int d = 0;
  for (; d + 2 * kLanes <= D; d += 2 * kLanes) {
    a += load(q + d) * load(k + d);
    b += load(q + d + kLanes) * load(k + d + kLanes);
  }
  for (; d + kLanes <= D; d += kLanes) a += load(q + d) * load(k + d);
  for (; d < D; ++d) a[0] += q[d] * k[d];
  return a + b;
}

constexpr int kChunk = 8;  // 16-lane accumulators weighted_rows keeps in registers

// out[0 .. C * kLanes) = sum over slashes s of p[s * kLanes] * v[first[s] * ld ...] (p: one lane
// of the scores; a zero weight, a masked lane, is skipped: its key may lie outside V).
template <int C>
void weighted_rows(const float* p, const int64_t* first, int count, const float* v, int64_t ld, float* out) {
  v16 a[C] = {};
  for (int s = 0; s < count; ++s) {
    const float w = p[s * kLanes];
    if (w == 0.0f) continue;
    const float* row = v + first[s] * ld;
    const v16 ws = splat(w);
    for (int c = 0; c < C; ++c) a[c] += ws * load(row + c * kLanes);
  }
  for (int c = 0; c < C; ++c) store(out + c * kLanes, a[c]);
}

// The same for `width` values (no more than kChunk * kLanes), any width (multiples of 16 in registers).
void weighted_rows(const float* p, const int64_t* first, int count, const float* v, int64_t ld, int width,
                   float* out) {
  switch (width) {
    case 1 * kLanes: return weighted_rows<1>(p, first, count, v, ld, out);
    case 2 * kLanes: return weighted_rows<2>(p, first, count, v, ld, out);
    case 3 * kLanes: return weighted_rows<3>(p, first, count, v, ld, out);
    case 4 * kLanes: return weighted_rows<4>(p, first, count, v, ld, out);
    case 5 * kLanes: return weighted_rows<5>(p, first, count, v, ld, out);
    case 6 * kLanes: return weighted_rows<6>(p, first, count, v, ld, out);
    case 7 * kLanes: return weighted_rows<7>(p, first, count, v, ld, out);
    case 8 * kLanes: return weighted_rows<8>(p, first, count, v, ld, out);
  }
  std::fill(out, out + width, 0.0f);
  for (int s = 0; s < count; ++s) {
    const float w = p[s * kLanes];
    if (w == 0.0f) continue;
    const float* row = v + first[s] * ld;
    for (int d = 0; d < width; ++d) out[d] += w * row[d];
  }
}

// A vertical-slash's slashes (offsets o: row i keeps key i + o), kLanes rows at a time: rows
// i0 .. i0 + 15 of a slash keep the consecutive keys i0 + o .. i0 + o + 15, 16 rows of K and of V
// that lie together in memory. Their 16 scores are one vector (lane_sums of the rows' products),
// the online softmax runs on all 16 rows at once, and the products go row by row into the
// group's accumulators. skip (Sk + 2 kLanes flags, key j at j + kLanes): 1 for a column (read
// with the gathered columns) and for the padding either side.
struct Slashes {
  const uint8_t* skip;
  const int32_t* offsets;  // sorted
  int64_t count;
  const int32_t* row_hi;   // each row's causal limit (Sk - 1 without it)
  int64_t Sk;
};

struct SlashScratch {  // one thread's buffers for attend_slash_group
  std::vector<float> q, scores, acc;
  std::vector<int64_t> first;
  void size(int64_t D, int64_t Dv, int64_t count) {
    q.resize(D * kLanes);
    acc.resize(Dv * kLanes);
    scores.resize(count * kLanes);
    first.resize(count);
  }
};

typedef uint8_t vu16 __attribute__((vector_size(16)));

// Rows g0 .. g0 + n - 1 of the tile (n <= kLanes; absolute rows i0 ...) against every slash.
void attend_slash_group(Tile& t, int g0, int n, int64_t i0, const Slashes& sl, SlashScratch& w) {
  const int64_t hi_max = sl.row_hi[i0 + n - 1];  // limits never decrease
  if (hi_max < 0) return;
  const int D = t.D, Dv = t.Dv;
  float* q = w.q.data();  // the rows, scaled; rows past n read 0
  for (int m = 0; m < kLanes; ++m)
    for (int d = 0; d < D; ++d) q[m * D + d] = m < n ? t.q[(int64_t)(g0 + m) * D + d] * t.scale : 0.0f;
  vi16 lane, limit;
  for (int m = 0; m < kLanes; ++m) {
    lane[m] = m;
    limit[m] = m < n ? sl.row_hi[i0 + m] : -1;
  }
  int used = 0;
  v16 dots[kLanes];
  for (int64_t s = 0; s < sl.count; ++s) {
    const int64_t j0 = i0 + sl.offsets[s];  // lane m's key: j0 + m
    if (j0 <= -kLanes || j0 >= sl.Sk || j0 > hi_max) continue;
    vu16 flags;
    std::memcpy(&flags, sl.skip + j0 + kLanes, sizeof flags);
    const vi16 keep = (__builtin_convertvector(flags, vi16) == 0) & (lane + (int32_t)j0 <= limit);
    bool any = false;
    for (int m = 0; m < kLanes; ++m) any |= keep[m] != 0;
    if (!any) continue;
    for (int p = 0; p < kLanes; ++p) {
      const int m = kBitReversed[p];
      const float* k = t.k + std::min(std::max<int64_t>(j0 + m, 0), sl.Sk - 1) * D;  // a masked lane reads a real row
      dots[p] = row_products(q + m * D, k, D);
    }
    v16 x = lane_sums(dots);
    if (t.softcap > 0.0f) x = soft_cap(x, t.softcap);  // before the mask, as everywhere
    store(w.scores.data() + used * kLanes, keep ? x : splat(-INFINITY));
    w.first[used++] = j0;
  }
  if (used == 0) return;
  // The online softmax, every lane (row) at once: fold the slashes' scores in at the new maxima.
  v16 old_max = splat(-INFINITY), old_sum{}, top = splat(-INFINITY);
  for (int m = 0; m < n; ++m) {
    old_max[m] = t.max[g0 + m];
    old_sum[m] = t.sum[g0 + m];
  }
  for (int s = 0; s < used; ++s) top = vmax(top, load(w.scores.data() + s * kLanes));
  const v16 new_max = vmax(old_max, top), none = splat(-INFINITY);
  const v16 shift = new_max > none ? new_max : splat(0.0f);
  v16 total{};
  for (int s = 0; s < used; ++s) {
    float* p = w.scores.data() + s * kLanes;
    const v16 x = load(p);
    const v16 e = x > none ? exp_nonpositive(x - shift) : splat(0.0f);  // a masked lane weighs exactly 0
    store(p, e);
    total += e;
  }
  const v16 rescale = old_max > none ? exp_nonpositive(old_max - shift) : splat(0.0f);
  // Products, row by row, its accumulators in registers a head dim's 16 lanes at a time.
  float* acc = w.acc.data();
  for (int m = 0; m < n; ++m)
    for (int d0 = 0; d0 < Dv; d0 += kChunk * kLanes)
      weighted_rows(w.scores.data() + m, w.first.data(), used, t.v + (int64_t)m * Dv + d0, Dv,
                    std::min(kChunk * kLanes, Dv - d0), acc + m * Dv + d0);
  for (int m = 0; m < n; ++m) {
    float* o = t.acc + (int64_t)(g0 + m) * Dv;
    const float c = rescale[m];
    for (int d = 0; d < Dv; ++d) o[d] = o[d] * c + acc[m * Dv + d];
    t.sum[g0 + m] = old_sum[m] * c + total[m];
    t.max[g0 + m] = new_max[m];
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
  float softcap;  // 0 or finite > 0
  const float* sinks;  // null, or Hq logits (module comment): finite or -inf (that head's sink is off)

  bool valid() const {
    return B >= 1 && Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0 && Sq >= 1 && Sk >= 1 && D >= 1 && Dv >= 1 &&
           num_heads >= 1 && Sq <= INT32_MAX && Sk <= INT32_MAX && D <= INT32_MAX && Dv <= INT32_MAX &&
           softcap >= 0.0f && softcap < INFINITY &&  // false for NaN too
           sinks_valid();
  }

  bool sinks_valid() const {  // no +inf or NaN sink (either would leave every row of its head NaN)
    for (int64_t h = 0; sinks != nullptr && h < Hq; ++h)
      if (!(sinks[h] < INFINITY)) return false;
    return true;
  }

  // Query head h's sink logit: where its rows' online softmax starts (-inf: no sink).
  float sink(int64_t h) const { return sinks == nullptr ? -INFINITY : sinks[h]; }
};

// A tile's first R rows before any key: at the sink z (max z, its weight exp(z - z) = 1 in the sum,
// no output), or with no sink (z = -inf) at nothing (max -inf, sum 0). Either way a row that then
// keeps no key ends with output 0, and one that keeps some with sum > 0.
void start_rows(float* max, float* sum, float* acc, int R, int64_t Dv, float z) {
  std::fill(max, max + R, z);
  std::fill(sum, sum + R, z == -INFINITY ? 0.0f : 1.0f);
  std::fill(acc, acc + R * Dv, 0.0f);
}

// Runs body(tile state, tile index, first row, rows, kv) for every (batch, listed head, query tile
// of block_m rows) on `threads` threads (kv: the head's (batch, kv head) row of K and V), its rows
// started at the head's sink (start_rows), then writes each row's output acc / sum (0 for a row
// that kept no key: its acc is 0, its sum 1 with a sink and 0 without).
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
             (int)p.Dv, p.scale, p.softcap, max.data(), sum.data(), acc.data(), s.data()};
      start_rows(max.data(), sum.data(), acc.data(), R, p.Dv, p.sink(h));
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
// (nothing is written then). All three entry points: softcap 0 (scores as they are) or finite > 0
// (capped: module comment); sinks null (none) or Hq logits by query head, each finite or -inf (no
// sink for that head; +inf or NaN: refused), module comment.
// Pieces p of group g: group_ptr[g] <= p < group_ptr[g + 1] (groups of consecutive pieces, in
// order); a group of one piece runs as above, a larger one by attend_group.
extern "C" int sparsec_interval_attention(
    const float* q, const float* k, const float* v, float* out,
    int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, int64_t Dv,
    const int32_t* q_heads, int64_t num_heads, const int32_t* lo, const int32_t* hi, int64_t pieces,
    const int64_t* group_ptr, int64_t groups, float scale, float softcap, const float* sinks, int64_t block_m,
    int64_t sub_m, int64_t block_n, int64_t threads) {
  const Problem p{q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, q_heads, num_heads, scale, softcap, sinks};
  if (!p.valid() || pieces < 0 || groups < 0 || block_m < 1 || sub_m < 1 || sub_m > block_m || block_n < 1 ||
      threads < 1 || group_ptr[0] != 0 || group_ptr[groups] != pieces)
    return 1;
  for (int64_t g = 0; g < groups; ++g)
    if (group_ptr[g + 1] <= group_ptr[g]) return 1;
  for_each_tile(p, block_m, block_n, threads, [&](Tile& t, int64_t, int64_t a, int R, int64_t) {
    thread_local std::vector<uint8_t> keep;
    keep.resize(block_n);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = group_ptr[g], m = group_ptr[g + 1] - first;
      if (m == 1)
        attend_piece(t, R, lo + first * Sq + a, hi + first * Sq + a, (int)sub_m, (int)block_n);
      else
        attend_group(t, R, lo + first * Sq + a, hi + first * Sq + a, Sq, (int)m, (int)sub_m, (int)block_n,
                     keep.data());
    }
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
    const int32_t* run_hi, const int32_t* row_hi, float scale, float softcap, const float* sinks, int64_t block_m,
    int64_t block_n, int64_t threads) {
  const Problem p{q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, q_heads, num_heads, scale, softcap, sinks};
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
// computed as a piece of the interval kernel over them (tiles of block_m rows, edges per sub_m
// rows); and keys i + offsets[n] up to row_hi[i] that are not columns, kLanes rows at a time
// (attend_slash_group); skip (Sk + 2 kLanes): 1 for a column and for the padding.
extern "C" int sparsec_column_slash_attention(
    const float* q, const float* k, const float* v, float* out,
    int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, int64_t Dv,
    const int32_t* q_heads, int64_t num_heads, const float* kc, const float* vc, int64_t columns,
    const int32_t* count, const uint8_t* skip, const int32_t* offsets,
    int64_t num_offsets, const int32_t* row_hi, float scale, float softcap, const float* sinks, int64_t block_m,
    int64_t sub_m, int64_t block_n, int64_t threads) {
  const Problem p{q, k, v, out, B, Hq, Hkv, Sq, Sk, D, Dv, q_heads, num_heads, scale, softcap, sinks};
  if (!p.valid() || columns < 0 || num_offsets < 0 || block_m < 1 || sub_m < 1 || sub_m > block_m ||
      block_n < 1 || threads < 1)
    return 1;
  std::vector<int32_t> zeros(Sq, 0), last(Sq);
  for (int64_t i = 0; i < Sq; ++i) last[i] = count[i] - 1;
  for_each_tile(p, block_m, block_n, threads, [&](Tile& t, int64_t, int64_t a, int R, int64_t kv) {
    thread_local SlashScratch scratch;
    scratch.size(D, Dv, num_offsets);
    if (columns > 0) {
      Tile c = t;
      c.k = kc + kv * columns * D;
      c.v = vc + kv * columns * Dv;
      attend_piece(c, R, zeros.data() + a, last.data() + a, (int)sub_m, (int)block_n);
    }
    const Slashes slashes{skip, offsets, num_offsets, row_hi, Sk};
    for (int g = 0; g < R; g += kLanes)
      attend_slash_group(t, g, std::min(kLanes, R - g), a + g, slashes, scratch);
  });
  return 0;
}
