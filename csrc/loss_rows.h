// The inputs every fused-loss kernel reads, typed: x, the main and aux (latent, value) slots, the
// decoder. Shared by cpu/sae_loss.cpp and cuda/sae_loss.cu (where it is passed to the kernels by
// value), so both backends read the same set under the same names.
#pragma once

#include <cstdint>

namespace flashsae {

template <typename T> struct LossRows {
  const T* x;               // [rows, d]
  const T* values;          // [rows, k]
  const int32_t* idx;       // [rows, k], -1 = empty slot
  int64_t k;
  const T* aux_values;      // [rows, aux_k] (null when aux_k = 0)
  const int32_t* aux_idx;   // [rows, aux_k]
  int64_t aux_k;
  const T* W_dec;           // [n, d]
  const T* b_dec;           // [d]
  int64_t n;
  int64_t d;
};

// The untyped boundary arguments as LossRows<T> (T: the storage type named by the dtype code).
template <typename T>
LossRows<T> loss_rows(const void* x, const void* values, const int32_t* idx, int64_t k, const void* aux_values,
                      const int32_t* aux_idx, int64_t aux_k, const void* W_dec, const void* b_dec, int64_t n,
                      int64_t d) {
  return {static_cast<const T*>(x), static_cast<const T*>(values), idx, k, static_cast<const T*>(aux_values),
          aux_idx, aux_k, static_cast<const T*>(W_dec), static_cast<const T*>(b_dec), n, d};
}

}  // namespace flashsae
