// Sparse-dense row kernels: decoder forward/backward and encoder backward on CPU.
//
// Work is O(rows * k * d) per call plus one write of each [n, d] gradient (which torch's
// optimizers need dense); nothing of size [rows, n] is created.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/sparse_rows_impl.h"

namespace flashsae::cpu {

using detail::LatentBuckets;

void sparse_decode_forward(const void* values, const int32_t* idx, int64_t rows, int64_t k,
                           const void* W_dec, int64_t n, int64_t d, const void* b_dec, void* x_hat,
                           int dtype) {
  (void)n;  // indices were range-checked at the boundary
  dispatch_float(dtype, "values", [&](auto tag) {
    using T = decltype(tag);
    detail::gather_rows(typed<T>(x_hat), typed<T>(values), idx, rows, k, typed<T>(W_dec), d, typed<T>(b_dec));
    return 0;
  });
}

namespace {

// One latent's share of the decoder backward, over the (row, slot) pairs p of its bucket:
// dots[p] += g[p / k] . w and acc += values[p] * g[p / k], both from one read of each g row and of the
// latent's decoder row w (in cache across its pairs). Pairs go four at a time: four dot chains and one
// pass over acc, which adds them in pair order (the rounding order of one pair at a time). g rows have
// stride ld; w and acc hold `width` columns.
template <typename T>
inline __attribute__((always_inline)) void latent_backward_body(const int64_t* pairs, int64_t count, int64_t k,
                                                              const T* values, const T* g, int64_t ld,
                                                              const T* w, int64_t width, Acc<T>* __restrict acc,
                                                              Acc<T>* dots) {
  using A = Acc<T>;
  int64_t q = 0;
  for (; q + 4 <= count; q += 4) {
    const int64_t p0 = pairs[q], p1 = pairs[q + 1], p2 = pairs[q + 2], p3 = pairs[q + 3];
    const T* __restrict g0 = g + (p0 / k) * ld;
    const T* __restrict g1 = g + (p1 / k) * ld;
    const T* __restrict g2 = g + (p2 / k) * ld;
    const T* __restrict g3 = g + (p3 / k) * ld;
    const A c0 = load<A>(values[p0]), c1 = load<A>(values[p1]), c2 = load<A>(values[p2]), c3 = load<A>(values[p3]);
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t t = 0; t < width; ++t) {
      const A wt = load<A>(w[t]);
      const A a0 = load<A>(g0[t]), a1 = load<A>(g1[t]), a2 = load<A>(g2[t]), a3 = load<A>(g3[t]);
      s0 += a0 * wt;
      s1 += a1 * wt;
      s2 += a2 * wt;
      s3 += a3 * wt;
      acc[t] = (((acc[t] + c0 * a0) + c1 * a1) + c2 * a2) + c3 * a3;
    }
    dots[p0] += s0;
    dots[p1] += s1;
    dots[p2] += s2;
    dots[p3] += s3;
  }
  for (; q < count; ++q) {
    const int64_t p = pairs[q];
    const T* __restrict gp = g + (p / k) * ld;
    const A c = load<A>(values[p]);
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < width; ++t) {
      const A a = load<A>(gp[t]);
      s += a * load<A>(w[t]);
      acc[t] += c * a;
    }
    dots[p] += s;
  }
}

// One clone per storage type (FLASHSAE_CLONES, cpu/dtype.h): the baseline build is SSE2's 4 lanes.
#define FLASHSAE_LATENT_BACKWARD(T)                                                                         \
  FLASHSAE_CLONES void latent_backward(const int64_t* pairs, int64_t count, int64_t k, const T* values,    \
                                       const T* g, int64_t ld, const T* w, int64_t width, Acc<T>* acc,     \
                                       Acc<T>* dots) {                                                      \
    latent_backward_body(pairs, count, k, values, g, ld, w, width, acc, dots);                              \
  }
FLASHSAE_LATENT_BACKWARD(float)
FLASHSAE_LATENT_BACKWARD(double)
FLASHSAE_LATENT_BACKWARD(bf16)
FLASHSAE_LATENT_BACKWARD(f16)
#undef FLASHSAE_LATENT_BACKWARD

}  // namespace

