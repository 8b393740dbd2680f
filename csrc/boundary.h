// Argument checks shared by the host boundaries of flashsae._C (cpu/flashsae_cpu_api.cpp, plus the
// select's host mirror cuda/topk_encode_host.cpp) and flashsae._C_cuda (cuda/flashsae_cuda_api.cpp).
//
// The bindings take raw addresses (tensor.data_ptr() as a Python int), sizes and dtype codes, so
// no torch header is needed and one build works with any torch. Python has already checked device,
// dtype, contiguity and shapes of every tensor; these helpers check what the kernels rely on beyond
// that, and every error is a std::invalid_argument (ValueError in Python) that starts with the
// name of the binding's keyword argument at fault.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "dtype_codes.h"

namespace flashsae::boundary {

namespace py = pybind11;

using addr_t = std::uintptr_t;

template <typename T = void> T* as_ptr(addr_t a) { return reinterpret_cast<T*>(a); }

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

inline void require_address(addr_t a, const char* name) {
  require(a != 0, std::string(name) + ": null address");
}

// Every (address, name) pair must be non-null.
inline void require_addresses(std::initializer_list<std::pair<addr_t, const char*>> required) {
  for (const auto& [a, name] : required) require_address(a, name);
}

inline void require_positive(int64_t value, const char* name) {
  if (value < 1) {
    std::ostringstream m;
    m << name << ": expected >= 1, got " << value;
    throw std::invalid_argument(m.str());
  }
}

inline void require_range(int64_t value, int64_t low, int64_t high, const char* name) {
  if (value < low || value > high) {
    std::ostringstream m;
    m << name << ": expected " << low << " <= " << name << " <= " << high << ", got " << value;
    throw std::invalid_argument(m.str());
  }
}

// The dtype codes Python passes next to every address (flashsae._native reads them from here).
inline void add_dtype_codes(py::module_& m) {
  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::Float32);
  m.attr("DTYPE_FLOAT64") = static_cast<int>(DType::Float64);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::BFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::Float16);
}

}  // namespace flashsae::boundary
