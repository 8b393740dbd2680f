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
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"

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

template <typename S, typename C, bool HasBias, bool Bounded>
void merge_impl(const C* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0, S* hv,
                int32_t* hi, int64_t k, const uint8_t* dead_mask, S* av, int32_t* ai, int64_t aux_k,
                const KeyTerms<S>& terms) {
  std::vector<int32_t> dead_cols;  // tile-local columns of dead latents, shared by all rows
  if (aux_k > 0 && dead_mask != nullptr) {
    for (int64_t c = 0; c < cols; ++c)
      if (dead_mask[col0 + c]) dead_cols.push_back(static_cast<int32_t>(c));
  }
  const S* bias = HasBias ? terms.bias + col0 : nullptr;
  const float* q1 = Bounded ? terms.col + col0 : nullptr;
  const float* q2 = Bounded ? terms.col + terms.n + col0 : nullptr;
  const float* o = Bounded ? terms.col + 2 * terms.n + col0 : nullptr;
  const S rel = terms.rel;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < rows; ++b) {
    const C* row = scores + b * ld;
    S p1 = 0, p2 = 0, z = 0;
    if constexpr (Bounded) {
      p1 = terms.row[b];
      p2 = terms.row[terms.rows + b];
      z = terms.row[2 * terms.rows + b];
    }
    auto key = [&](int64_t c) -> S {
      S a = load<S>(row[c]);
      if constexpr (HasBias) a += bias[c];
      if constexpr (Bounded) a = a + rel * std::abs(a) + (p1 * q1[c] + (p2 * q2[c] + (z + o[c])));
      return a;
    };
    Heap<S> heap{hv + b * k, hi + b * k, k};
    int64_t c = 0;
    S keys[kChunk];
    for (; c + kChunk <= cols; c += kChunk) {
      for (int64_t u = 0; u < kChunk; ++u) keys[u] = key(c + u);
      const S thr = heap.v[0];
      if (thr > S(0)) {
        // relu(key) >= thr > 0 needs key >= thr: test the chunk in one vectorizable pass.
        int hit = 0;
        for (int64_t u = 0; u < kChunk; ++u) hit |= static_cast<int>(keys[u] >= thr);
        if (!hit) continue;
      }
      for (int64_t u = 0; u < kChunk; ++u) heap.offer(relu(keys[u]), static_cast<int32_t>(col0 + c + u));
    }
    for (; c < cols; ++c) heap.offer(relu(key(c)), static_cast<int32_t>(col0 + c));

    if (!dead_cols.empty()) {
      Heap<S> aux{av + b * aux_k, ai + b * aux_k, aux_k};
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
    if (std::is_same_v<S, double> && row_bound != nullptr)
      throw std::invalid_argument("row_bound: bounded keys are for float32 heaps only");
    const KeyTerms<S> terms{static_cast<const S*>(bias), row_bound, col_bound, rows, n, static_cast<S>(rel)};
    return dispatch_float(chunk_dtype, "scores", [&](auto c) {
      using C = decltype(c);
      auto run = [&](auto has_bias, auto bounded) {
        merge_impl<S, C, decltype(has_bias)::value, decltype(bounded)::value>(
            static_cast<const C*>(scores), ld, rows, cols, col0, static_cast<S*>(heap_scores), heap_indices,
            k, dead_mask, static_cast<S*>(aux_scores), aux_indices, aux_k, terms);
      };
      using T = std::true_type;
      using F = std::false_type;
      if (row_bound != nullptr) {
        if constexpr (std::is_same_v<S, float>) {
          if (bias != nullptr) run(T{}, T{}); else run(F{}, T{});
        }
      } else if (bias != nullptr) {
        run(T{}, F{});
      } else {
        run(F{}, F{});
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
