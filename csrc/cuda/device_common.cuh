// Device helpers shared by the CUDA kernels of flashsae._C_cuda: element conversions, 16-byte
// vector loads and stores, warp and block reductions, the staging of a row's (latent, coefficient)
// slots in shared memory.
//
// Storage dtypes are float32, bfloat16 and float16; every kernel accumulates in fp32 and rounds once
// on store (round to nearest even, as torch does). Vector accesses move 16 bytes per instruction
// (4 fp32 or 8 bf16/fp16); elements are unpacked from the raw 32-bit words with bit operations
// (little-endian: element 0 of a word is its low half), never through type-punned class types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dtype_codes.h"

namespace flashsae::cuda {

// ------------------------------------------------------------------------------------ elements

template <typename T> struct Elem;

template <> struct Elem<float> {
  static constexpr int kPerWord = 1;  // elements per 32-bit word
  __device__ __forceinline__ static float get(uint32_t word, int) { return __uint_as_float(word); }
  __device__ __forceinline__ static uint32_t bits(float v) { return __float_as_uint(v); }
  __device__ __forceinline__ static uint32_t raw(float v) { return __float_as_uint(v); }
  __device__ __forceinline__ static float load(const float* p) { return __ldg(p); }
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
};

template <> struct Elem<__nv_bfloat16> {
  static constexpr int kPerWord = 2;
  // bf16 -> fp32 is exact: the bf16 bits are the upper half of the float
  __device__ __forceinline__ static float get(uint32_t word, int half) {
    return __uint_as_float(half ? (word & 0xffff0000u) : (word << 16));
  }
  __device__ __forceinline__ static uint32_t bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  __device__ __forceinline__ static uint32_t raw(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <> struct Elem<__half> {
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static float get(uint32_t word, int half) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(half ? (word >> 16) : (word & 0xffffu))));
  }
  __device__ __forceinline__ static uint32_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static uint32_t raw(__half v) { return __half_as_ushort(v); }
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(__ldg(p)); }
  __device__ __forceinline__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// Elements of T in one 16-byte vector.
template <typename T> constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// ------------------------------------------------------------------------ vector loads / stores
// load_n / store_n move N consecutive elements as floats. N == 1 is the scalar path (any
// alignment); otherwise N * sizeof(T) must be a multiple of 16 and p 16-byte aligned (the launchers
// check base pointers and row lengths before choosing the vector path).

template <typename T, int N> __device__ __forceinline__ void load_n(const T* p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = Elem<T>::load(p);
  } else {
    static_assert((N * sizeof(T)) % 16 == 0, "vector loads move whole 16-byte vectors");
    constexpr int kVectors = static_cast<int>(N * sizeof(T) / 16);
    constexpr int kPer = Elem<T>::kPerWord;
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      const uint4 u = __ldg(q + v);
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int h = 0; h < kPer; ++h) out[(v * 4 + w) * kPer + h] = Elem<T>::get(words[w], h);
      }
    }
  }
}

template <typename T, int N> __device__ __forceinline__ void store_n(T* p, const float (&in)[N]) {
  if constexpr (N == 1) {
    Elem<T>::store(p, in[0]);
  } else {
    static_assert((N * sizeof(T)) % 16 == 0, "vector stores move whole 16-byte vectors");
    constexpr int kVectors = static_cast<int>(N * sizeof(T) / 16);
    constexpr int kPer = Elem<T>::kPerWord;
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint32_t word = 0;
#pragma unroll
        for (int h = 0; h < kPer; ++h) word |= Elem<T>::bits(in[(v * 4 + w) * kPer + h]) << (16 * h);
        words[w] = word;
      }
      q[v] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// out = base[offset .. offset + N) for an active thread when base is given (an optional input may
// be null), else zeros.
template <typename T, int N>
__device__ __forceinline__ void load_n_or_zero(const T* base, int64_t offset, bool active, float (&out)[N]) {
  if (active && base != nullptr) {
    load_n<T, N>(base + offset, out);
  } else {
#pragma unroll
    for (int u = 0; u < N; ++u) out[u] = 0.f;
  }
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

// ---------------------------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `scratch` holds 32 floats of shared memory not used by anyone else during the call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = static_cast<int>(blockDim.x >> 5);
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < n_warps ? scratch[lane] : 0.f;
    total = warp_sum(total);
  }
  __syncthreads();  // scratch may be reused after the call
  return total;
}

// ------------------------------------------------------------------------------- slot staging
// A row's k (latent, coefficient) slots, staged kSlots at a time in shared memory so that every
// thread of the block reads them as broadcasts. An empty slot (-1), an out-of-range index (which
// also raises *error_flag) and a gated-off slot (gate <= 0) all become (row 0, coefficient 0): the
// gather loops stay branch-free, and row 0 exists (n >= 1) and is cached after its first read.

constexpr int kSlots = 256;

