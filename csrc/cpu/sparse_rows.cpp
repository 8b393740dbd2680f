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
    detail::gather_rows(typed<T>(x_hat), typed<T>(values), idx, rows, k, typed<T>(W_dec), d, typed<T>(b_dec));
    return 0;
  });
}

void sparse_decode_backward(const void* grad, const void* values, const int32_t* idx, int64_t rows,
                            int64_t k, const void* W_dec, int64_t n, int64_t d, void* d_values,
                            void* dW_dec, void* db_dec, int dtype) {
  dispatch_float(dtype, "values", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* g = typed<T>(grad);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < rows; ++b)
      detail::dot_slots(typed<T>(d_values) + b * k, g + b * d, idx + b * k, k, typed<T>(W_dec), d);
    const LatentBuckets buckets(idx, rows * k, n);
    detail::scatter_impl(buckets, typed<T>(values), k, g, static_cast<const T*>(nullptr), n, d, typed<T>(dW_dec),
                         static_cast<T*>(nullptr), /*accumulate=*/false);
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
