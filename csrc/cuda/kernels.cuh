// CUDA kernels of flashsae._C_cuda, launched by flashsae_cuda_api.cpp on the caller's stream.
// Same conventions as the CPU kernels (csrc/cpu/kernels.h): latent rows ([n, d], row-major), int32
// indices, -1 marks an empty slot, fp32 accumulation. Storage dtypes on CUDA: float32, bfloat16,
// float16 (`dtype` is a dtype_codes.h code). The host boundary has checked every size and address;
// the kernels trust them, except index values, which they range-check where they read them: an
// index outside [-1, n) is skipped (treated as empty) and sets *error_flag = 1 for the caller.
// Each function returns the status of its launches (cudaGetLastError after each one).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashsae::cuda {

// ---- top-k select over wide rows (topk_encode.cu) -------------------------------------------------
// Merges scores[rows, cols] (row stride ld, dtype score_dtype) for latents col0 .. col0 + cols - 1
// into the per-row select state [rows, k] (uint64 keys, topk_keys.h; all 0 = empty initially). The
// key of a score s is built from s + bias[latent] (bias: fp32, indexed by latent, may be null),
// relu'd when `relu`. With aux_k > 0, latents with dead_mask[latent] != 0 also enter the aux state
// [rows, aux_k]. k, aux_k <= topk::kMaxK; col0 + cols <= 2^31 - 1.
cudaError_t topk_select(const void* scores, int score_dtype, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                        const float* bias, bool relu, uint64_t* state, int k, const uint8_t* dead_mask,
                        uint64_t* aux_state, int aux_k, cudaStream_t stream);

// Sorts each row's state (best first: larger score, then lower latent) into values[rows, k]
// (value_dtype) and indices[rows, k]; empty keys give value 0 and index -1.
cudaError_t topk_finish(const uint64_t* state, int64_t rows, int k, void* values, int32_t* indices, int value_dtype,
                        cudaStream_t stream);

// Scores per slice and candidate-buffer capacity of the select kernel (for the host mirror's tests).
int topk_select_slice();
int topk_select_capacity();

// ---- sparse rows (sparse_rows.cu) ------------------------------------------------------------------
// out[b] = bias + sum_j c[b, j] W[idx[b, j]], c = coef * [gate > 0] (gate and bias may be null).
// out is fp32 when out_fp32, else dtype.
cudaError_t gather_rows(const void* coef, const void* gate, const int32_t* idx, int64_t rows, int64_t k,
                        const void* W, int64_t n, int64_t d, const void* bias, void* out, bool out_fp32,
                        int32_t* error_flag, int dtype, cudaStream_t stream);

// out[b, j] = R[b] . W[idx[b, j]] (0 for an empty slot); R is fp32 when r_fp32, else dtype.
cudaError_t dot_rows(const void* R, bool r_fp32, const int32_t* idx, int64_t rows, int64_t k, const void* W, int64_t n,
                     int64_t d, void* out, int32_t* error_flag, int dtype, cudaStream_t stream);

// For every latent i < n: out[i] = sum over p in [seg[i], seg[i + 1]) of c[s] (R(s)[b] - offset),
// s = order[p] = b * k + j a flat slot id, c = coef * [gate > 0], R(s) = R1 if j < main_slots else R2;
// coef_sum[i] = sum of those c (if coef_sum). order / seg: int64, from a stable sort by latent.
// Every row of out is written. offset, gate, R2 and coef_sum may be null.
cudaError_t scatter_rows(const int64_t* order, const int64_t* seg, int64_t n, int64_t k, int64_t main_slots,
                         const void* coef, const void* gate, const void* R1, const void* R2, bool r_fp32,
                         const void* offset, int64_t d, void* out, void* coef_sum, int dtype, cudaStream_t stream);

// ---- fused loss (sae_loss.cu) ----------------------------------------------------------------------
// Per row: x_hat = b_dec + sum_j values W_dec[idx]; sse = |x_hat - x|^2; with aux_k > 0,
// aux_sse = |e_hat + x_hat - x|^2, e_hat = sum_j aux_values W_dec[aux_idx]. sse, aux_sse: fp32.
// Both loss functions take two flags: error_flag[0] for idx, error_flag[1] for aux_idx.
cudaError_t sae_loss_forward(const void* x, const void* values, const int32_t* idx, int64_t k,
                             const void* aux_values, const int32_t* aux_idx, int64_t aux_k, const void* W_dec,
                             const void* b_dec, int64_t rows, int64_t n, int64_t d, void* x_hat, float* sse,
                             float* aux_sse, int32_t* error_flag, int dtype, cudaStream_t stream);

// Per row, with r = x_hat - x recomputed: G = 2 g_sse r + g_xhat (g_xhat may be null);
// H = 2 g_aux (e_hat + r) when aux_k > 0; dx = -2 g_sse r when dx is not null. G, H: fp32 [rows, d].
cudaError_t sae_loss_backward_rows(const void* g_xhat, const float* g_sse, const float* g_aux, const void* x,
                                   const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                                   const int32_t* aux_idx, int64_t aux_k, const void* W_dec, const void* b_dec,
                                   int64_t rows, int64_t n, int64_t d, float* G, float* H, void* dx,
                                   int32_t* error_flag, int dtype, cudaStream_t stream);

}  // namespace flashsae::cuda