template <typename T>
__device__ __forceinline__ void stage_slots(const T* coef, const T* gate, const int32_t* idx, int64_t first,
                                            int count, int64_t n, int32_t* s_row, float* s_coef,
                                            int32_t* error_flag) {
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    const int64_t p = first + t;
    const int32_t i = __ldg(idx + p);
    const bool valid = i >= 0 && i < n;
    if (!valid && i != -1) *error_flag = 1;  // benign race: every writer stores 1
    float c = Elem<T>::load(coef + p);
    if (gate != nullptr && !(Elem<T>::load(gate + p) > 0.f)) c = 0.f;
    s_row[t] = valid ? i : 0;
    s_coef[t] = valid ? c : 0.f;
  }
}

// acc += sum over the staged slots of s_coef[j] * M[s_row[j], c0 .. c0 + VEC), four rows in flight.
template <typename T, int VEC>
__device__ __forceinline__ void accumulate_staged(float (&acc)[VEC], const int32_t* s_row, const float* s_coef,
                                                  int count, const T* M, int64_t d, int64_t c0) {
  int j = 0;
  for (; j + 4 <= count; j += 4) {
    float w0[VEC], w1[VEC], w2[VEC], w3[VEC];
    load_n<T, VEC>(M + static_cast<int64_t>(s_row[j]) * d + c0, w0);
    load_n<T, VEC>(M + static_cast<int64_t>(s_row[j + 1]) * d + c0, w1);
    load_n<T, VEC>(M + static_cast<int64_t>(s_row[j + 2]) * d + c0, w2);
    load_n<T, VEC>(M + static_cast<int64_t>(s_row[j + 3]) * d + c0, w3);
    const float a0 = s_coef[j], a1 = s_coef[j + 1], a2 = s_coef[j + 2], a3 = s_coef[j + 3];
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      acc[u] = fmaf(a0, w0[u], acc[u]);
      acc[u] = fmaf(a1, w1[u], acc[u]);
      acc[u] = fmaf(a2, w2[u], acc[u]);
      acc[u] = fmaf(a3, w3[u], acc[u]);
    }
  }
  for (; j < count; ++j) {
    float w[VEC];
    load_n<T, VEC>(M + static_cast<int64_t>(s_row[j]) * d + c0, w);
    const float a = s_coef[j];
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = fmaf(a, w[u], acc[u]);
  }
}

// Block-wide: acc += sum_j coef(row b, j) M[idx[b, j], c0 .. c0 + VEC) over all k slots of row b.
// Every thread of the block must call it (it synchronizes); threads with active == false only help
// stage. s_row / s_coef: kSlots entries of shared memory each.
template <typename T, int VEC>
__device__ __forceinline__ void gather_row(float (&acc)[VEC], bool active, const T* coef, const T* gate,
                                           const int32_t* idx, int64_t b, int64_t k, const T* M, int64_t n,
                                           int64_t d, int64_t c0, int32_t* s_row, float* s_coef,
                                           int32_t* error_flag) {
  for (int64_t j0 = 0; j0 < k; j0 += kSlots) {
    const int count = static_cast<int>(k - j0 < kSlots ? k - j0 : kSlots);
    __syncthreads();  // the previous chunk of slots (or a previous caller's) is no longer being read
    stage_slots(coef, gate, idx, b * k + j0, count, n, s_row, s_coef, error_flag);
    __syncthreads();
    if (active) accumulate_staged<T, VEC>(acc, s_row, s_coef, count, M, d, c0);
  }
}

// ---------------------------------------------------------------------------------- host side

// An untyped kernel argument seen as storage type T (const stays const).
template <typename T> inline const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T> inline T* typed(void* p) { return static_cast<T*>(p); }

// Calls f(T{}) with the CUDA storage type of a dtype code; cudaErrorInvalidValue for any other
// code (the host boundary has already refused those with a ValueError).
template <typename F> cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return f(float{});
    case DType::BFloat16:
      return f(__nv_bfloat16{});
    case DType::Float16:
      return f(__half{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Launches a row kernel with 16-byte vectors (VEC = kVec16<T> elements per thread) when `vector`,
// else element by element (VEC = 1): launch(std::integral_constant<int, VEC>{}) runs
// kernel<..., VEC><<<...>>>. Returns the launch status.
template <typename T, typename Launch> cudaError_t launch_vectorized(bool vector, Launch&& launch) {
  if (vector)
    launch(std::integral_constant<int, kVec16<T>>{});
  else
    launch(std::integral_constant<int, 1>{});
  return cudaGetLastError();
}

// Threads for a row kernel whose threads each own VEC of d columns: enough warps to cover the row
// once, at most 256.
inline int row_threads(int64_t d, int vec) {
  const int64_t lanes = (d + vec - 1) / vec;
  return static_cast<int>(lanes >= 256 ? 256 : ((lanes + 31) / 32) * 32);
}

}  // namespace flashsae::cuda
