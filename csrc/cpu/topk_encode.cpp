// Running top-k of relu(pre-activations) over chunks of latents (the CPU half of topk_encode).
//
// Python computes one [rows, cols] chunk of encoder scores with torch's GEMM (oneDNN/MKL, in the
// operands' dtype: bf16 chunks come from the AMX / AVX-512 BF16 units), then calls topk_state_merge,
// which adds the latent bias, applies relu and keeps a running top-k per row, so [rows, n] never
// exists: extra memory is O(rows * (k + cols)). Chunks may be float32, float64, bfloat16 or float16;
// the heap is float32 (float64 for float64 operands).
// Each row keeps a min-heap of its k best (key, index) pairs; a candidate costs one compare
// against the root unless it enters. Once a row holds k positive keys, chunks of 16 whose every
// key is below the root are skipped with one vectorizable compare-and-or, so the scan runs at
// memory speed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/vector_load.h"

namespace flashsae::cpu {
namespace {

constexpr int32_t kSentinelIndex = std::numeric_limits<int32_t>::max();
constexpr int64_t kChunk = 16;

// "a is better than b": larger score, or equal score and lower latent index.
template <typename S> inline bool better(S va, int32_t ia, S vb, int32_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Restores the heap property below `pos` (root = the worst entry).
template <typename S> inline void sift_down(S* v, int32_t* ix, int64_t k, int64_t pos) {
  const S pv = v[pos];
  const int32_t pi = ix[pos];
  for (;;) {
    int64_t child = 2 * pos + 1;
    if (child >= k) break;
    // pick the worse child
    if (child + 1 < k && better(v[child], ix[child], v[child + 1], ix[child + 1])) ++child;
    if (!better(pv, pi, v[child], ix[child])) break;  // pv is already no better than the worse child
    v[pos] = v[child];
    ix[pos] = ix[child];
    pos = child;
  }
  v[pos] = pv;
  ix[pos] = pi;
}

template <typename S> struct Heap {
  S* v;
  int32_t* ix;
  int64_t k;
  // Offers (s, col); returns true when it entered.
  inline bool offer(S s, int32_t col) {
    if (!better(s, col, v[0], ix[0])) return false;
    v[0] = s;
    ix[0] = col;
    sift_down(v, ix, k, 0);
    return true;
  }
};

template <typename S> inline S relu(S s) { return s > S(0) ? s : S(0); }

// How a chunk entry becomes a heap key. Plain: relu(score (+ bias[col])). Bounded: relu of an upper
// bound of the exact score, score + rel |score| + p1 q1[col] + p2 q2[col] + (z + o[col]), with the
// per-row (p1, p2, z) and per-latent (q1, q2, o) terms of the caller's error bound (see
// flashsae.ops.topk_encode: the certified precision).
template <typename S> struct KeyTerms {
  const S* bias;        // [n] or null
  const float* row;     // [3, rows] (p1, p2, z) or null: plain keys
  const float* col;     // [3, n] (q1, q2, o)
  int64_t rows, n;
  S rel;
};

// One row of a chunk into a float32 heap, sixteen entries at a time in GCC / Clang vector types (one
// AVX-512 register; two or four narrower ones in the other clones): the keys are computed in
// registers, and a group none of whose keys reaches the heap's root is skipped after one compare.
typedef VectorTypes<16>::f32 v16f;
typedef int32_t v16i __attribute__((vector_size(64)));


struct RowTerms {
  const float* bias;  // chunk-local, or null
  const float* q1;    // chunk-local bound terms, or null (plain keys)
  const float* q2;
  const float* o;
  float p1, p2, z, rel;
  float coarse;       // bounded keys: >= (p1 q1 + (p2 q2 + (z + o))) of every column of the chunk
};

typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v4i __attribute__((vector_size(16)));

// Whether any lane of a compare result is set: an OR tree over halves (no per-lane extraction).
inline __attribute__((always_inline)) bool any_lane(v16i m) {
  v8i lo, hi;
  std::memcpy(&lo, &m, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&m) + sizeof lo, sizeof hi);
  const v8i m8 = lo | hi;
  v4i lo4, hi4;
  std::memcpy(&lo4, &m8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&m8) + sizeof lo4, sizeof hi4);
  const v4i m4 = lo4 | hi4;
  int64_t two[2];
  std::memcpy(two, &m4, sizeof two);
  return (two[0] | two[1]) != 0;
}

// A key in two parts: base16 = score (+ bias) (+ rel |score + bias|), then key = base + the
// column's bound terms (same expression as one piece: (a + rel |a|) + (p1 q1 + ...)).
template <typename C>
inline __attribute__((always_inline)) v16f base16(const C* row, int64_t c, const RowTerms& t) {
  v16f a = load_lanes<16>(row + c);
  if (t.bias != nullptr) a += load_lanes<16>(t.bias + c);
  if (t.q1 != nullptr) {
    const v16i magnitude_bits = (v16i)a & 0x7fffffff;
    const v16f magnitude = (v16f)magnitude_bits;
    a = a + t.rel * magnitude;
  }
  return a;
}

inline __attribute__((always_inline)) v16f bound16(v16f base, int64_t c, const RowTerms& t) {
  return base + (t.p1 * load_lanes<16>(t.q1 + c) + (t.p2 * load_lanes<16>(t.q2 + c) + (t.z + load_lanes<16>(t.o + c))));
}

template <typename C>
inline __attribute__((always_inline)) v16f keys16(const C* row, int64_t c, const RowTerms& t) {
  const v16f a = base16(row, c, t);
  return t.q1 != nullptr ? bound16(a, c, t) : a;
}

template <typename S> inline float key1(const S* row, int64_t c, const RowTerms& t) {
  float a = to_float(row[c]);
  if (t.bias != nullptr) a += t.bias[c];
  if (t.q1 != nullptr) a = a + t.rel * std::abs(a) + (t.p1 * t.q1[c] + (t.p2 * t.q2[c] + (t.z + t.o[c])));
  return a;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The scan between heap entries in AVX-512 intrinsics. GCC compiles merge_row_body's group test
// (keys16, then any_lane) in the avx512f clone to ~35 instructions per 16 keys, ten of them port-5
// shuffles: the compare result goes back to a vector and through an OR tree, the bfloat16 widening
// through extracts and inserts, and the RowTerms fields are reloaded every group. Here one
// vpmovzxwd widens, the compare lands in a mask register, and the loop runs until a group may hold a
// key >= thr; merge_row_body then computes that group's exact keys as before. Bounded keys are
// tested as base + t.coarse (>= each key of the chunk: t.coarse covers every column's terms), so the
// three per-column terms are loaded only for such groups. The threshold is lowered by 2^-12 of
// itself: base here and in keys16 may be contracted differently (a difference of ~2^-23 |base|,
// which only matters when a key >= thr > 0, where |base| is at most the terms). Six bf16 chunks of
// 4096 latents, B=1024, k=32 on 2 threads: 10.0 -> 8.0 ms per encode with bounded keys (certified),
// 7.8 -> 6.0 ms with plain keys (fast).
#define FLASHSAE_AVX512_SCAN 1
inline bool has_avx512() {
  static const bool value = __builtin_cpu_supports("avx512f");
  return value;
}

#pragma GCC diagnostic push
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_* as the masked-off source: a false positive
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <typename C>
__attribute__((target("avx512f"))) int64_t skip_groups_512(const C* row, int64_t c, int64_t full, const RowTerms& t,
                                                           float thr) {
  const __m512 limit = _mm512_set1_ps(thr - thr * 0x1p-12f);
  const __m512 rel = _mm512_set1_ps(t.rel);
  const __m512 coarse = _mm512_set1_ps(t.coarse);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  const float* bias = t.bias;
  const bool bounded = t.q1 != nullptr;
  for (; c < full; c += 16) {
    __m512 a;
    if constexpr (std::is_same_v<C, bf16>) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
      a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      a = _mm512_loadu_ps(row + c);
    }
    if (bias != nullptr) a = _mm512_add_ps(a, _mm512_loadu_ps(bias + c));
    if (bounded) {
      const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), magnitude));
      a = _mm512_add_ps(_mm512_fmadd_ps(rel, m, a), coarse);
    }
    if (_mm512_cmp_ps_mask(a, limit, _CMP_GE_OQ) != 0) return c;
  }
  return full;
}

