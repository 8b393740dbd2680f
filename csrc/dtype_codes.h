// Dtype codes passed next to every address across the pybind11 boundary: the modules include no
// torch header, so a tensor's dtype crosses as one of these ints.
// Shared by flashsae._C and flashsae._C_cuda; must match flashsae/_native.py (DTYPE_CODES),
// which reads them back from the modules' DTYPE_* attributes at import time.
#pragma once

namespace flashsae {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

inline const char* dtype_name(int code) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
  }
  return "unknown";
}

}  // namespace flashsae
