// flashsae._C_cuda: the host boundary of the CUDA kernels.
//
// Same contract as flashsae._C (raw addresses + sizes + dtype codes, checked tensors from Python),
// plus a device index and the caller's stream (torch.cuda.current_stream().cuda_stream), so every
// launch is ordered with the surrounding torch work. cudart is linked statically, so importing this
// module needs no CUDA runtime on the machine, and no driver until a function is called.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cuda/kernels.cuh"
#include "dtype_codes.h"

namespace py = pybind11;
using flashsae::DType;

namespace {

using addr_t = std::uintptr_t;

template <typename T = void> T* as_ptr(addr_t a) { return reinterpret_cast<T*>(a); }

[[noreturn]] void throw_cuda(cudaError_t err, const char* what) {
  std::ostringstream m;
  m << "flashsae CUDA error in " << what << ": " << cudaGetErrorName(err) << " ("
    << cudaGetErrorString(err) << ")";
  throw std::runtime_error(m.str());
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda(err, what);
}

// Makes `device` current for the scope of one call, as torch's DeviceGuard does.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // reset the runtime's last-error state: "no GPU" is an answer here
    return 0;
  }
  check_cuda(err, "cudaGetDeviceCount");
  return count;
}

int runtime_version() {
  int v = 0;
  check_cuda(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

void sparse_decode_forward(addr_t values, addr_t indices, int64_t rows, int64_t k, addr_t W_dec,
                           int64_t n, int64_t d, addr_t b_dec, addr_t x_hat, addr_t error_flag,
                           int dtype, int device, addr_t stream) {
  require(values && indices && W_dec && x_hat && error_flag,
          "sparse_decode_forward: values, indices, W_dec, x_hat and error_flag need addresses");
  require(rows >= 1 && k >= 1 && n >= 1 && d >= 1,
          "sparse_decode_forward: rows, k, n_latents and d must be >= 1");
  require(rows <= 0x7fffffff, "values: at most 2^31 - 1 rows per call on CUDA");
  require(dtype == static_cast<int>(DType::Float32) || dtype == static_cast<int>(DType::BFloat16) ||
              dtype == static_cast<int>(DType::Float16),
          std::string("values: unsupported dtype ") + flashsae::dtype_name(dtype) +
              " on CUDA (expected float32, bfloat16 or float16)");
  py::gil_scoped_release release;
  DeviceGuard guard(device);
  check_cuda(flashsae::cuda::sparse_decode_forward(as_ptr(values), as_ptr<const int32_t>(indices),
                                                   rows, k, as_ptr(W_dec), n, d, as_ptr(b_dec),
                                                   as_ptr(x_hat), as_ptr<int32_t>(error_flag),
                                                   dtype, as_ptr<CUstream_st>(stream)),
             "sparse_decode_forward launch");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flashsae CUDA kernels (static cudart). Internal: use flashsae.ops.";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::Float32);
  m.attr("DTYPE_FLOAT64") = static_cast<int>(DType::Float64);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::BFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::Float16);
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.def("device_count", &device_count, "Visible CUDA devices; 0 when there is no driver or device");
  m.def("runtime_version", &runtime_version, "Version of the statically linked CUDA runtime");
  m.def("sparse_decode_forward", &sparse_decode_forward);
}