// The maxima for a row's seed (merge_row_body) in AVX-512: lane u of block s holds the largest
// score (+ bias) of column 16 g + u over the groups g of [16 s, 16 s + 16): 16 disjoint, non-empty
// sets of columns per block, no horizontal reduction. Plain (score + bias) is <= the key of bounded
// keys (their terms are >= 0), so the seed stays a lower bound of the k-th key. Against the generic
// pass (keys16, then a shuffle reduction per group): first-chunk merge 3.8 -> 3.35 ms (bfloat16,
// EPYC, 2 threads; the second chunk's: 1.4 ms). Returns the number of maxima written (groups
// rounded up to 16).
template <typename C>
__attribute__((target("avx512f"))) int64_t set_maxima_512(const C* row, int64_t groups, const float* bias,
                                                          float* out) {
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const int64_t g1 = std::min(groups, g0 + 16);
    for (int64_t g = g0; g < g1; ++g) {
      __m512 a;
      if constexpr (std::is_same_v<C, bf16>) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * g));
        a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        a = _mm512_loadu_ps(row + 16 * g);
      }
      if (bias != nullptr) a = _mm512_add_ps(a, _mm512_loadu_ps(bias + 16 * g));
      top = _mm512_max_ps(a, top);  // a NaN score yields `top` (max_ps returns its second operand)
    }
    _mm512_storeu_ps(out + g0, top);
  }
  return (groups + 15) / 16 * 16;
}

