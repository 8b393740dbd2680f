// CPU kernels of flashsae._C. Only flashsae_cpu_api.cpp calls these; it has already checked the
// sizes and the index ranges, so the kernels trust them.
//
// Conventions, shared with the CUDA and Triton kernels and the torch reference: rows of W_enc /
// W_dec are latents ([n, d], row-major); indices are int32; index -1 marks an empty slot (value
// ignored), which the aux top-k emits when fewer latents are dead than slots asked for. Every float tensor of one call shares the storage dtype `dtype`;
// accumulation is float32 (float64 for float64 storage).
#pragma once

#include <cstdint>

namespace flashsae::cpu {

// ---- running top-k over chunks of encoder scores (topk_encode.cpp) -------------------------------
// State: per row a min-heap of k (key, index) pairs, worst at the root. score_dtype (the heap's) is
// float32 or float64; the chunk itself may be any float dtype (chunk_dtype).

// Fills the heaps with sentinels (score -inf, index INT32_MAX) that every real candidate beats.
void topk_state_init(void* heap_scores, int32_t* heap_indices, int64_t rows, int64_t k, int score_dtype);

// Merges scores[rows, cols] (row stride ld, chunk_dtype) for latents col0 .. col0+cols-1 into the
// heaps, using relu(score + bias[col]) as the key (bias: [n] in score_dtype, or null); ties go to the
// lower latent index. Chunks must arrive in ascending col0. When aux_k > 0, latents with
// dead_mask[col] != 0 also enter a second heap of aux_k slots. With row_bound ([3, rows] float:
// p1, p2, z) and col_bound ([3, n] float: q1, q2, o), float32 heaps only, the key is instead relu of
// the upper bound a + rel |a| + p1 q1[col] + p2 q2[col] + z + o[col] of the exact score (a = score +
// bias[col]): the candidate pass of the certified precision.
void topk_state_merge(const void* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                      void* heap_scores, int32_t* heap_indices, int64_t k,
                      const uint8_t* dead_mask, void* aux_scores, int32_t* aux_indices, int64_t aux_k,
                      int score_dtype, int chunk_dtype, const void* bias, int64_t n,
                      const float* row_bound, const float* col_bound, double rel);

// Sorts each row (score descending, index ascending) and writes values in value_dtype. Sentinel
// slots (only possible in the aux heap) become value 0, index -1.
void topk_state_finish(const void* heap_scores, const int32_t* heap_indices, int64_t rows, int64_t k,
                       int score_dtype, void* values, int32_t* indices, int value_dtype);

// ---- canonical encoder scores (topk_rescore.cpp) --------------------------------------------------
// The exact score every precision of topk_encode returns, for float32/bfloat16/float16 operands:
//   score(b, j) = float32( dot64(x[b], W[j]) + bias64[j] ),  bias64[j] = b_enc[j] - dot64(b_dec, W[j])
// where dot64 sums the (exact) float64 products in 32 interleaved partial sums (lane = t mod 32)
// combined in a fixed tree: independent of threads, ISA and chunking.

// Per latent j in [0, n): bias64[j] (b_dec may be null), and upper bounds of the norms the certified
// key needs: with W_low (a copy of W rounded to low_dtype, written here), q1[j] >= |W_low[j]| +
// |W[j] - W_low[j]| and q2[j] >= |W[j] - W_low[j]|; without, q1[j] >= |W[j]| and q2[j] = 0.
void encoder_latent_stats(const void* W, const void* b_enc, const void* b_dec, int64_t n, int64_t d,
                          int dtype, double* bias64, float* q1, float* q2, void* W_low, int low_dtype);

// out[b, j] = score(b, idx[b * idx_ld + j]) (idx_ld 0: the same latents for every row), -inf where
// the index is outside [0, n) (empty heap slots). out is float32.
void topk_rescore(const void* x, const void* W, const double* bias64, const int32_t* idx,
                  int64_t idx_ld, int64_t rows, int64_t m, int64_t n, int64_t d, int dtype, float* out);

// ---- sparse decoder (sparse_rows.cpp) -------------------------------------------------------------
// x_hat[b] = b_dec + sum_j values[b, j] W_dec[idx[b, j]]   (b_dec may be null)
void sparse_decode_forward(const void* values, const int32_t* idx, int64_t rows, int64_t k,
                           const void* W_dec, int64_t n, int64_t d, const void* b_dec, void* x_hat,
                           int dtype);

// d_values[b, j] = grad[b] . W_dec[idx[b, j]]   (0 where idx = -1)
// dW_dec[i] = sum over pairs (b, j) with idx[b, j] = i of values[b, j] grad[b]   (every row written)
// db_dec = sum_b grad[b]   (if db_dec is not null)
// Race-free and deterministic: pairs are bucketed by latent (stable counting sort), and each latent
// row is summed by one thread in pair order.
void sparse_decode_backward(const void* grad, const void* values, const int32_t* idx, int64_t rows,
                            int64_t k, const void* W_dec, int64_t n, int64_t d, void* d_values,
                            void* dW_dec, void* db_dec, int dtype);

// ---- encoder backward (sparse_rows.cpp) -----------------------------------------------------------
// d_pre = d_values * [values > 0] over the k selected slots, then
//   dW_enc[i] = sum d_pre * (x[b] - b_dec), db_enc[i] = sum d_pre   (every row written)
//   dx[b] = sum_j d_pre[b, j] W_enc[idx[b, j]]   (if dx) and db_dec = -sum_b dx[b]  (if db_dec)
void topk_encode_backward(const void* d_values, const void* values, const int32_t* idx,
                          int64_t rows, int64_t k, const void* x, const void* b_dec,
                          const void* W_enc, int64_t n, int64_t d, void* dW_enc, void* db_enc,
                          void* dx, void* db_dec, int dtype);

// ---- fused reconstruction loss (sae_loss.cpp) -----------------------------------------------------
// Per row b: x_hat = b_dec + sum_j values W_dec[idx];  r = x_hat - x;  sse[b] = |r|^2;
// with aux slots: e_hat = sum_j aux_values W_dec[aux_idx];  aux_sse[b] = |e_hat - (x - x_hat)|^2.
// sse / aux_sse are float32 (float64 for float64 storage). x_hat - x is never stored.
void sae_loss_forward(const void* x, const void* values, const int32_t* idx, int64_t k,
                      const void* aux_values, const int32_t* aux_idx, int64_t aux_k,
                      const void* W_dec, const void* b_dec, int64_t rows, int64_t n, int64_t d,
                      void* x_hat, void* sse, void* aux_sse, int dtype);

// Gradients of sum_b (g_sse[b] sse[b] + g_aux[b] aux_sse[b]) + <g_xhat, x_hat>, with the aux target
// x - x_hat held constant (stop-gradient, as in AuxK). x_hat and e_hat are recomputed, not saved.
// g_xhat may be null; dx may be null (not wanted). Every other output is written in full.
void sae_loss_backward(const void* g_xhat, const void* g_sse, const void* g_aux, const void* x,
                       const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                       const int32_t* aux_idx, int64_t aux_k, const void* W_dec, const void* b_dec,
                       int64_t rows, int64_t n, int64_t d, void* d_values, void* d_aux_values,
                       void* dW_dec, void* db_dec, void* dx, int dtype);

// ---- fused sparse Adam (sparse_adam.cpp) ----------------------------------------------------------
// For each row r = rows[q] (sorted, unique): replay the min(gap, horizon) dense-Adam steps with zero
// gradient that r skipped since last_step[r] (gap = target - last_step[r], target = step - 1 with
// grads, step without; nothing when last_step[r] = 0), decay the moments over the rest of the gap,
// then (grads != null) apply step `step` with grads[q]. schedule[2j], schedule[2j + 1] =
// lr_j / (1 - beta1^j), sqrt(1 - beta2^j). Param dtype T, moments dtype S; math in Acc<T>. With a
// float32 master copy the weights are read from and written to it, and rounded into param.
// last_step[r] = step afterwards.
void sparse_adam(void* param, float* master, void* exp_avg, void* exp_avg_sq, int64_t* last_step,
                 const int64_t* rows, int64_t m, const void* grads, int64_t d, int64_t step,
                 const double* schedule, double beta1, double beta2, double eps, int64_t horizon,
                 int param_dtype, int state_dtype);

// ---- sparse Adam, row-wise second moment (sparse_adam_rowwise.cpp) --------------------------------
// As sparse_adam, with one second moment per row (exp_avg_sq: [n] Acc<T>, float or double) and a first
// moment that is absent (first_moment 0, beta1 = 0), float storage of dtype first_moment_dtype (1), or
// int8 codes with a float32 scale per row in exp_avg_scale (2). The skipped steps' drift is the first
// moment times a per-row scalar. last_step[r] = step afterwards.
void sparse_adam_rowwise(void* param, float* master, void* exp_avg, float* exp_avg_scale,
                         void* exp_avg_sq, int64_t* last_step, const int64_t* rows, int64_t m,
                         const void* grads, int64_t d, int64_t step, const double* schedule, double beta1,
                         double beta2, double eps, int64_t horizon, int param_dtype, int first_moment,
                         int first_moment_dtype);

}  // namespace flashsae::cpu
