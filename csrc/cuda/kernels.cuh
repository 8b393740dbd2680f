// CUDA kernels of flashsae._C_cuda, launched by flashsae_cuda_api.cpp on the caller's stream.
// Same conventions as the CPU kernels (csrc/cpu/kernels.h): latent rows, int32 indices, -1 marks an
// empty slot, fp32 accumulation. Storage dtypes on CUDA: float32, bfloat16, float16.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashsae::cuda {

// x_hat[b] = b_dec + sum_j values[b, j] W_dec[idx[b, j]]   (b_dec may be null)
// An index outside [-1, n) is skipped and sets *error_flag = 1 (the caller reports it).
// Returns the launch status.
cudaError_t sparse_decode_forward(const void* values, const int32_t* idx, int64_t rows, int64_t k,
                                  const void* W_dec, int64_t n, int64_t d, const void* b_dec,
                                  void* x_hat, int32_t* error_flag, int dtype, cudaStream_t stream);

}  // namespace flashsae::cuda