// A seed from set_maxima_512's maxima (`sets` of them, a multiple of 16, at least k): a value t with
// at least k maxima >= t, as close under the k-th largest maximum as 8 bisection steps between the
// smallest and the largest get (within 1/256 of their spread). Any such t is a valid seed (k
// disjoint sets reach it). Branch-free compares and popcounts instead of nth_element over 256
// random floats, whose mispredicted branches cost about 1.5 us per row.
__attribute__((target("avx512f"))) float seed_512(const float* maxima, int64_t sets, int64_t k) {
  __m512 lo_v = _mm512_loadu_ps(maxima), hi_v = lo_v;
  for (int64_t s = 16; s < sets; s += 16) {
    const __m512 v = _mm512_loadu_ps(maxima + s);
    lo_v = _mm512_min_ps(v, lo_v);
    hi_v = _mm512_max_ps(v, hi_v);
  }
  float lows[16], highs[16];
  _mm512_storeu_ps(lows, lo_v);
  _mm512_storeu_ps(highs, hi_v);
  float lo = lows[0], hi = highs[0];
  for (int u = 1; u < 16; ++u) {
    lo = std::min(lo, lows[u]);
    hi = std::max(hi, highs[u]);
  }
  for (int step = 0; step < 8; ++step) {  // invariant: at least k maxima >= lo
    const float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo)) break;
    const __m512 limit = _mm512_set1_ps(mid);
    int64_t count = 0;
    for (int64_t s = 0; s < sets; s += 16)
      count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(maxima + s), limit, _CMP_GE_OQ));
    if (count >= k) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}
#pragma GCC diagnostic pop
#endif

typedef float v8f_ __attribute__((vector_size(32)));
typedef float v4f_ __attribute__((vector_size(16)));

// The largest of sixteen keys, NaN as -inf (so the nth_element below sees a strict weak order).
inline __attribute__((always_inline)) float max_lane(v16f a) {
  v8f_ lo, hi;
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof lo, sizeof hi);
  const v8f_ m8 = lo > hi ? lo : hi;
  v4f_ lo4, hi4;
  std::memcpy(&lo4, &m8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&m8) + sizeof lo4, sizeof hi4);
  const v4f_ m4 = lo4 > hi4 ? lo4 : hi4;
  const float m = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  return m == m ? m : -std::numeric_limits<float>::infinity();
}

