// Sparse decoder forward on CUDA: x_hat[b] = b_dec + sum_j values[b, j] W_dec[idx[b, j]].
//
// One block per token row; each thread owns VEC consecutive columns and walks the row's k slots,
// so every W_dec row is read with 16-byte loads (8 bf16 / 4 fp32 per load) and accumulated in
// fp32 registers. The k (index, value) pairs are read straight from global memory: all threads of
// the block read the same slot at once, which the L1 serves as a broadcast.
// Bytes that must move per row: k * d * sizeof(T) of W_dec rows; the kernel reads nothing else of
// size n, so its floor is that gather at HBM speed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/kernels.cuh"
#include "dtype_codes.h"

namespace flashsae::cuda {
namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// VEC elements of T, moved as one 16-byte (or smaller, for VEC = 1) transaction.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__global__ void sparse_decode_forward_kernel(const T* __restrict__ values,
                                             const int32_t* __restrict__ idx, int64_t k,
                                             const T* __restrict__ W, int64_t n, int64_t d,
                                             const T* __restrict__ bias, T* __restrict__ out,
                                             int32_t* __restrict__ error_flag) {
  const int64_t b = blockIdx.x;
  const T* row_values = values + b * k;
  const int32_t* row_idx = idx + b * k;
  for (int64_t c0 = int64_t(threadIdx.x) * VEC; c0 < d; c0 += int64_t(blockDim.x) * VEC) {
    float acc[VEC];
    if (bias != nullptr) {
      const Pack<T, VEC> bp = *reinterpret_cast<const Pack<T, VEC>*>(bias + c0);
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = to_f32(bp.v[u]);
    } else {
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = 0.f;
    }
    for (int64_t j = 0; j < k; ++j) {
      const int32_t i = __ldg(row_idx + j);
      if (i < 0 || i >= n) {
        if (i != -1) *error_flag = 1;  // benign race: every writer stores 1
        continue;
      }
      const float v = to_f32(row_values[j]);
      if (v == 0.f) continue;
      const Pack<T, VEC> wp = *reinterpret_cast<const Pack<T, VEC>*>(W + int64_t(i) * d + c0);
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = fmaf(v, to_f32(wp.v[u]), acc[u]);
    }
    Pack<T, VEC> op;
#pragma unroll
    for (int u = 0; u < VEC; ++u) op.v[u] = from_f32<T>(acc[u]);
    *reinterpret_cast<Pack<T, VEC>*>(out + b * d + c0) = op;
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

template <typename T>
cudaError_t launch(const void* values, const int32_t* idx, int64_t rows, int64_t k, const void* W,
                   int64_t n, int64_t d, const void* bias, void* out, int32_t* error_flag,
                   cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte loads need every row start aligned: base pointers aligned and d * sizeof(T) % 16 == 0.
  const bool vectorize = (d % kVec == 0) && aligned16(W) && aligned16(bias) && aligned16(out);
  const int64_t lanes = vectorize ? d / kVec : d;
  const int threads = static_cast<int>(lanes >= 256 ? 256 : ((lanes + 31) / 32) * 32);
  const dim3 grid(static_cast<unsigned>(rows));
  const T* v = static_cast<const T*>(values);
  const T* w = static_cast<const T*>(W);
  const T* bb = static_cast<const T*>(bias);
  T* o = static_cast<T*>(out);
  if (vectorize)
    sparse_decode_forward_kernel<T, kVec><<<grid, threads, 0, stream>>>(v, idx, k, w, n, d, bb, o, error_flag);
  else
    sparse_decode_forward_kernel<T, 1><<<grid, threads, 0, stream>>>(v, idx, k, w, n, d, bb, o, error_flag);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse_decode_forward(const void* values, const int32_t* idx, int64_t rows, int64_t k,
                                  const void* W_dec, int64_t n, int64_t d, const void* b_dec,
                                  void* x_hat, int32_t* error_flag, int dtype, cudaStream_t stream) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch<float>(values, idx, rows, k, W_dec, n, d, b_dec, x_hat, error_flag, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(values, idx, rows, k, W_dec, n, d, b_dec, x_hat, error_flag, stream);
    case DType::Float16:
      return launch<__half>(values, idx, rows, k, W_dec, n, d, b_dec, x_hat, error_flag, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace flashsae::cuda
