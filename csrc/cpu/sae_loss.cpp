// Fused decoder + reconstruction loss + AuxK on CPU (the CPU half of flashsae.ops.sae_loss).
//
// Forward, per row in one pass: x_hat = b_dec + sum_j values W_dec[idx]; sse = |x_hat - x|^2; and
// with aux slots e_hat = sum_j aux_values W_dec[aux_idx], aux_sse = |e_hat - (x - x_hat)|^2.
// The residual x_hat - x lives only in registers/scratch, never in memory.
// Backward recomputes x_hat and e_hat from the inputs (k + aux_k row gathers per token, the same
// work as the forward) instead of saving two [rows, d] tensors for autograd.
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/sparse_rows_impl.h"

namespace flashsae::cpu {

using detail::gather_into;
using detail::LatentBuckets;

namespace {

// acc = b_dec + sum_j values W_dec[idx]  (row b), and r = acc - x
template <typename A, typename T>
inline void reconstruct_row(A* acc, const T* values, const int32_t* idx, int64_t k, const T* W_dec,
                            const T* b_dec, int64_t d) {
  for (int64_t t = 0; t < d; ++t) acc[t] = load<A>(b_dec[t]);
  gather_into(acc, values, idx, k, W_dec, d);
}

template <typename A, typename T>
inline void aux_row(A* ehat, const T* aux_values, const int32_t* aux_idx, int64_t aux_k,
                    const T* W_dec, int64_t d) {
  std::fill(ehat, ehat + d, A(0));
  gather_into(ehat, aux_values, aux_idx, aux_k, W_dec, d);
}

}  // namespace

void sae_loss_forward(const void* x, const void* values, const int32_t* idx, int64_t k,
                      const void* aux_values, const int32_t* aux_idx, int64_t aux_k,
                      const void* W_dec, const void* b_dec, int64_t rows, int64_t n, int64_t d,
                      void* x_hat, void* sse, void* aux_sse, int dtype) {
  (void)n;
  dispatch_float(dtype, "x", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* xs = static_cast<const T*>(x);
    const T* v = static_cast<const T*>(values);
    const T* av = static_cast<const T*>(aux_values);
    const T* w = static_cast<const T*>(W_dec);
    const T* bd = static_cast<const T*>(b_dec);
    T* xh = static_cast<T*>(x_hat);
    A* sse_out = static_cast<A*>(sse);
    A* aux_out = static_cast<A*>(aux_sse);
#pragma omp parallel
    {
      std::vector<A> acc(static_cast<size_t>(d)), ehat(static_cast<size_t>(aux_k > 0 ? d : 0));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < rows; ++b) {
        reconstruct_row(acc.data(), v + b * k, idx + b * k, k, w, bd, d);
        A s = 0;
        for (int64_t t = 0; t < d; ++t) {
          const A r = acc[t] - load<A>(xs[b * d + t]);
          s += r * r;
          xh[b * d + t] = store_acc<T>(acc[t]);
        }
        sse_out[b] = s;
        if (aux_k > 0) {
          aux_row(ehat.data(), av + b * aux_k, aux_idx + b * aux_k, aux_k, w, d);
          A sa = 0;
          for (int64_t t = 0; t < d; ++t) {
            const A diff = ehat[t] + (acc[t] - load<A>(xs[b * d + t]));  // e_hat - (x - x_hat)
            sa += diff * diff;
          }
          aux_out[b] = sa;
        }
      }
    }
    return 0;
  });
}

void sae_loss_backward(const void* g_xhat, const void* g_sse, const void* g_aux, const void* x,
                       const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                       const int32_t* aux_idx, int64_t aux_k, const void* W_dec, const void* b_dec,
                       int64_t rows, int64_t n, int64_t d, void* d_values, void* d_aux_values,
                       void* dW_dec, void* db_dec, void* dx, int dtype) {
  dispatch_float(dtype, "x", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const T* gx = static_cast<const T*>(g_xhat);
    const A* gs = static_cast<const A*>(g_sse);
    const A* ga = static_cast<const A*>(g_aux);
    const T* xs = static_cast<const T*>(x);
    const T* v = static_cast<const T*>(values);
    const T* av = static_cast<const T*>(aux_values);
    const T* w = static_cast<const T*>(W_dec);
    const T* bd = static_cast<const T*>(b_dec);
    T* dv = static_cast<T*>(d_values);
    T* dav = static_cast<T*>(d_aux_values);
    T* dxo = static_cast<T*>(dx);

    // G[b] = d loss / d x_hat[b];  H[b] = d loss / d e_hat[b]  (float32 scratch, rows x d each)
    std::vector<A> G(static_cast<size_t>(rows * d));
    std::vector<A> H(static_cast<size_t>(aux_k > 0 ? rows * d : 0));
#pragma omp parallel
    {
      std::vector<A> acc(static_cast<size_t>(d)), ehat(static_cast<size_t>(aux_k > 0 ? d : 0));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < rows; ++b) {
        reconstruct_row(acc.data(), v + b * k, idx + b * k, k, w, bd, d);
        A* g = G.data() + b * d;
        const A two_gs = A(2) * gs[b];
        for (int64_t t = 0; t < d; ++t) {
          const A r = acc[t] - load<A>(xs[b * d + t]);
          acc[t] = r;  // keep the residual for the aux term below
          g[t] = (gx ? load<A>(gx[b * d + t]) : A(0)) + two_gs * r;
          if (dxo) dxo[b * d + t] = store_acc<T>(-two_gs * r);
        }
        for (int64_t j = 0; j < k; ++j) {
          const int32_t i = idx[b * k + j];
          dv[b * k + j] = store_acc<T>(i < 0 ? A(0) : detail::dot<A>(g, w + int64_t(i) * d, d));
        }
        if (aux_k > 0) {
          aux_row(ehat.data(), av + b * aux_k, aux_idx + b * aux_k, aux_k, w, d);
          A* h = H.data() + b * d;
          const A two_ga = A(2) * ga[b];
          for (int64_t t = 0; t < d; ++t) h[t] = two_ga * (ehat[t] + acc[t]);
          for (int64_t j = 0; j < aux_k; ++j) {
            const int32_t i = aux_idx[b * aux_k + j];
            dav[b * aux_k + j] =
                store_acc<T>(i < 0 ? A(0) : detail::dot<A>(h, w + int64_t(i) * d, d));
          }
        }
      }
    }

    // db_dec = sum_b G[b]  (e_hat has no bias)
    const std::vector<A> sums = detail::reduce_rows<A>(rows, d, [&](int64_t b, A* partial) {
      const A* g = G.data() + b * d;
      for (int64_t t = 0; t < d; ++t) partial[t] += g[t];
    });
    T* dbd = static_cast<T*>(db_dec);
    for (int64_t t = 0; t < d; ++t) dbd[t] = store_acc<T>(sums[t]);

    // dW_dec[i] = sum values G[b] over main pairs + sum aux_values H[b] over aux pairs
    T* dw = static_cast<T*>(dW_dec);
    const LatentBuckets main_buckets(idx, rows * k, n);
    detail::scatter_impl(main_buckets, v, k, G.data(), static_cast<const T*>(nullptr), n, d, dw,
                         static_cast<T*>(nullptr), /*accumulate=*/false);
    if (aux_k > 0) {
      const LatentBuckets aux_buckets(aux_idx, rows * aux_k, n);
      detail::scatter_impl(aux_buckets, av, aux_k, H.data(), static_cast<const T*>(nullptr), n, d,
                           dw, static_cast<T*>(nullptr), /*accumulate=*/true);
    }
    return 0;
  });
}

}  // namespace flashsae::cpu