// Row b's heap over one chunk. A row whose heap is not yet full of positive keys (its first chunk)
// would offer most of the chunk's top few hundred keys, each a ~log2(k)-level sift. It first takes
// the k-th largest of its groups' maxima, `seed`: k distinct keys of the chunk are >= seed, so a
// key below it can never be among the row's k best, and the scan skips it as it skips keys below
// the root. Single thread (CPU time, median of 5 interleaved runs), d=768, n=24576, k=32 + margin
// 10, six bfloat16 chunks of 4096 latents: 25.1 ms per encode without the seed (9.5 of them the
// scan alone, the rest ~300 sifts per row), 19.7 ms with it (one extra scan of the first chunk).
// With AVX-512 the maxima are of lane-strided sets (set_maxima_512) and the seed comes from a
// bisection over them (seed_512), not nth_element: a fresh heap's merge of one bfloat16 chunk
// [1024, 4096] (42 slots, 2 threads, EPYC) 3.2 -> 1.9 ms, a full heap's 1.3 ms.
template <typename C>
inline __attribute__((always_inline)) void merge_row_body(const C* row, int64_t cols, int64_t col0,
                                                          const RowTerms& t, float* hv, int32_t* hi,
                                                          int64_t k, float* group_max) {
  Heap<float> heap{hv, hi, k};
  const int64_t groups = cols / kChunk;
  float seed = -std::numeric_limits<float>::infinity();
  if (heap.v[0] <= 0.0f && groups >= k) {
    bool seeded = false;
#ifdef FLASHSAE_AVX512_SCAN
    if constexpr (std::is_same_v<C, bf16> || std::is_same_v<C, float>) {
      if (has_avx512()) {
        seed = seed_512(group_max, set_maxima_512(row, groups, t.bias, group_max), k);
        seeded = true;
      }
    }
#endif
    if (!seeded) {
      for (int64_t g = 0; g < groups; ++g) group_max[g] = max_lane(keys16(row, g * kChunk, t));
      std::nth_element(group_max, group_max + (k - 1), group_max + groups, std::greater<float>());
      seed = group_max[k - 1];
    }
    // lowered by 2^-12 of itself: the two passes evaluate a key by the same inlined code, but
    // nothing forces the compiler to contract both into the same FMAs (a difference of ~2^-24)
    seed -= std::abs(seed) * 0x1p-12f;
  }
  int64_t c = 0;
  const int64_t full = groups * kChunk;
#ifdef FLASHSAE_AVX512_SCAN
  const bool scan512 = (std::is_same_v<C, bf16> || std::is_same_v<C, float>) && has_avx512();
#endif
  for (; c + kChunk <= cols; c += kChunk) {
    const float thr = std::max(heap.v[0], seed);
#ifdef FLASHSAE_AVX512_SCAN
    if (thr > 0.0f && scan512) {
      c = skip_groups_512(row, c, full, t, thr);
      if (c >= full) break;
    }
#endif
    const v16f keys = keys16(row, c, t);
    uint32_t lanes = 0xffffu;
    if (thr > 0.0f) {
      // relu(key) >= thr > 0 needs key >= thr: most groups are skipped after one compare, and only
      // the lanes that pass are offered (a row's first chunk fills its heap: ~100 groups pass)
      const v16i hit = keys >= thr;
      if (!any_lane(hit)) continue;
      lanes = 0;
      for (int u = 0; u < 16; ++u) lanes |= static_cast<uint32_t>(hit[u] & 1) << u;
    }
    while (lanes != 0) {
      const int u = __builtin_ctz(lanes);
      lanes &= lanes - 1;
      heap.offer(relu(keys[u]), static_cast<int32_t>(col0 + c + u));
    }
  }
  for (; c < cols; ++c) heap.offer(relu(key1(row, c, t)), static_cast<int32_t>(col0 + c));
}

#define FLASHSAE_MERGE_ROW(C)                                                                      \
  FLASHSAE_CLONES void merge_row(const C* row, int64_t cols, int64_t col0, const RowTerms& t,     \
                                 float* hv, int32_t* hi, int64_t k, float* group_max) {            \
    merge_row_body(row, cols, col0, t, hv, hi, k, group_max);                                      \
  }
FLASHSAE_MERGE_ROW(float)
FLASHSAE_MERGE_ROW(bf16)
FLASHSAE_MERGE_ROW(f16)
#undef FLASHSAE_MERGE_ROW

