// Loads of LANES consecutive float32 / bfloat16 / float16 values into one GCC / Clang float vector
// (one AVX-512 register at 16 lanes; the narrower ISA clones split it). bf16 widens by a 16-bit shift,
// f16 by the compiler's conversion; the loads go through memcpy, so no alignment is assumed. Shared by
// the top-k merge (16 lanes) and the certified rescoring (8 lanes).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/dtype.h"

namespace flashsae::cpu {

template <int LANES>
struct VectorTypes {
  typedef float f32 __attribute__((vector_size(4 * LANES)));
  typedef uint16_t u16 __attribute__((vector_size(2 * LANES)));
  typedef uint32_t u32 __attribute__((vector_size(4 * LANES)));
  typedef _Float16 f16x __attribute__((vector_size(2 * LANES)));
};

template <int LANES>
inline __attribute__((always_inline)) typename VectorTypes<LANES>::f32 load_lanes(const float* p) {
  typename VectorTypes<LANES>::f32 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int LANES>
inline __attribute__((always_inline)) typename VectorTypes<LANES>::f32 load_lanes(const bf16* p) {
  typename VectorTypes<LANES>::u16 h;
  std::memcpy(&h, p, sizeof h);
  const typename VectorTypes<LANES>::u32 u = __builtin_convertvector(h, typename VectorTypes<LANES>::u32) << 16;
  typename VectorTypes<LANES>::f32 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

template <int LANES>
inline __attribute__((always_inline)) typename VectorTypes<LANES>::f32 load_lanes(const f16* p) {
  typename VectorTypes<LANES>::f16x h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, typename VectorTypes<LANES>::f32);
}

}  // namespace flashsae::cpu
