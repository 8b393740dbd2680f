// Sparse row kernels on CUDA: the three row patterns of the sparse decoder and encoder backward.
//
// gather_rows   out[b] = bias + sum_j coef[b, j] W[idx[b, j]]            decoder forward; encoder dx
// dot_rows      out[b, j] = R[b] . W[idx[b, j]]                           d_values of decoder / loss
// scatter_rows  out[i] = sum over slots (b, j) with idx[b, j] = i of      dW_dec, dW_enc (+ db_enc)
//               coef[b, j] (R[b] - offset), in latent-sorted order
//
// All three read the k selected W rows per token with 16-byte loads (8 bf16 / 4 fp32 per load)
// when rows are 16-byte aligned, and accumulate in fp32. Their floor is that gather: k * d *
// sizeof(T) bytes per token (plus one dense [n, d] write for scatter_rows); nothing of size n is
// read except seg (n + 1 offsets).
//
// scatter_rows has no atomics: Python sorts the flat slot ids by latent (torch.sort, stable) and
// passes the sorted ids with each latent's segment [seg[i], seg[i + 1]). One block owns one latent
// row (one column tile of it) and sums its segment in slot order, so results are deterministic and
// every row of out is written, zeros where a latent has no slot.
#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"
#include "dtype_codes.h"

namespace flashsae::cuda {
namespace {

// ------------------------------------------------------------------------------- gather_rows
// One block per token row; each thread owns VEC consecutive columns (and loops when the row has
// more than blockDim * VEC of them). The row's slots are staged in shared memory (device_common.cuh).
template <typename T, typename O, int VEC>
__global__ void gather_rows_kernel(const T* __restrict__ coef, const T* __restrict__ gate,
                                   const int32_t* __restrict__ idx, int64_t k, const T* __restrict__ W, int64_t n,
                                   int64_t d, const T* __restrict__ bias, O* __restrict__ out,
                                   int32_t* __restrict__ error_flag) {
  __shared__ int32_t s_row[kSlots];
  __shared__ float s_coef[kSlots];
  const int64_t b = blockIdx.x;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t c_base = 0; c_base < d; c_base += step) {  // same trip count for every thread
    const int64_t c0 = c_base + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool active = c0 < d;
    float acc[VEC];
    load_n_or_zero<T, VEC>(bias, c0, active, acc);
    gather_row<T, VEC>(acc, active, coef, gate, idx, b, k, W, n, d, c0, s_row, s_coef, error_flag);
    if (active) store_n<O, VEC>(out + b * d + c0, acc);
  }
}

// --------------------------------------------------------------------------------- dot_rows
// One block of 8 warps per token row; warp w computes slots j = w, w + 8, ...: its lanes stride the
// columns in VEC-wide vectors of both W[idx] and R[b] (R[b] is re-read per slot from L1/L2: one
// row of d values), then a shuffle reduction.
template <typename T, typename R, int VEC>
__global__ void dot_rows_kernel(const R* __restrict__ Rm, const int32_t* __restrict__ idx, int64_t k,
                                const T* __restrict__ W, int64_t n, int64_t d, T* __restrict__ out,
                                int32_t* __restrict__ error_flag) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int n_warps = static_cast<int>(blockDim.x >> 5);
  const R* r_row = Rm + b * d;
  for (int64_t j = threadIdx.x >> 5; j < k; j += n_warps) {
    const int32_t i = __ldg(idx + b * k + j);
    const bool valid = i >= 0 && i < n;  // the same for the whole warp
    if (!valid && i != -1 && lane == 0) *error_flag = 1;
    float acc = 0.f;
    if (valid) {
      const T* w_row = W + static_cast<int64_t>(i) * d;
#pragma unroll 4
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < d; c0 += 32 * VEC) {
        float w[VEC], r[VEC];
        load_n<T, VEC>(w_row + c0, w);
        load_n<R, VEC>(r_row + c0, r);
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc = fmaf(w[u], r[u], acc);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) Elem<T>::store(out + b * k + j, acc);
  }
}