template <typename C>
void merge_impl_f32(const C* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0, float* hv,
                    int32_t* hi, int64_t k, const uint8_t* dead_mask, float* av, int32_t* ai, int64_t aux_k,
                    const KeyTerms<float>& terms) {
  std::vector<int32_t> dead_cols;  // tile-local columns of dead latents, shared by all rows
  if (aux_k > 0 && dead_mask != nullptr) {
    for (int64_t c = 0; c < cols; ++c)
      if (dead_mask[col0 + c]) dead_cols.push_back(static_cast<int32_t>(c));
  }
  const bool bounded = terms.row != nullptr;
  RowTerms base{terms.bias != nullptr ? terms.bias + col0 : nullptr,
                bounded ? terms.col + col0 : nullptr,
                bounded ? terms.col + terms.n + col0 : nullptr,
                bounded ? terms.col + 2 * terms.n + col0 : nullptr,
                0.0f, 0.0f, 0.0f, terms.rel, 0.0f};
  float q1_max = 0.0f, q2_max = 0.0f, o_max = 0.0f;  // the chunk's largest terms (all >= 0)
  if (bounded) {
    for (int64_t c = 0; c < cols; ++c) {
      q1_max = std::max(q1_max, base.q1[c]);
      q2_max = std::max(q2_max, base.q2[c]);
      o_max = std::max(o_max, base.o[c]);
    }
  }
  // dynamic: on a shared machine a static split waits for the slowest thread (2 busy cores: the
  // merge took 112 ms on 2 threads against 43 ms on 1 with static row blocks)
#pragma omp parallel
  {
    // 64 bytes of padding on each side: no cache line written here is shared with another thread
    // (set_maxima_512 writes up to 15 past cols / kChunk: inside the trailing padding)
    std::vector<float> group_max(static_cast<size_t>(cols / kChunk + 32));
    // nowait: the region's end is the one barrier. With a second one (the omp for's), the merge of
    // six chunks on 2 busy threads took 186 ms of wall time against 108 ms without.
#pragma omp for schedule(dynamic, 16) nowait
    for (int64_t b = 0; b < rows; ++b) {
      RowTerms t = base;
      if (bounded) {
        t.p1 = terms.row[b];
        t.p2 = terms.row[terms.rows + b];
        t.z = terms.row[2 * terms.rows + b];
        // rounded up by 2^-16: each column's terms are the same nonnegative products and sums of
        // smaller operands, so they stay below this within their few roundings
        t.coarse = (t.p1 * q1_max + (t.p2 * q2_max + (t.z + o_max))) * (1.0f + 0x1p-16f);
      }
      const C* row = scores + b * ld;
      merge_row(row, cols, col0, t, hv + b * k, hi + b * k, k, group_max.data() + 16);
      if (!dead_cols.empty()) {
        Heap<float> aux{av + b * aux_k, ai + b * aux_k, aux_k};
        for (int32_t dc : dead_cols) aux.offer(relu(key1(row, dc, t)), static_cast<int32_t>(col0 + dc));
      }
    }
  }
}

// float64 heaps (float64 operands): plain keys, relu(score (+ bias)).
template <typename C, bool HasBias>
void merge_impl_f64(const C* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0, double* hv,
                    int32_t* hi, int64_t k, const uint8_t* dead_mask, double* av, int32_t* ai, int64_t aux_k,
                    const double* bias_all) {
  std::vector<int32_t> dead_cols;
  if (aux_k > 0 && dead_mask != nullptr) {
    for (int64_t c = 0; c < cols; ++c)
      if (dead_mask[col0 + c]) dead_cols.push_back(static_cast<int32_t>(c));
  }
  const double* bias = HasBias ? bias_all + col0 : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < rows; ++b) {
    const C* row = scores + b * ld;
    auto key = [&](int64_t c) -> double {
      double a = load<double>(row[c]);
      if constexpr (HasBias) a += bias[c];
      return a;
    };
    Heap<double> heap{hv + b * k, hi + b * k, k};
    for (int64_t c = 0; c < cols; ++c) {
      const double v = key(c);
      if (v >= heap.v[0]) heap.offer(relu(v), static_cast<int32_t>(col0 + c));
    }
    if (!dead_cols.empty()) {
      Heap<double> aux{av + b * aux_k, ai + b * aux_k, aux_k};
      for (int32_t dc : dead_cols) aux.offer(relu(key(dc)), static_cast<int32_t>(col0 + dc));
    }
  }
}

