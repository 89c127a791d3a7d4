// sparsec's native CPU kernels for sparse linear layers, y = x @ W.T: W's zeros are skipped.
// codegen/native_build.py builds this file; codegen/linear_cpu_native.py packs the weights and
// calls it. x (T, K) and y (T, N) float32, row-major unless said otherwise; the weights float32, or
// bfloat16 (as their 16 bits) on masked rows and block rows; sums in float32.
//
// Sparse rows (N:M and unstructured weights), in two layouts, one for each kernel:
//   - masked (few tokens): the kept values row by row in column order (row o's from row_start[o]),
//     and a 16-bit mask per 16 inputs of a row saying which are kept. The values are expanded
//     into a 16-wide vector (AVX-512's expand load, or a loop) and multiplied with up to 8 tokens'
//     inputs at once, two rows at a time. It streams the values once and does the dense
//     arithmetic: for a few tokens a layer is bound by reading its weight.
//   - segments (more tokens): the inputs cut into segments of `seg` (<= 256) features; segment s
//     holds, row after row, each row's kept values there in column order (row o's from
//     offsets[s][o]), and per value its column inside the segment (one byte). x is copied into
//     token tiles, (K, width) for width <= 64 tokens, so an input's tokens are one contiguous
//     row; each kept value multiplies that row into its output row's accumulators: only kept
//     values cost arithmetic. A segment's rows of the tile (seg x 64 floats) stay in the core's
//     caches while every output row of the thread's share reads them. (Row-major values here, or
//     segment-major ones for the masked kernel, measured 2-3x slower: many short reads far apart.)
// Block rows (block-sparse weights): block row r's kept blocks side by side as one (bo, nnz_r * bi)
// panel (the layout codegen/linear_cpu.py's BLAS path uses); each output row is that panel's row
// against the inputs of its kept blocks, two rows and up to 8 tokens at a time.
// Masked rows and block rows take tokens 64 at a time (a tile of x stays in cache).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// 16 floats as one value: GCC / Clang lower it to the widest vectors the target has.
typedef float v16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
// Values ahead the masked kernel prefetches: near ones into L1, far ones into L2. The far ones keep
// enough lines in flight to stream from DRAM (A/B, alternating builds call by call on 24 weights of
// 5632 x 2048 2:4, 2 threads: 1.13-1.19x at 1-8 tokens in float32, 1.65x in bfloat16, whose near
// distance is only 2 KB; within 3% either way on a weight that stays in cache). The block-rows
// kernel prefetches each panel row kPrefetchFar values ahead (50% 64 x 64 blocks: 1.10x at 1 token,
// 1.31x at 4, 1.19x at 16, 0.98x at 64 where it computes more than it streams; bfloat16 1.37x).
constexpr int64_t kPrefetch = 1024;
constexpr int64_t kPrefetchFar = 4096;
constexpr int64_t kTile = 64;        // tokens a kernel computes at once (a tile of x)

inline v16 load(const float* p) { v16 x; std::memcpy(&x, p, sizeof x); return x; }
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
inline float sum(v16 a) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += a[i];
  return s;
}

// 64 bytes of 16 float32 lanes (a vector register's bits) as v16.
template <typename Bits>
inline v16 bits_as_v16(const Bits& bits) {
  static_assert(sizeof(Bits) == sizeof(v16), "16 float32 lanes");
  v16 r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// A weight as float32: float32 itself, or bfloat16 as its 16 bits (a float32 with the low 16
// mantissa bits zero).
inline float as_float(float value) { return value; }
inline float as_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// 16 consecutive weights as float32.
inline v16 load_values(const float* p) { return load(p); }
inline v16 load_values(const uint16_t* p) {
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u16x16 half;
  std::memcpy(&half, p, sizeof half);
  const u32x16 wide = __builtin_convertvector(half, u32x16) << 16;
  return bits_as_v16(wide);
}

// The 16 inputs' weights of a chunk whose kept positions are `mask`'s bits, from its kept values:
// an expand load where the target has one for the value type, else this loop.
template <typename Value>
inline v16 expand_loop(uint16_t mask, const Value* values) {
  v16 r{};
  for (int i = 0, k = 0; i < kLanes; ++i)
    if (mask >> i & 1) r[i] = as_float(values[k++]);
  return r;
}

inline v16 expand(uint16_t mask, const float* values) {
#ifdef __AVX512F__
  const __m512 w = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask), values);
  return bits_as_v16(w);
#else
  return expand_loop(mask, values);
