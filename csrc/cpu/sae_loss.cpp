// Fused decoder + reconstruction loss + AuxK on CPU (the CPU half of flashsae.ops.sae_loss).
//
// Forward, per row in one pass: x_hat = b_dec + sum_j values W_dec[idx]; sse = |x_hat - x|^2; and
// with aux slots e_hat = sum_j aux_values W_dec[aux_idx], aux_sse = |e_hat - (x - x_hat)|^2.
// The residual x_hat - x lives only in registers/scratch, never in memory.
// Backward recomputes x_hat and e_hat from the inputs (k + aux_k row gathers per token, the same
// work as the forward) instead of saving two [rows, d] tensors for autograd.
#include <algorithm>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/sparse_rows_impl.h"
#include "loss_rows.h"

namespace flashsae::cpu {

using detail::LatentBuckets;

namespace {

// For every row b, in parallel: fn(b, x_hat, e_hat) with x_hat = b_dec + sum_j values W_dec[idx]
// and (with aux slots) e_hat = sum_j aux_values W_dec[aux_idx], both in per-thread Acc<T> rows
// that fn may overwrite.
template <typename T, typename Fn> void for_each_row(const LossRows<T>& in, int64_t rows, Fn&& fn) {
  using A = Acc<T>;
  const int64_t d = in.d;
#pragma omp parallel
  {
    std::vector<A> xhat(static_cast<size_t>(d)), ehat(static_cast<size_t>(in.aux_k > 0 ? d : 0));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t t = 0; t < d; ++t) xhat[t] = load<A>(in.b_dec[t]);
      detail::gather_into(xhat.data(), in.values + b * in.k, in.idx + b * in.k, in.k, in.W_dec, d);
      if (in.aux_k > 0) {
        std::fill(ehat.begin(), ehat.end(), A(0));
        detail::gather_into(ehat.data(), in.aux_values + b * in.aux_k, in.aux_idx + b * in.aux_k, in.aux_k, in.W_dec,
                            d);
      }
      fn(b, xhat.data(), ehat.data());
    }
  }
}

}  // namespace

void sae_loss_forward(const void* x, const void* values, const int32_t* idx, int64_t k,
                      const void* aux_values, const int32_t* aux_idx, int64_t aux_k,
                      const void* W_dec, const void* b_dec, int64_t rows, int64_t n, int64_t d,
                      void* x_hat, void* sse, void* aux_sse, int dtype) {
  dispatch_float(dtype, "x", [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const auto in = loss_rows<T>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, n, d);
    T* xh_out = typed<T>(x_hat);
    A* sse_out = static_cast<A*>(sse);
    A* aux_out = static_cast<A*>(aux_sse);
    for_each_row(in, rows, [&](int64_t b, const A* xh, const A* ehat) {
      const T* xb = in.x + b * d;
      A s = 0;
      for (int64_t t = 0; t < d; ++t) {
        const A r = xh[t] - load<A>(xb[t]);
        s += r * r;
        xh_out[b * d + t] = store_acc<T>(xh[t]);
      }
      sse_out[b] = s;
      if (aux_k > 0) {
        A sa = 0;
        for (int64_t t = 0; t < d; ++t) {
          const A diff = ehat[t] + (xh[t] - load<A>(xb[t]));  // e_hat - (x - x_hat)
          sa += diff * diff;
        }
        aux_out[b] = sa;
      }
    });
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
    const auto in = loss_rows<T>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, n, d);
    const T* gx = typed<T>(g_xhat);
    const A* gs = static_cast<const A*>(g_sse);
    const A* ga = static_cast<const A*>(g_aux);
    T* dxo = typed<T>(dx);

    // G[b] = d loss / d x_hat[b];  H[b] = d loss / d e_hat[b]  (float32 scratch, rows x d each)
    std::vector<A> G(static_cast<size_t>(rows * d));
    std::vector<A> H(static_cast<size_t>(aux_k > 0 ? rows * d : 0));
    for_each_row(in, rows, [&](int64_t b, A* residual, const A* ehat) {
      A* g = G.data() + b * d;
      const A two_gs = A(2) * gs[b];
      for (int64_t t = 0; t < d; ++t) {
        const A r = residual[t] - load<A>(in.x[b * d + t]);
        residual[t] = r;  // x_hat - x, kept for the aux term below
        g[t] = (gx ? load<A>(gx[b * d + t]) : A(0)) + two_gs * r;
        if (dxo) dxo[b * d + t] = store_acc<T>(-two_gs * r);
      }
      detail::dot_slots(typed<T>(d_values) + b * k, g, idx + b * k, k, in.W_dec, d);
      if (aux_k > 0) {
        A* h = H.data() + b * d;
        const A two_ga = A(2) * ga[b];
        for (int64_t t = 0; t < d; ++t) h[t] = two_ga * (ehat[t] + residual[t]);
        detail::dot_slots(typed<T>(d_aux_values) + b * aux_k, h, aux_idx + b * aux_k, aux_k, in.W_dec, d);
      }
    });

    // db_dec = sum_b G[b]  (e_hat has no bias)
    detail::store_sum(typed<T>(db_dec), rows, d,
                      [&](int64_t b, A* partial) { detail::axpy(partial, A(1), G.data() + b * d, d); });

    // dW_dec[i] = sum values G[b] over main pairs + sum aux_values H[b] over aux pairs
    const auto scatter = [&](const T* coef, const int32_t* slots, int64_t width, const A* R, bool accumulate) {
      const LatentBuckets buckets(slots, rows * width, n);
      detail::scatter_impl(buckets, coef, width, R, static_cast<const T*>(nullptr), n, d, typed<T>(dW_dec),
                           static_cast<T*>(nullptr), accumulate);
    };
    scatter(in.values, idx, k, G.data(), /*accumulate=*/false);
    if (aux_k > 0) scatter(in.aux_values, aux_idx, aux_k, H.data(), /*accumulate=*/true);
    return 0;
  });
}

}  // namespace flashsae::cpu
