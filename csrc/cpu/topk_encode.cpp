// Running top-k of relu(pre-activations) over tiles of latents (the CPU half of topk_encode).
//
// Python computes one [rows, cols] tile of pre-activations with torch's GEMM, then calls
// topk_state_merge, so [rows, n] never exists: extra memory is O(rows * (k + cols)).
// Each row keeps a min-heap of its k best (score, index) pairs; a candidate costs one compare
// against the root unless it enters. Once a row holds k positive scores, chunks of 16 whose every
// score is below the root are skipped with one vectorizable compare-and-or, so the scan runs at
// memory speed (d=768, n=24576, B=1024: about 10 ms for the whole row set on 2 cores, against
// 200 ms for the tile GEMMs).
#include <algorithm>
#include <limits>
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

template <typename S>
void merge_impl(const S* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0, S* hv,
                int32_t* hi, int64_t k, const uint8_t* dead_mask, S* av, int32_t* ai, int64_t aux_k) {
  std::vector<int32_t> dead_cols;  // tile-local columns of dead latents, shared by all rows
  if (aux_k > 0 && dead_mask != nullptr) {
    for (int64_t c = 0; c < cols; ++c)
      if (dead_mask[col0 + c]) dead_cols.push_back(static_cast<int32_t>(c));
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < rows; ++b) {
    const S* row = scores + b * ld;
    Heap<S> heap{hv + b * k, hi + b * k, k};
    int64_t c = 0;
    for (; c + kChunk <= cols; c += kChunk) {
      const S thr = heap.v[0];
      if (thr > S(0)) {
        // relu(s) >= thr > 0 needs s >= thr: test the chunk in one vectorizable pass.
        int hit = 0;
        for (int64_t u = 0; u < kChunk; ++u) hit |= static_cast<int>(row[c + u] >= thr);
        if (!hit) continue;
      }
      for (int64_t u = 0; u < kChunk; ++u)
        heap.offer(relu(row[c + u]), static_cast<int32_t>(col0 + c + u));
    }
    for (; c < cols; ++c) heap.offer(relu(row[c]), static_cast<int32_t>(col0 + c));

    if (!dead_cols.empty()) {
      Heap<S> aux{av + b * aux_k, ai + b * aux_k, aux_k};
      for (int32_t dc : dead_cols) aux.offer(relu(row[dc]), static_cast<int32_t>(col0 + dc));
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
                      void* aux_scores, int32_t* aux_indices, int64_t aux_k, int score_dtype) {
  dispatch_acc(score_dtype, "scores", [&](auto s) {
    using S = decltype(s);
    merge_impl(static_cast<const S*>(scores), ld, rows, cols, col0, static_cast<S*>(heap_scores),
               heap_indices, k, dead_mask, static_cast<S*>(aux_scores), aux_indices, aux_k);
    return 0;
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
