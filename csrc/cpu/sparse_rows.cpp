// Sparse-dense row kernels: decoder forward/backward and encoder backward on CPU.
//
// Work is O(rows * k * d) per call plus one write of each [n, d] gradient (which torch's
// optimizers need dense); nothing of size [rows, n] is created.
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
    using A = Acc<T>;
    const T* v = static_cast<const T*>(values);
    const T* w = static_cast<const T*>(W_dec);
    const T* bd = static_cast<const T*>(b_dec);
    T* out = static_cast<T*>(x_hat);
#pragma omp parallel
    {
      std::vector<A> acc(static_cast<size_t>(d));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t t = 0; t < d; ++t) acc[t] = bd ? load<A>(bd[t]) : A(0);
        detail::gather_into(acc.data(), v + b * k, idx + b * k, k, w, d);
        for (int64_t t = 0; t < d; ++t) out[b * d + t] = store_acc<T>(acc[t]);
      }
    }
    return 0;
  });
}

void sparse_decode_backward(const void* grad, const void* values, const int32_t* idx, int64_t rows,
                            int64_t k, const void* W_dec, int64_t n, int64_t d, void* d_values,
                            void* dW_dec, void* db_dec, int dtype) {
  dispatch_float(dtype, "values", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* g = static_cast<const T*>(grad);
    const T* w = static_cast<const T*>(W_dec);
    T* dv = static_cast<T*>(d_values);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = idx[b * k + j];
        dv[b * k + j] = store_acc<T>(i < 0 ? A(0) : detail::dot<A>(g + b * d, w + int64_t(i) * d, d));
      }
    }
    const LatentBuckets buckets(idx, rows * k, n);
    detail::scatter_impl(buckets, static_cast<const T*>(values), k, g, static_cast<const T*>(nullptr),
                         n, d, static_cast<T*>(dW_dec), static_cast<T*>(nullptr), /*accumulate=*/false);
    if (db_dec) {
      const std::vector<A> sums = detail::reduce_rows<A>(rows, d, [&](int64_t b, A* partial) {
        detail::axpy(partial, A(1), g + b * d, d);
      });
      T* o = static_cast<T*>(db_dec);
      for (int64_t t = 0; t < d; ++t) o[t] = store_acc<T>(sums[t]);
    }
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
    const T* dv = static_cast<const T*>(d_values);
    const T* v = static_cast<const T*>(values);
    const T* w = static_cast<const T*>(W_enc);
    const T* bd = static_cast<const T*>(b_dec);
    const int64_t count = rows * k;

    // d_pre: the relu gate of the k selected slots (a zero value had relu' = 0).
    std::vector<A> d_pre(static_cast<size_t>(count));
    for (int64_t p = 0; p < count; ++p)
      d_pre[p] = load<A>(v[p]) > A(0) ? load<A>(dv[p]) : A(0);

    // dW_enc[i] = sum d_pre (x[b] - b_dec); db_enc[i] = sum d_pre.
    const LatentBuckets buckets(idx, count, n);
    T* dwe = static_cast<T*>(dW_enc);
    T* dbe = static_cast<T*>(db_enc);
    detail::scatter_impl(buckets, d_pre.data(), k, static_cast<const T*>(x), bd, n, d, dwe, dbe,
                         /*accumulate=*/false);

    if (dx) {
      T* o = static_cast<T*>(dx);
#pragma omp parallel
      {
        std::vector<A> acc(static_cast<size_t>(d));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < rows; ++b) {
          std::fill(acc.begin(), acc.end(), A(0));
          detail::gather_into(acc.data(), d_pre.data() + b * k, idx + b * k, k, w, d);
          for (int64_t t = 0; t < d; ++t) o[b * d + t] = store_acc<T>(acc[t]);
        }
      }
    }
    if (db_dec) {
      // db_dec = -sum_b dx[b] = -sum_i db_enc[i] W_enc[i]: one axpy per touched latent instead of
      // one per (row, slot) pair, and it needs no dx.
      std::vector<A> per_latent(static_cast<size_t>(n), A(0));
      for (int64_t p = 0; p < count; ++p)
        if (idx[p] >= 0) per_latent[idx[p]] += d_pre[p];
      std::vector<int64_t> touched;
      for (int64_t i = 0; i < n; ++i)
        if (per_latent[i] != A(0)) touched.push_back(i);
      const std::vector<A> sums = detail::reduce_rows<A>(
          static_cast<int64_t>(touched.size()), d, [&](int64_t q, A* partial) {
            const int64_t i = touched[q];
            detail::axpy(partial, -per_latent[i], w + i * d, d);
          });
      T* o = static_cast<T*>(db_dec);
      for (int64_t t = 0; t < d; ++t) o[t] = store_acc<T>(sums[t]);
    }
    return 0;
  });
}

}  // namespace flashsae::cpu