template <typename S, typename V>
void finish_impl(const S* hv, const int32_t* hi, int64_t rows, int64_t k, V* values, int32_t* indices) {
#pragma omp parallel
  {
    std::vector<std::pair<S, int32_t>> entries(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t j = 0; j < k; ++j) entries[j] = {hv[b * k + j], hi[b * k + j]};
      std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& c) {
        return better(a.first, a.second, c.first, c.second);
      });
      for (int64_t j = 0; j < k; ++j) {
        const bool empty = entries[j].second == kSentinelIndex;
        values[b * k + j] = store_acc<V>(empty ? Acc<V>(0) : static_cast<Acc<V>>(entries[j].first));
        indices[b * k + j] = empty ? -1 : entries[j].second;
      }
    }
  }
}

}  // namespace

void topk_state_init(void* heap_scores, int32_t* heap_indices, int64_t rows, int64_t k, int score_dtype) {
  dispatch_acc(score_dtype, "heap_scores", [&](auto s) {
    using S = decltype(s);
    S* hv = static_cast<S*>(heap_scores);
    std::fill(hv, hv + rows * k, -std::numeric_limits<S>::infinity());
    std::fill(heap_indices, heap_indices + rows * k, kSentinelIndex);
    return 0;
  });
}

void topk_state_merge(const void* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                      void* heap_scores, int32_t* heap_indices, int64_t k, const uint8_t* dead_mask,
                      void* aux_scores, int32_t* aux_indices, int64_t aux_k, int score_dtype,
                      int chunk_dtype, const void* bias, int64_t n, const float* row_bound,
                      const float* col_bound, double rel) {
  dispatch_acc(score_dtype, "heap_scores", [&](auto s) {
    using S = decltype(s);
    return dispatch_float(chunk_dtype, "scores", [&](auto c) {
      using C = decltype(c);
      if constexpr (std::is_same_v<S, double>) {
        if (row_bound != nullptr) throw std::invalid_argument("row_bound: bounded keys are for float32 heaps only");
        auto* hv = static_cast<double*>(heap_scores);
        auto* av = static_cast<double*>(aux_scores);
        if (bias != nullptr)
          merge_impl_f64<C, true>(static_cast<const C*>(scores), ld, rows, cols, col0, hv, heap_indices, k,
                                  dead_mask, av, aux_indices, aux_k, static_cast<const double*>(bias));
        else
          merge_impl_f64<C, false>(static_cast<const C*>(scores), ld, rows, cols, col0, hv, heap_indices, k,
                                   dead_mask, av, aux_indices, aux_k, nullptr);
      } else if constexpr (std::is_same_v<C, double>) {
        throw std::invalid_argument("scores: float64 chunks go with float64 heaps");
      } else {
        const KeyTerms<float> terms{static_cast<const float*>(bias), row_bound, col_bound, rows, n,
                                    static_cast<float>(rel)};
        merge_impl_f32(static_cast<const C*>(scores), ld, rows, cols, col0, static_cast<float*>(heap_scores),
                       heap_indices, k, dead_mask, static_cast<float*>(aux_scores), aux_indices, aux_k, terms);
      }
      return 0;
    });
  });
}

void topk_state_finish(const void* heap_scores, const int32_t* heap_indices, int64_t rows, int64_t k,
                       int score_dtype, void* values, int32_t* indices, int value_dtype) {
  dispatch_acc(score_dtype, "heap_scores", [&](auto s) {
    using S = decltype(s);
    return dispatch_float(value_dtype, "values", [&](auto v) {
      using V = decltype(v);
      finish_impl(static_cast<const S*>(heap_scores), heap_indices, rows, k, static_cast<V*>(values),
                  indices);
      return 0;
    });
  });
}

}  // namespace flashsae::cpu