// ----------------------------------------------------------------------------- scatter_rows
// Grid (n, column tiles): block (i, t) writes columns [t * blockDim * VEC, ...) of out[i]. The
// segment's slots are staged kSlots at a time: the R row each one reads (R1 for slot columns
// j < main_slots, else R2) and its coefficient (gated). coef_sum[i] (when asked) is written by thread 0 of
// tile 0; every thread sums the same coefficients in the same order.
template <typename T, typename R, int VEC>
__global__ void scatter_rows_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ seg, int64_t k,
                                    int64_t main_slots, const T* __restrict__ coef, const T* __restrict__ gate,
                                    const R* __restrict__ R1, const R* __restrict__ R2, const T* __restrict__ offset,
                                    int64_t d, T* __restrict__ out, T* __restrict__ coef_sum) {
  __shared__ const R* s_src[kSlots];
  __shared__ float s_coef[kSlots];
  const int64_t i = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < d;
  const int64_t first = seg[i];
  const int64_t last = seg[i + 1];
  float off[VEC];
  load_n_or_zero<T, VEC>(offset, c0, active, off);
  float acc[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) acc[u] = 0.f;
  float csum = 0.f;
  for (int64_t p0 = first; p0 < last; p0 += kSlots) {  // same bounds for every thread of the block
    const int count = static_cast<int>(last - p0 < kSlots ? last - p0 : kSlots);
    __syncthreads();  // the previous chunk is no longer read
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
      const int64_t s = __ldg(order + p0 + t);  // flat slot id b * k + j
      const int64_t b = s / k;
      const int64_t j = s - b * k;
      float c = Elem<T>::load(coef + s);
      if (gate != nullptr && !(Elem<T>::load(gate + s) > 0.f)) c = 0.f;
      s_src[t] = (j < main_slots ? R1 : R2) + b * d;
      s_coef[t] = c;
    }
    __syncthreads();
    for (int t = 0; t < count; ++t) csum += s_coef[t];
    if (active) {
      int t = 0;
      for (; t + 4 <= count; t += 4) {  // four rows in flight
        float r0[VEC], r1[VEC], r2[VEC], r3[VEC];
        load_n<R, VEC>(s_src[t] + c0, r0);
        load_n<R, VEC>(s_src[t + 1] + c0, r1);
        load_n<R, VEC>(s_src[t + 2] + c0, r2);
        load_n<R, VEC>(s_src[t + 3] + c0, r3);
        const float a0 = s_coef[t], a1 = s_coef[t + 1], a2 = s_coef[t + 2], a3 = s_coef[t + 3];
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
          acc[u] = fmaf(a0, r0[u] - off[u], acc[u]);
          acc[u] = fmaf(a1, r1[u] - off[u], acc[u]);
          acc[u] = fmaf(a2, r2[u] - off[u], acc[u]);
          acc[u] = fmaf(a3, r3[u] - off[u], acc[u]);
        }
      }
      for (; t < count; ++t) {
        float r[VEC];
        load_n<R, VEC>(s_src[t] + c0, r);
        const float a = s_coef[t];
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] = fmaf(a, r[u] - off[u], acc[u]);
      }
    }
  }
  if (active) store_n<T, VEC>(out + i * d + c0, acc);
  if (coef_sum != nullptr && blockIdx.y == 0 && threadIdx.x == 0) Elem<T>::store(coef_sum + i, csum);
}

// --------------------------------------------------------------------------------- launchers

