// Element types of the CPU kernels. No torch header is included, so one build of flashsae._C
// works with any torch version.
//
// Python passes a dtype code (dtype_codes.h) next to every address. Storage types are float,
// double, bf16 and f16; every kernel accumulates in Acc<T> (float, or double for double storage)
// and rounds once on store.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dtype_codes.h"

namespace flashsae {

// bfloat16: the upper half of an IEEE float. Conversion to float is a shift, which is why bf16
// rows gather as fast as fp32 rows here.
struct bf16 {
  uint16_t bits;
};

inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16 bf16_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (as torch does)
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// float16: the compiler's _Float16 where it has one (GCC >= 12 and Clang on x86-64 and aarch64),
// whose conversions are IEEE round-to-nearest-even like torch's.
#if defined(__FLT16_MAX__)
struct f16 {
  _Float16 value;
};
inline float to_float(f16 v) { return static_cast<float>(v.value); }
inline f16 f16_from_float(float f) { return f16{static_cast<_Float16>(f)}; }
#else
#error "flashsae needs a C++ compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using Acc = typename AccType<T>::type;

template <typename A, typename T> inline A load(const T& v) { return static_cast<A>(to_float(v)); }

template <typename T> inline T store(float v);
template <> inline float store<float>(float v) { return v; }
template <> inline double store<double>(float v) { return v; }
template <> inline bf16 store<bf16>(float v) { return bf16_from_float(v); }
template <> inline f16 store<f16>(float v) { return f16_from_float(v); }
template <typename T> inline T store_acc(Acc<T> v) { return store<T>(static_cast<float>(v)); }
template <> inline double store_acc<double>(double v) { return v; }

// An untyped kernel argument seen as storage type T (const stays const).
template <typename T> inline const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T> inline T* typed(void* p) { return static_cast<T*>(p); }

// Calls fn(T{}) with the storage type named by a floating dtype code.
template <typename Fn> auto dispatch_float(int code, const char* what, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::BFloat16: return fn(bf16{});
    case DType::Float16: return fn(f16{});
    default: break;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype " + dtype_name(code) +
                              " (expected float32, float64, bfloat16 or float16)");
}

// Accumulator buffers (running top-k scores, per-row sums) are float32 or float64 only.
template <typename Fn> auto dispatch_acc(int code, const char* what, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    default: break;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype " + dtype_name(code) +
                              " (expected float32 or float64)");
}

}  // namespace flashsae