#endif
}

inline v16 expand(uint16_t mask, const uint16_t* values) {
#if defined(__AVX512VBMI2__) && defined(__AVX512VL__)
  const __m256i half = _mm256_maskz_expandloadu_epi16(static_cast<__mmask16>(mask), values);
  const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
  return bits_as_v16(wide);
#else
  return expand_loop(mask, values);
#endif
}

// The accumulators of R output rows for TB tokens: sums of weights times inputs.
template <int TB, int R>
struct Sums {
  v16 acc[R][TB] = {};

  // Adds row r's 16 weights wv[r] times each token's 16 inputs from column `column` of x.
  void add(const v16 (&wv)[R], const float* x, int64_t ldx, int64_t column) {
    for (int j = 0; j < TB; ++j) {
      const v16 xv = load(x + j * ldx + column);
      for (int r = 0; r < R; ++r) acc[r][j] += wv[r] * xv;
    }
  }

  // y[t][o + r] for t < TB, r < R (y has N columns).
  void store(float* y, int64_t N, int64_t o) const {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < TB; ++j) y[j * N + o + r] = sum(acc[r][j]);
  }
};

// Thread `part` of `parts`'s share of rows [0, N): contiguous, in whole pairs (`unit` rows).
inline void share(int64_t N, int64_t unit, int64_t parts, int64_t part, int64_t& lo, int64_t& hi) {
  const int64_t units = (N + unit - 1) / unit;
  lo = std::min(N, unit * (units * part / parts));
  hi = std::min(N, unit * (units * (part + 1) / parts));
}

template <typename Value>    // float, or uint16_t: bfloat16's bits
struct MaskedRows {
  const Value* values;      // row by row
  const uint16_t* masks;    // (N, chunks)
  const int64_t* row_start; // (N + 1,)
  int64_t N, chunks;
};

// y[t][o + r] for r < R, t < TB: masked rows against TB tokens of x.
template <int TB, int R, typename Value>
void dot_rows(const MaskedRows<Value>& w, const float* x, int64_t ldx, int64_t o, float* y) {
  Sums<TB, R> sums;
  const Value* vp[R];
  const uint16_t* mp[R];
  for (int r = 0; r < R; ++r) {
    vp[r] = w.values + w.row_start[o + r];
    mp[r] = w.masks + (o + r) * w.chunks;
  }
  // Four chunks a step: their masks as one 64-bit word, so that the values pointer advances once
  // by its population count (one short dependency chain a step, not one a chunk).
  int64_t c = 0;
  for (; c + 4 <= w.chunks; c += 4) {
    uint64_t word[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(&word[r], mp[r] + c, sizeof word[r]);
      __builtin_prefetch(vp[r] + kPrefetch);
      __builtin_prefetch(vp[r] + kPrefetch + 64 / sizeof(Value));
      __builtin_prefetch(vp[r] + kPrefetchFar, 0, 2);
      __builtin_prefetch(vp[r] + kPrefetchFar + 64 / sizeof(Value), 0, 2);
    }
    for (int q = 0; q < 4; ++q) {
      v16 wv[R];
      for (int r = 0; r < R; ++r) {
        const uint64_t below = word[r] & ((uint64_t{1} << (16 * q)) - 1);
        wv[r] = expand(static_cast<uint16_t>(word[r] >> (16 * q)), vp[r] + __builtin_popcountll(below));
      }
      sums.add(wv, x, ldx, (c + q) * kLanes);
    }
    for (int r = 0; r < R; ++r) vp[r] += __builtin_popcountll(word[r]);
  }
  for (; c < w.chunks; ++c) {
    v16 wv[R];
    for (int r = 0; r < R; ++r) {
      const uint16_t m = mp[r][c];
      wv[r] = expand(m, vp[r]);
      vp[r] += __builtin_popcount(m);
    }
    sums.add(wv, x, ldx, c * kLanes);
  }
  sums.store(y, w.N, o);
}


template <typename Value>    // float, or uint16_t: bfloat16's bits
struct BlockRows {
  const Value* panels;
  const int64_t* panel_start;  // (N / bo,): where block row r's panel starts in `panels`
  const int64_t* crow;         // (N / bo + 1,)
  const int32_t* columns;      // (nnz_blocks,): each kept block's input block
  int64_t N, K, bo, bi;
};

