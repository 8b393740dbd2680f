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
// segment_rows over main + aux slots (dW_dec), and db_dec = sum_b G[b] (sparse_rows.cu).
#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"
#include "dtype_codes.h"

namespace flashsae::cuda {
namespace {

// Recomputes x_hat (from b_dec) and e_hat for the VEC columns at c0 of row b. Block-wide.
// error_flag[0] is raised by an out-of-range index in idx, error_flag[1] by one in aux_idx.
template <typename T, int VEC>
__device__ __forceinline__ void reconstruct(float (&xh)[VEC], float (&e)[VEC], bool active, const T* values,
                                            const int32_t* idx, int64_t k, const T* aux_values,
                                            const int32_t* aux_idx, int64_t aux_k, const T* W, const T* b_dec,
                                            int64_t n, int64_t d, int64_t b, int64_t c0, int32_t* s_row,
                                            float* s_coef, int32_t* error_flag) {
  if (active) {
    load_n<T, VEC>(b_dec + c0, xh);
  } else {
#pragma unroll
    for (int u = 0; u < VEC; ++u) xh[u] = 0.f;
  }
#pragma unroll
  for (int u = 0; u < VEC; ++u) e[u] = 0.f;
  gather_row<T, VEC>(xh, active, values, nullptr, idx, b, k, W, n, d, c0, s_row, s_coef, error_flag);
  if (aux_k > 0)  // aux indices raise their own flag
    gather_row<T, VEC>(e, active, aux_values, nullptr, aux_idx, b, aux_k, W, n, d, c0, s_row, s_coef, error_flag + 1);
}

template <typename T, int VEC>
__global__ void loss_forward_kernel(const T* __restrict__ x, const T* __restrict__ values,
                                    const int32_t* __restrict__ idx, int64_t k, const T* __restrict__ aux_values,
                                    const int32_t* __restrict__ aux_idx, int64_t aux_k, const T* __restrict__ W,
                                    const T* __restrict__ b_dec, int64_t n, int64_t d, T* __restrict__ x_hat,
                                    float* __restrict__ sse, float* __restrict__ aux_sse,
                                    int32_t* __restrict__ error_flag) {
  __shared__ int32_t s_row[kSlots];
  __shared__ float s_coef[kSlots];
  __shared__ float s_red[32];
  const int64_t b = blockIdx.x;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  float part = 0.f, part_aux = 0.f;
  for (int64_t c_base = 0; c_base < d; c_base += step) {  // same trip count for every thread
    const int64_t c0 = c_base + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool active = c0 < d;
    float xh[VEC], e[VEC];
    reconstruct<T, VEC>(xh, e, active, values, idx, k, aux_values, aux_idx, aux_k, W, b_dec, n, d, b, c0, s_row,
                        s_coef, error_flag);
    if (active) {
      float xv[VEC];
      load_n<T, VEC>(x + b * d + c0, xv);
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
    if (aux_k > 0) aux_sse[b] = total_aux;
  }
}

template <typename T, int VEC>
__global__ void loss_backward_rows_kernel(const T* __restrict__ g_xhat, const float* __restrict__ g_sse,
                                          const float* __restrict__ g_aux, const T* __restrict__ x,
                                          const T* __restrict__ values, const int32_t* __restrict__ idx, int64_t k,
                                          const T* __restrict__ aux_values, const int32_t* __restrict__ aux_idx,
                                          int64_t aux_k, const T* __restrict__ W, const T* __restrict__ b_dec,
                                          int64_t n, int64_t d, float* __restrict__ G, float* __restrict__ H,
                                          T* __restrict__ dx, int32_t* __restrict__ error_flag) {
  __shared__ int32_t s_row[kSlots];
  __shared__ float s_coef[kSlots];
  const int64_t b = blockIdx.x;
  const float gs = g_sse[b];
  const float ga = aux_k > 0 ? g_aux[b] : 0.f;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t c_base = 0; c_base < d; c_base += step) {
    const int64_t c0 = c_base + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool active = c0 < d;
    float xh[VEC], e[VEC];
    reconstruct<T, VEC>(xh, e, active, values, idx, k, aux_values, aux_idx, aux_k, W, b_dec, n, d, b, c0, s_row,
                        s_coef, error_flag);
    if (!active) continue;  // no barrier below
    float xv[VEC], gx[VEC];
    load_n<T, VEC>(x + b * d + c0, xv);
    if (g_xhat != nullptr) {
      load_n<T, VEC>(g_xhat + b * d + c0, gx);
    } else {
#pragma unroll
      for (int u = 0; u < VEC; ++u) gx[u] = 0.f;
    }
    float r[VEC], out[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      r[u] = xh[u] - xv[u];
      out[u] = fmaf(2.f * gs, r[u], gx[u]);
    }
    store_n<float, VEC>(G + b * d + c0, out);
    if (aux_k > 0) {
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

template <typename T>
cudaError_t launch_forward(const void* x, const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                           const int32_t* aux_idx, int64_t aux_k, const void* W, const void* b_dec, int64_t rows,
                           int64_t n, int64_t d, void* x_hat, float* sse, float* aux_sse, int32_t* error_flag,
                           cudaStream_t stream) {
  constexpr int kVec = kVec16<T>;
  const bool vector = d % kVec == 0 && aligned16(x) && aligned16(W) && aligned16(b_dec) && aligned16(x_hat);
  const dim3 grid(static_cast<unsigned>(rows));
  const T* xs = static_cast<const T*>(x);
  const T* v = static_cast<const T*>(values);
  const T* av = static_cast<const T*>(aux_values);
  const T* w = static_cast<const T*>(W);
  const T* bd = static_cast<const T*>(b_dec);
  T* xh = static_cast<T*>(x_hat);
  if (vector)
    loss_forward_kernel<T, kVec><<<grid, row_threads(d, kVec), 0, stream>>>(xs, v, idx, k, av, aux_idx, aux_k, w, bd,
                                                                            n, d, xh, sse, aux_sse, error_flag);
  else
    loss_forward_kernel<T, 1><<<grid, row_threads(d, 1), 0, stream>>>(xs, v, idx, k, av, aux_idx, aux_k, w, bd, n,
                                                                       d, xh, sse, aux_sse, error_flag);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_rows(const void* g_xhat, const float* g_sse, const float* g_aux, const void* x,
                                 const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                                 const int32_t* aux_idx, int64_t aux_k, const void* W, const void* b_dec, int64_t rows,
                                 int64_t n, int64_t d, float* G, float* H, void* dx, int32_t* error_flag,
                                 cudaStream_t stream) {
  constexpr int kVec = kVec16<T>;
  const bool vector = d % kVec == 0 && aligned16(x) && aligned16(W) && aligned16(b_dec) && aligned16(g_xhat) &&
                      aligned16(G) && aligned16(H) && aligned16(dx);
  const dim3 grid(static_cast<unsigned>(rows));
  const T* gx = static_cast<const T*>(g_xhat);
  const T* xs = static_cast<const T*>(x);
  const T* v = static_cast<const T*>(values);
  const T* av = static_cast<const T*>(aux_values);
  const T* w = static_cast<const T*>(W);
  const T* bd = static_cast<const T*>(b_dec);
  T* dxs = static_cast<T*>(dx);
  if (vector)
    loss_backward_rows_kernel<T, kVec><<<grid, row_threads(d, kVec), 0, stream>>>(
        gx, g_sse, g_aux, xs, v, idx, k, av, aux_idx, aux_k, w, bd, n, d, G, H, dxs, error_flag);
  else
    loss_backward_rows_kernel<T, 1><<<grid, row_threads(d, 1), 0, stream>>>(
        gx, g_sse, g_aux, xs, v, idx, k, av, aux_idx, aux_k, w, bd, n, d, G, H, dxs, error_flag);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sae_loss_forward(const void* x, const void* values, const int32_t* idx, int64_t k,
                             const void* aux_values, const int32_t* aux_idx, int64_t aux_k, const void* W_dec,
                             const void* b_dec, int64_t rows, int64_t n, int64_t d, void* x_hat, float* sse,
                             float* aux_sse, int32_t* error_flag, int dtype, cudaStream_t stream) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch_forward<float>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, rows, n, d, x_hat,
                                   sse, aux_sse, error_flag, stream);
    case DType::BFloat16:
      return launch_forward<__nv_bfloat16>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, rows, n, d,
                                           x_hat, sse, aux_sse, error_flag, stream);
    case DType::Float16:
      return launch_forward<__half>(x, values, idx, k, aux_values, aux_idx, aux_k, W_dec, b_dec, rows, n, d, x_hat,
                                    sse, aux_sse, error_flag, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t sae_loss_backward_rows(const void* g_xhat, const float* g_sse, const float* g_aux, const void* x,
                                   const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                                   const int32_t* aux_idx, int64_t aux_k, const void* W_dec, const void* b_dec,
                                   int64_t rows, int64_t n, int64_t d, float* G, float* H, void* dx,
                                   int32_t* error_flag, int dtype, cudaStream_t stream) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch_backward_rows<float>(g_xhat, g_sse, g_aux, x, values, idx, k, aux_values, aux_idx, aux_k, W_dec,
                                         b_dec, rows, n, d, G, H, dx, error_flag, stream);
    case DType::BFloat16:
      return launch_backward_rows<__nv_bfloat16>(g_xhat, g_sse, g_aux, x, values, idx, k, aux_values, aux_idx, aux_k,
                                                 W_dec, b_dec, rows, n, d, G, H, dx, error_flag, stream);
    case DType::Float16:
      return launch_backward_rows<__half>(g_xhat, g_sse, g_aux, x, values, idx, k, aux_values, aux_idx, aux_k, W_dec,
                                          b_dec, rows, n, d, G, H, dx, error_flag, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace flashsae::cuda
