// Fused reconstruction loss on CUDA: the row kernels of flashsae.ops.sae_loss's cuda backend.
//
// Forward, one block per token row b, in one pass over its k (+ aux_k) decoder rows:
//   x_hat = b_dec + sum_j values[j] W_dec[idx[j]]        (written, rounded once)
//   sse[b] = |x_hat - x|^2                               (fp32, from the unrounded x_hat)
//   aux_sse[b] = |e_hat + (x_hat - x)|^2, e_hat = sum_j aux_values[j] W_dec[aux_idx[j]]
// The residual lives in registers only.
// Backward rows: the same gathers again (x_hat and e_hat are recomputed, not saved), then
//   G[b] = 2 g_sse[b] (x_hat - x) + g_x_hat[b]        H[b] = 2 g_aux[b] (e_hat + x_hat - x)
//   dx[b] = -2 g_sse[b] (x_hat - x)                   (the AuxK target x - x_hat is held constant)
// in fp32 ([rows, d] each); Python then runs dot_rows (d_values from G, d_aux_values from H) and one
// scatter_rows over main + aux slots (dW_dec), and db_dec = sum_b G[b] (sparse_rows.cu).
#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"
#include "dtype_codes.h"
#include "loss_rows.h"

namespace flashsae::cuda {
namespace {

// Recomputes x_hat (from b_dec) and e_hat for the VEC columns at c0 of row b. Block-wide.
// error_flag[0] is raised by an out-of-range index in idx, error_flag[1] by one in aux_idx.
template <typename T, int VEC>
__device__ __forceinline__ void reconstruct(float (&xh)[VEC], float (&e)[VEC], bool active, const LossRows<T>& in,
                                            int64_t b, int64_t c0, int32_t* s_row, float* s_coef,
                                            int32_t* error_flag) {
  load_n_or_zero<T, VEC>(in.b_dec, c0, active, xh);
#pragma unroll
  for (int u = 0; u < VEC; ++u) e[u] = 0.f;
  gather_row<T, VEC>(xh, active, in.values, nullptr, in.idx, b, in.k, in.W_dec, in.n, in.d, c0, s_row, s_coef,
                     error_flag);
  if (in.aux_k > 0)  // aux indices raise their own flag
    gather_row<T, VEC>(e, active, in.aux_values, nullptr, in.aux_idx, b, in.aux_k, in.W_dec, in.n, in.d, c0, s_row,
                       s_coef, error_flag + 1);
}

template <typename T, int VEC>
__global__ void loss_forward_kernel(const LossRows<T> in, T* __restrict__ x_hat, float* __restrict__ sse,
                                    float* __restrict__ aux_sse, int32_t* __restrict__ error_flag) {
  __shared__ int32_t s_row[kSlots];
  __shared__ float s_coef[kSlots];
  __shared__ float s_red[32];
  const int64_t b = blockIdx.x;
  const int64_t d = in.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  float part = 0.f, part_aux = 0.f;
  for (int64_t c_base = 0; c_base < d; c_base += step) {  // same trip count for every thread
    const int64_t c0 = c_base + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool active = c0 < d;
    float xh[VEC], e[VEC];
    reconstruct<T, VEC>(xh, e, active, in, b, c0, s_row, s_coef, error_flag);
    if (active) {
      float xv[VEC];
      load_n<T, VEC>(in.x + b * d + c0, xv);
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        const float r = xh[u] - xv[u];
        part = fmaf(r, r, part);
        const float q = e[u] + r;  // e_hat - (x - x_hat)
        part_aux = fmaf(q, q, part_aux);
      }
      store_n<T, VEC>(x_hat + b * d + c0, xh);
    }
  }
  const float total = block_sum(part, s_red);
  const float total_aux = block_sum(part_aux, s_red);
  if (threadIdx.x == 0) {
    sse[b] = total;
    if (in.aux_k > 0) aux_sse[b] = total_aux;
  }
}

template <typename T, int VEC>
__global__ void loss_backward_rows_kernel(const LossRows<T> in, const T* __restrict__ g_xhat,
                                          const float* __restrict__ g_sse, const float* __restrict__ g_aux,
                                          float* __restrict__ G, float* __restrict__ H, T* __restrict__ dx,
                                          int32_t* __restrict__ error_flag) {
  __shared__ int32_t s_row[kSlots];
  __shared__ float s_coef[kSlots];
  const int64_t b = blockIdx.x;
  const int64_t d = in.d;
  const float gs = g_sse[b];
  const float ga = in.aux_k > 0 ? g_aux[b] : 0.f;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t c_base = 0; c_base < d; c_base += step) {
    const int64_t c0 = c_base + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool active = c0 < d;
    float xh[VEC], e[VEC];
    reconstruct<T, VEC>(xh, e, active, in, b, c0, s_row, s_coef, error_flag);
    if (!active) continue;  // no barrier below
    float xv[VEC], gx[VEC];
    load_n<T, VEC>(in.x + b * d + c0, xv);
    load_n_or_zero<T, VEC>(g_xhat, b * d + c0, true, gx);
    float r[VEC], out[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      r[u] = xh[u] - xv[u];
      out[u] = fmaf(2.f * gs, r[u], gx[u]);
    }
    store_n<float, VEC>(G + b * d + c0, out);
    if (in.aux_k > 0) {
#pragma unroll
      for (int u = 0; u < VEC; ++u) out[u] = 2.f * ga * (e[u] + r[u]);
      store_n<float, VEC>(H + b * d + c0, out);
    }
    if (dx != nullptr) {
#pragma unroll
      for (int u = 0; u < VEC; ++u) out[u] = -2.f * gs * r[u];
      store_n<T, VEC>(dx + b * d + c0, out);
    }
  }
}

}  // namespace

cudaError_t sae_loss_forward(const void* x, const void* values, const int32_t* idx, int64_t k,
                             const void* aux_values, const int32_t* aux_idx, int64_t aux_k, const void* W_dec,
                             const void* b_dec, int64_t rows, int64_t n, int64_t d, void* x_hat, float* sse,
                             float* aux_sse, int32_t* error_flag, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto in = loss_rows<T>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, n, d);
    const bool vector = d % kVec16<T> == 0 && aligned16(x) && aligned16(W_dec) && aligned16(b_dec) &&
                        aligned16(x_hat);
    return launch_vectorized<T>(vector, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      loss_forward_kernel<T, kVec><<<static_cast<unsigned>(rows), row_threads(d, kVec), 0, stream>>>(
          in, typed<T>(x_hat), sse, aux_sse, error_flag);
    });
  });
}

cudaError_t sae_loss_backward_rows(const void* g_xhat, const float* g_sse, const float* g_aux, const void* x,
                                   const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                                   const int32_t* aux_idx, int64_t aux_k, const void* W_dec, const void* b_dec,
                                   int64_t rows, int64_t n, int64_t d, float* G, float* H, void* dx,
                                   int32_t* error_flag, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto in = loss_rows<T>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, n, d);
    const bool vector = d % kVec16<T> == 0 && aligned16(x) && aligned16(W_dec) && aligned16(b_dec) &&
                        aligned16(g_xhat) && aligned16(G) && aligned16(H) && aligned16(dx);
    return launch_vectorized<T>(vector, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      loss_backward_rows_kernel<T, kVec><<<static_cast<unsigned>(rows), row_threads(d, kVec), 0, stream>>>(
          in, typed<T>(g_xhat), g_sse, g_aux, G, H, typed<T>(dx), error_flag);
    });
  });
}

}  // namespace flashsae::cuda