template <typename T, typename O>
cudaError_t launch_gather(const void* coef, const void* gate, const int32_t* idx, int64_t rows, int64_t k,
                          const void* W, int64_t n, int64_t d, const void* bias, void* out, int32_t* error_flag,
                          cudaStream_t stream) {
  // 16-byte accesses need every row start aligned: aligned bases and d a multiple of the vector
  // (then d * sizeof(O) is a multiple of 16 for O = float as well)
  const bool vector = d % kVec16<T> == 0 && aligned16(W) && aligned16(bias) && aligned16(out);
  return launch_vectorized<T>(vector, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    gather_rows_kernel<T, O, kVec><<<static_cast<unsigned>(rows), row_threads(d, kVec), 0, stream>>>(
        typed<T>(coef), typed<T>(gate), idx, k, typed<T>(W), n, d, typed<T>(bias), typed<O>(out), error_flag);
  });
}

template <typename T, typename R>
cudaError_t launch_dot(const void* Rm, const int32_t* idx, int64_t rows, int64_t k, const void* W, int64_t n,
                       int64_t d, void* out, int32_t* error_flag, cudaStream_t stream) {
  const bool vector = d % kVec16<T> == 0 && aligned16(W) && aligned16(Rm);
  return launch_vectorized<T>(vector, [&](auto vec) {
    dot_rows_kernel<T, R, decltype(vec)::value><<<static_cast<unsigned>(rows), 256, 0, stream>>>(
        typed<R>(Rm), idx, k, typed<T>(W), n, d, typed<T>(out), error_flag);
  });
}

template <typename T, typename R>
cudaError_t launch_scatter(const int64_t* order, const int64_t* seg, int64_t n, int64_t k, int64_t main_slots,
                           const void* coef, const void* gate, const void* R1, const void* R2, const void* offset,
                           int64_t d, void* out, void* coef_sum, cudaStream_t stream) {
  const bool vector = d % kVec16<T> == 0 && aligned16(R1) && aligned16(R2) && aligned16(offset) && aligned16(out);
  return launch_vectorized<T>(vector, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int threads = row_threads(d, kVec);
    const int64_t tiles = (d + static_cast<int64_t>(threads) * kVec - 1) / (static_cast<int64_t>(threads) * kVec);
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(tiles));  // tiles <= 65535: checked by the host
    scatter_rows_kernel<T, R, kVec><<<grid, threads, 0, stream>>>(order, seg, k, main_slots, typed<T>(coef),
                                                                   typed<T>(gate), typed<R>(R1), typed<R>(R2),
                                                                   typed<T>(offset), d, typed<T>(out),
                                                                   typed<T>(coef_sum));
  });
}

}  // namespace

cudaError_t gather_rows(const void* coef, const void* gate, const int32_t* idx, int64_t rows, int64_t k,
                        const void* W, int64_t n, int64_t d, const void* bias, void* out, bool out_fp32,
                        int32_t* error_flag, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (out_fp32) return launch_gather<T, float>(coef, gate, idx, rows, k, W, n, d, bias, out, error_flag, stream);
    return launch_gather<T, T>(coef, gate, idx, rows, k, W, n, d, bias, out, error_flag, stream);
  });
}

cudaError_t dot_rows(const void* R, bool r_fp32, const int32_t* idx, int64_t rows, int64_t k, const void* W, int64_t n,
                     int64_t d, void* out, int32_t* error_flag, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (r_fp32) return launch_dot<T, float>(R, idx, rows, k, W, n, d, out, error_flag, stream);
    return launch_dot<T, T>(R, idx, rows, k, W, n, d, out, error_flag, stream);
  });
}

cudaError_t scatter_rows(const int64_t* order, const int64_t* seg, int64_t n, int64_t k, int64_t main_slots,
                         const void* coef, const void* gate, const void* R1, const void* R2, bool r_fp32,
                         const void* offset, int64_t d, void* out, void* coef_sum, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (r_fp32)
      return launch_scatter<T, float>(order, seg, n, k, main_slots, coef, gate, R1, R2, offset, d, out, coef_sum,
                                      stream);
    return launch_scatter<T, T>(order, seg, n, k, main_slots, coef, gate, R1, R2, offset, d, out, coef_sum, stream);
  });
}

}  // namespace flashsae::cuda