// d_values and dW_dec in one pass over the pairs of each latent (latent_backward): latents run in
// parallel, each writing its own dW_dec row and the dots of its own slots, so there are no races and
// every sum (pairs in increasing order) does not depend on the schedule. The unfused backward (row
// dots over every slot, then a latent-bucketed scatter, both SSE2) read each W_dec row once per slot
// and each g row twice: the six decoders of the CLT step (L = 6, d = 384, n = 8192 per layer, k = 32,
// B = 1024, float32, into preallocated outputs) took 80 ms on two cores, 35 ms fused. Column blocks
// that keep a [B, 256] slice of g in L2 were slower (57 ms): strided 1 KiB row pieces.
void sparse_decode_backward(const void* grad, const void* values, const int32_t* idx, int64_t rows,
                            int64_t k, const void* W_dec, int64_t n, int64_t d, void* d_values,
                            void* dW_dec, void* db_dec, int dtype) {
  dispatch_float(dtype, "values", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* g = typed<T>(grad);
    const T* v = typed<T>(values);
    const T* w = typed<T>(W_dec);
    T* dw = typed<T>(dW_dec);
    const int64_t count = rows * k;
    const LatentBuckets buckets(idx, count, n);
    std::vector<A> dots(static_cast<size_t>(count), A(0));  // empty slots are in no bucket: 0
#pragma omp parallel
    {
      // float32 / float64 storage accumulates in the dW_dec row itself
      std::vector<A> scratch(std::is_same_v<T, A> ? 0 : static_cast<size_t>(d));
#pragma omp for schedule(dynamic, 64)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t lo = buckets.begin(i), hi = buckets.end[i];
        T* dst = dw + i * d;
        if (lo == hi) {
          std::memset(static_cast<void*>(dst), 0, sizeof(T) * static_cast<size_t>(d));
          continue;
        }
        A* acc;
        if constexpr (std::is_same_v<T, A>) acc = dst;
        else acc = scratch.data();
        std::fill(acc, acc + d, A(0));
        latent_backward(buckets.pairs.data() + lo, hi - lo, k, v, g, d, w + i * d, d, acc, dots.data());
        if constexpr (!std::is_same_v<T, A>) detail::store_row(dst, acc, d);
      }
    }
    T* dv = typed<T>(d_values);
    for (int64_t p = 0; p < count; ++p) dv[p] = store_acc<T>(dots[static_cast<size_t>(p)]);
    if (db_dec)
      detail::store_sum(typed<T>(db_dec), rows, d,
                        [&](int64_t b, A* partial) { detail::axpy(partial, A(1), g + b * d, d); });
    return 0;
  });
}

void topk_encode_backward(const void* d_values, const void* values, const int32_t* idx,
                          int64_t rows, int64_t k, const void* x, const void* b_dec,
                          const void* W_enc, int64_t n, int64_t d, void* dW_enc, void* db_enc,
                          void* dx, void* db_dec, int dtype) {
  dispatch_float(dtype, "x", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* dv = typed<T>(d_values);
    const T* v = typed<T>(values);
    const T* w = typed<T>(W_enc);
    const int64_t count = rows * k;

    // d_pre: the relu gate of the k selected slots (a zero value had relu' = 0).
    std::vector<A> d_pre(static_cast<size_t>(count));
    for (int64_t p = 0; p < count; ++p)
      d_pre[p] = load<A>(v[p]) > A(0) ? load<A>(dv[p]) : A(0);

    // dW_enc[i] = sum d_pre (x[b] - b_dec); db_enc[i] = sum d_pre.
    const LatentBuckets buckets(idx, count, n);
    detail::scatter_impl(buckets, d_pre.data(), k, typed<T>(x), typed<T>(b_dec), n, d, typed<T>(dW_enc),
                         typed<T>(db_enc), /*accumulate=*/false);

    // dx[b] = sum_j d_pre[b, j] W_enc[idx[b, j]]
    if (dx) detail::gather_rows(typed<T>(dx), d_pre.data(), idx, rows, k, w, d, static_cast<const T*>(nullptr));
    if (db_dec) {
      // db_dec = -sum_b dx[b] = -sum_i db_enc[i] W_enc[i]: one axpy per touched latent instead of
      // one per (row, slot) pair, and it needs no dx.
      std::vector<A> per_latent(static_cast<size_t>(n), A(0));
      for (int64_t p = 0; p < count; ++p)
        if (idx[p] >= 0) per_latent[idx[p]] += d_pre[p];
      std::vector<int64_t> touched;
      for (int64_t i = 0; i < n; ++i)
        if (per_latent[i] != A(0)) touched.push_back(i);
      detail::store_sum(typed<T>(db_dec), static_cast<int64_t>(touched.size()), d, [&](int64_t q, A* partial) {
        const int64_t i = touched[q];
        detail::axpy(partial, -per_latent[i], w + i * d, d);
      });
    }
    return 0;
  });
}

}  // namespace flashsae::cpu