// y[t][o + r] for r < R, t < TB: rows o .. o + R (one block row's) against TB tokens of x.
template <int TB, int R, typename Value>
void dot_rows(const BlockRows<Value>& w, const float* x, int64_t ldx, int64_t o, float* y) {
  const int64_t r0 = o / w.bo, begin = w.crow[r0], kept = w.crow[r0 + 1] - begin, width = kept * w.bi;
  const Value* wp = w.panels + w.panel_start[r0] + (o % w.bo) * width;
  Sums<TB, R> sums;
  for (int64_t b = 0; b < kept; ++b) {
    const int64_t input = static_cast<int64_t>(w.columns[begin + b]) * w.bi;
    for (int64_t i = 0; i < w.bi; i += kLanes) {
      v16 wv[R];
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(wp + r * width + b * w.bi + i + kPrefetchFar, 0, 2);  // as the masked kernel's
        wv[r] = load_values(wp + r * width + b * w.bi + i);
      }
      sums.add(wv, x, ldx, input + i);
    }
  }
  sums.store(y, w.N, o);
}

// Rows o .. o + R of y for T tokens, 8 at a time (the rows' values stay in cache meanwhile).
template <int R, typename Rows>
void each_token_block(const Rows& w, const float* x, int64_t T, int64_t ldx, int64_t o, float* y) {
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) dot_rows<8, R>(w, x + t * ldx, ldx, o, y + t * w.N);
  if (T - t >= 4) { dot_rows<4, R>(w, x + t * ldx, ldx, o, y + t * w.N); t += 4; }
  if (T - t >= 2) { dot_rows<2, R>(w, x + t * ldx, ldx, o, y + t * w.N); t += 2; }
  if (T - t >= 1) dot_rows<1, R>(w, x + t * ldx, ldx, o, y + t * w.N);
}

// Every row of y, two at a time, each thread its share; tokens in tiles of kTile (their x, up to
// 64 x K floats, stays in the core's cache while the share's rows stream their weights past it).
template <typename Rows>
void rows_in_pairs(const Rows& w, const float* x, int64_t T, int64_t ldx, float* y, int64_t threads) {
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    int64_t lo, hi;
    share(w.N, 2, omp_get_num_threads(), omp_get_thread_num(), lo, hi);
    for (int64_t t0 = 0; t0 < T; t0 += kTile) {
      const int64_t count = std::min(kTile, T - t0);
      const float* xt = x + t0 * ldx;
      float* yt = y + t0 * w.N;
      int64_t o = lo;
      for (; o + 2 <= hi; o += 2) each_token_block<2>(w, xt, count, ldx, o, yt);
      for (; o < hi; ++o) each_token_block<1>(w, xt, count, ldx, o, yt);
    }
  }
}

// Row o's accumulators for the V * 16 tokens of a tile, over its kept values [begin, end) of one
// segment: each value times its input's row of the tile. Two values at a time (two chains).
template <int V>
void segment_row(const float* tile, int64_t width, const float* values, const uint8_t* columns, int64_t begin,
                 int64_t end, float* y) {
  v16 acc[V], other[V];
  for (int i = 0; i < V; ++i) { acc[i] = load(y + i * kLanes); other[i] = v16{}; }
  int64_t p = begin;
  for (; p + 2 <= end; p += 2) {
    const v16 a = v16{} + values[p], b = v16{} + values[p + 1];
    const float* xa = tile + static_cast<int64_t>(columns[p]) * width;
    const float* xb = tile + static_cast<int64_t>(columns[p + 1]) * width;
    for (int i = 0; i < V; ++i) {
      acc[i] += a * load(xa + i * kLanes);
      other[i] += b * load(xb + i * kLanes);
    }
  }
  if (p < end) {
    const v16 a = v16{} + values[p];
    const float* xa = tile + static_cast<int64_t>(columns[p]) * width;
    for (int i = 0; i < V; ++i) acc[i] += a * load(xa + i * kLanes);
  }
  for (int i = 0; i < V; ++i) store(y + i * kLanes, acc[i] + other[i]);
}

// Calls f with a Value of the weights' type (float for 4 bytes a value, uint16_t: bfloat16's bits,
// for 2): 0, or 1 for another size.
template <typename F>
int with_value_type(int64_t value_bytes, F f) {
  if (value_bytes == 4) {
    f(float{});
  } else if (value_bytes == 2) {
    f(uint16_t{});
  } else {
    return 1;
  }
  return 0;
}

}  // namespace

// y (T, N) = x (T, ldx >= chunks * 16; the columns from K on zero) @ W.T, W as masked rows whose
// values are float32 (value_bytes 4) or bfloat16 (2).
extern "C" int sparsec_masked_linear(const float* x, int64_t T, int64_t ldx, const void* values, int64_t value_bytes,
                                     const uint16_t* masks, const int64_t* row_start, int64_t N, int64_t K,
                                     float* y, int64_t threads) {
  const int64_t chunks = (K + kLanes - 1) / kLanes;
  if (T < 0 || N < 0 || K < 0 || ldx < chunks * kLanes || threads < 1) return 1;
  return with_value_type(value_bytes, [&](auto value) {
    using Value = decltype(value);
    const MaskedRows<Value> w{static_cast<const Value*>(values), masks, row_start, N, chunks};
    rows_in_pairs(w, x, T, ldx, y, threads);
  });
}

// y (T, N) = x (T, ldx >= K) @ W.T, W as segments (offsets (segments, N + 1)). Token tile by
// token tile (64 tokens; the last padded to a multiple of 16): the threads copy the tile's x into
// `tile` (K x width, an input's tokens contiguous), each computes its share of rows into `rows`
// (N x width, its rows only) and writes them back into y transposed: no copies outside.
extern "C" int sparsec_segments_linear(const float* x, int64_t T, int64_t ldx, const float* values,
                                       const uint8_t* columns, const int64_t* offsets, int64_t N, int64_t K,
                                       int64_t seg, float* y, float* tile, float* rows, int64_t threads) {
  if (T < 0 || N < 0 || K < 0 || ldx < K || seg < 1 || seg > 256 || threads < 1) return 1;
  const int64_t segments = (K + seg - 1) / seg;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
    int64_t lo, hi, k_lo, k_hi;
    share(N, 1, parts, part, lo, hi);
    share(K, 1, parts, part, k_lo, k_hi);
    for (int64_t t0 = 0; t0 < T; t0 += kTile) {
      const int64_t real = std::min(kTile, T - t0), width = (real + kLanes - 1) / kLanes * kLanes;
      for (int64_t k = k_lo; k < k_hi; ++k) {
        float* row = tile + k * width;
        for (int64_t j = 0; j < real; ++j) row[j] = x[(t0 + j) * ldx + k];
        std::fill(row + real, row + width, 0.0f);
      }
      std::fill(rows + lo * width, rows + hi * width, 0.0f);
#pragma omp barrier
      for (int64_t s = 0; s < segments; ++s) {
        const float* part_tile = tile + s * seg * width;
        const int64_t* off = offsets + s * (N + 1);
        for (int64_t o = lo; o < hi; ++o) {
          const int64_t begin = off[o], end = off[o + 1];
          if (begin == end) continue;
          float* acc = rows + o * width;
          switch (width / kLanes) {
            case 4: segment_row<4>(part_tile, width, values, columns, begin, end, acc); break;
            case 3: segment_row<3>(part_tile, width, values, columns, begin, end, acc); break;
            case 2: segment_row<2>(part_tile, width, values, columns, begin, end, acc); break;
            default: segment_row<1>(part_tile, width, values, columns, begin, end, acc);
          }
        }
      }
      for (int64_t o0 = lo; o0 < hi; o0 += kLanes) {  // back into y, 16 rows at a time
        const int64_t o1 = std::min(hi, o0 + kLanes);
        for (int64_t j = 0; j < real; ++j)
          for (int64_t o = o0; o < o1; ++o) y[(t0 + j) * N + o] = rows[o * width + j];
      }
#pragma omp barrier
    }
  }
  return 0;
}

// y (T, N) = x (T, ldx >= K) @ W.T for W as block-row panels (bo even, bi a multiple of 16) of
// float32 (value_bytes 4) or bfloat16 (2) values.
extern "C" int sparsec_block_rows_linear(const float* x, int64_t T, int64_t ldx, const void* panels,
                                         int64_t value_bytes, const int64_t* panel_start, const int64_t* crow,
                                         const int32_t* columns, int64_t N, int64_t K, int64_t bo, int64_t bi,
                                         float* y, int64_t threads) {
  if (T < 0 || N < 0 || K < 0 || bo < 2 || bo % 2 || N % bo || bi < kLanes || bi % kLanes || K % bi || ldx < K ||
      threads < 1)
    return 1;
  return with_value_type(value_bytes, [&](auto value) {
    using Value = decltype(value);
    const BlockRows<Value> w{static_cast<const Value*>(panels), panel_start, crow, columns, N, K, bo, bi};
    rows_in_pairs(w, x, T, ldx, y, threads);
  });
}
