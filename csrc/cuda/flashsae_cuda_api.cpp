// flashsae._C_cuda: the host boundary of the CUDA kernels.
//
// Same contract as flashsae._C (raw addresses + sizes + dtype codes as keyword-only arguments,
// checked tensors from Python), plus a device index and the caller's stream
// (torch.cuda.current_stream().cuda_stream), so every launch is ordered with the surrounding torch
// work. cudart is linked statically, so importing this module needs no CUDA runtime on the machine,
// and no driver until a function is called.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "boundary.h"
#include "cuda/kernels.cuh"
#include "cuda/topk_keys.h"
#include "dtype_codes.h"

namespace py = pybind11;
using flashsae::DType;

namespace {

using namespace flashsae::boundary;

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

constexpr int64_t kInt32Max = 0x7fffffff;

// CUDA storage dtypes: float32, bfloat16, float16 (float64 runs on the cpu / torch backends).
void require_cuda_dtype(int dtype, const char* name) {
  require(dtype == static_cast<int>(DType::Float32) || dtype == static_cast<int>(DType::BFloat16) ||
              dtype == static_cast<int>(DType::Float16),
          std::string(name) + ": unsupported dtype " + flashsae::dtype_name(dtype) +
              " on CUDA (expected float32, bfloat16 or float16)");
}

// Sizes every row kernel relies on: one block per row (grid.x <= 2^31 - 1), int32 latents.
void require_row_sizes(int64_t rows, int64_t k, int64_t n, int64_t d) {
  require_range(rows, 1, kInt32Max, "rows");
  require_range(k, 1, kInt32Max, "k");
  require_range(n, 1, kInt32Max, "n_latents");
  require_range(d, 1, kInt32Max, "d");
}

// Runs `launch` (which returns the launches' cudaError_t) on `device` with the GIL released, and
// turns a failure into a Python RuntimeError naming `what`. Argument checks come before this, so a
// bad call raises ValueError even on a machine without a GPU or driver.
template <typename F> void run_on(int device, const char* what, F&& launch) {
  py::gil_scoped_release release;
  DeviceGuard guard(device);
  check_cuda(launch(), what);
}

cudaStream_t as_stream(addr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void gather_rows(addr_t coef, addr_t gate, addr_t indices, int64_t rows, int64_t k, addr_t W, int64_t n, int64_t d,
                 addr_t bias, addr_t out, bool out_fp32, addr_t error_flag, int dtype, int device, addr_t stream) {
  require_addresses({{coef, "coef"}, {indices, "indices"}, {W, "W"}, {out, "out"}, {error_flag, "error_flag"}});
  require_row_sizes(rows, k, n, d);
  require_cuda_dtype(dtype, "coef");
  run_on(device, "gather_rows", [&] {
    return flashsae::cuda::gather_rows(as_ptr(coef), as_ptr(gate), as_ptr<const int32_t>(indices), rows, k,
                                       as_ptr(W), n, d, as_ptr(bias), as_ptr(out), out_fp32,
                                       as_ptr<int32_t>(error_flag), dtype, as_stream(stream));
  });
}

void dot_rows(addr_t R, bool r_fp32, addr_t indices, int64_t rows, int64_t k, addr_t W, int64_t n, int64_t d,
              addr_t out, addr_t error_flag, int dtype, int device, addr_t stream) {
  require_addresses({{R, "R"}, {indices, "indices"}, {W, "W"}, {out, "out"}, {error_flag, "error_flag"}});
  require_row_sizes(rows, k, n, d);
  require_cuda_dtype(dtype, "W");
  run_on(device, "dot_rows", [&] {
    return flashsae::cuda::dot_rows(as_ptr(R), r_fp32, as_ptr<const int32_t>(indices), rows, k, as_ptr(W), n, d,
                                    as_ptr(out), as_ptr<int32_t>(error_flag), dtype, as_stream(stream));
  });
}

void scatter_rows(addr_t order, addr_t seg, int64_t n, int64_t rows, int64_t k, int64_t main_slots, addr_t coef,
                  addr_t gate, addr_t R1, addr_t R2, bool r_fp32, addr_t offset, int64_t d, addr_t out,
                  addr_t coef_sum, int dtype, int device, addr_t stream) {
  require_addresses({{order, "order"}, {seg, "seg"}, {coef, "coef"}, {R1, "R1"}, {out, "out"}});
  require_row_sizes(rows, k, n, d);
  require_range(main_slots, 1, k, "main_slots");
  require(main_slots == k || R2 != 0, "R2: null address (slots j >= main_slots read R2)");
  // grid (n, column tiles): at worst one column per thread, 256 threads, and grid.y <= 65535
  require_range(d, 1, int64_t(65535) * 256, "d");
  require_cuda_dtype(dtype, "coef");
  run_on(device, "scatter_rows", [&] {
    return flashsae::cuda::scatter_rows(as_ptr<const int64_t>(order), as_ptr<const int64_t>(seg), n, k, main_slots,
                                        as_ptr(coef), as_ptr(gate), as_ptr(R1), as_ptr(R2), r_fp32, as_ptr(offset),
                                        d, as_ptr(out), as_ptr(coef_sum), dtype, as_stream(stream));
  });
}

// The checks both loss bindings share: inputs, sizes, aux slots, dtype.
void check_loss_args(addr_t x, addr_t values, addr_t indices, int64_t k, addr_t aux_values, addr_t aux_indices,
                     int64_t aux_k, addr_t W_dec, addr_t b_dec, int64_t rows, int64_t n, int64_t d, addr_t error_flag,
                     int dtype) {
  require_addresses({{x, "x"}, {values, "values"}, {indices, "indices"}, {W_dec, "W_dec"}, {b_dec, "b_dec"},
                     {error_flag, "error_flag"}});
  require_row_sizes(rows, k, n, d);
  require_range(aux_k, 0, kInt32Max, "aux_k");
  if (aux_k > 0) require_addresses({{aux_values, "aux_values"}, {aux_indices, "aux_indices"}});
  require_cuda_dtype(dtype, "x");
}

void sae_loss_forward(addr_t x, addr_t values, addr_t indices, int64_t k, addr_t aux_values, addr_t aux_indices,
                      int64_t aux_k, addr_t W_dec, addr_t b_dec, int64_t rows, int64_t n, int64_t d, addr_t x_hat,
                      addr_t sse, addr_t aux_sse, addr_t error_flag, int dtype, int device, addr_t stream) {
  check_loss_args(x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n, d, error_flag, dtype);
  require_addresses({{x_hat, "x_hat"}, {sse, "sse"}});
  if (aux_k > 0) require_address(aux_sse, "aux_sse");
  run_on(device, "sae_loss_forward", [&] {
    return flashsae::cuda::sae_loss_forward(as_ptr(x), as_ptr(values), as_ptr<const int32_t>(indices), k,
                                            as_ptr(aux_values), as_ptr<const int32_t>(aux_indices), aux_k,
                                            as_ptr(W_dec), as_ptr(b_dec), rows, n, d, as_ptr(x_hat),
                                            as_ptr<float>(sse), as_ptr<float>(aux_sse), as_ptr<int32_t>(error_flag),
                                            dtype, as_stream(stream));
  });
}

void sae_loss_backward_rows(addr_t g_xhat, addr_t g_sse, addr_t g_aux, addr_t x, addr_t values, addr_t indices,
                            int64_t k, addr_t aux_values, addr_t aux_indices, int64_t aux_k, addr_t W_dec,
                            addr_t b_dec, int64_t rows, int64_t n, int64_t d, addr_t G, addr_t H, addr_t dx,
                            addr_t error_flag, int dtype, int device, addr_t stream) {
  check_loss_args(x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n, d, error_flag, dtype);
  require_addresses({{g_sse, "grad_sse"}, {G, "G"}});
  if (aux_k > 0) require_addresses({{g_aux, "grad_aux_sse"}, {H, "H"}});
  run_on(device, "sae_loss_backward_rows", [&] {
    return flashsae::cuda::sae_loss_backward_rows(
        as_ptr(g_xhat), as_ptr<const float>(g_sse), as_ptr<const float>(g_aux), as_ptr(x), as_ptr(values),
        as_ptr<const int32_t>(indices), k, as_ptr(aux_values), as_ptr<const int32_t>(aux_indices), aux_k,
        as_ptr(W_dec), as_ptr(b_dec), rows, n, d, as_ptr<float>(G), as_ptr<float>(H), as_ptr(dx),
        as_ptr<int32_t>(error_flag), dtype, as_stream(stream));
  });
}

void topk_select(addr_t scores, int score_dtype, int64_t ld, int64_t rows, int64_t cols, int64_t col0, addr_t bias,
                 bool relu, addr_t state, int64_t k, addr_t dead_mask, addr_t aux_state, int64_t aux_k, int device,
                 addr_t stream) {
  require_addresses({{scores, "scores"}, {state, "state"}});
  require_range(rows, 1, kInt32Max, "rows");
  require_range(cols, 1, kInt32Max, "cols");
  require_range(ld, cols, std::numeric_limits<int64_t>::max(), "ld");
  // latents col0 .. col0 + cols - 1 are int32 in the keys
  require_range(col0, 0, kInt32Max - cols, "col0");
  require_range(k, 1, flashsae::topk::kMaxK, "k");
  require_range(aux_k, 0, flashsae::topk::kMaxK, "aux_k");
  if (aux_k > 0) require_addresses({{dead_mask, "dead_mask"}, {aux_state, "aux_state"}});
  require_cuda_dtype(score_dtype, "scores");
  run_on(device, "topk_select", [&] {
    return flashsae::cuda::topk_select(as_ptr(scores), score_dtype, ld, rows, cols, col0, as_ptr<const float>(bias),
                                       relu, as_ptr<uint64_t>(state), static_cast<int>(k),
                                       as_ptr<const uint8_t>(dead_mask), as_ptr<uint64_t>(aux_state),
                                       static_cast<int>(aux_k), as_stream(stream));
  });
}

void topk_finish(addr_t state, int64_t rows, int64_t k, addr_t values, addr_t indices, int value_dtype, int device,
                 addr_t stream) {
  require_addresses({{state, "state"}, {values, "values"}, {indices, "indices"}});
  require_range(rows, 1, kInt32Max, "rows");
  require_range(k, 1, flashsae::topk::kMaxK, "k");
  require_cuda_dtype(value_dtype, "values");
  run_on(device, "topk_finish", [&] {
    return flashsae::cuda::topk_finish(as_ptr<const uint64_t>(state), rows, static_cast<int>(k), as_ptr(values),
                                       as_ptr<int32_t>(indices), value_dtype, as_stream(stream));
  });
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flashsae CUDA kernels (static cudart). Internal: use flashsae.ops.";
  add_dtype_codes(m);
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.def("device_count", &device_count, "Visible CUDA devices; 0 when there is no driver or device");
  m.def("runtime_version", &runtime_version, "Version of the statically linked CUDA runtime");
  m.attr("TOPK_MAX_K") = flashsae::topk::kMaxK;
  m.attr("TOPK_SLICE") = flashsae::cuda::topk_select_slice();
  m.attr("TOPK_CAPACITY") = flashsae::cuda::topk_select_capacity();
  // Each binding takes keyword arguments only (named as in kernels.cuh), checks them (ValueError),
  // then releases the GIL and launches on `stream` (torch.cuda.current_stream(device).cuda_stream)
  // with `device` current; a CUDA error, including one left by an earlier asynchronous failure,
  // raises RuntimeError.
  m.def("gather_rows", &gather_rows, py::kw_only(), py::arg("coef"), py::arg("gate"), py::arg("indices"),
        py::arg("rows"), py::arg("k"), py::arg("W"), py::arg("n_latents"), py::arg("d"), py::arg("bias"),
        py::arg("out"), py::arg("out_fp32"), py::arg("error_flag"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("dot_rows", &dot_rows, py::kw_only(), py::arg("R"), py::arg("r_fp32"), py::arg("indices"), py::arg("rows"),
        py::arg("k"), py::arg("W"), py::arg("n_latents"), py::arg("d"), py::arg("out"), py::arg("error_flag"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("scatter_rows", &scatter_rows, py::kw_only(), py::arg("order"), py::arg("seg"), py::arg("n_latents"),
        py::arg("rows"), py::arg("k"), py::arg("main_slots"), py::arg("coef"), py::arg("gate"), py::arg("R1"),
        py::arg("R2"), py::arg("r_fp32"), py::arg("offset"), py::arg("d"), py::arg("out"), py::arg("coef_sum"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sae_loss_forward", &sae_loss_forward, py::kw_only(), py::arg("x"), py::arg("values"), py::arg("indices"),
        py::arg("k"), py::arg("aux_values"), py::arg("aux_indices"), py::arg("aux_k"), py::arg("W_dec"),
        py::arg("b_dec"), py::arg("rows"), py::arg("n_latents"), py::arg("d"), py::arg("x_hat"), py::arg("sse"),
        py::arg("aux_sse"), py::arg("error_flag"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sae_loss_backward_rows", &sae_loss_backward_rows, py::kw_only(), py::arg("grad_x_hat"),
        py::arg("grad_sse"), py::arg("grad_aux_sse"), py::arg("x"), py::arg("values"), py::arg("indices"),
        py::arg("k"), py::arg("aux_values"), py::arg("aux_indices"), py::arg("aux_k"), py::arg("W_dec"),
        py::arg("b_dec"), py::arg("rows"), py::arg("n_latents"), py::arg("d"), py::arg("G"), py::arg("H"),
        py::arg("dx"), py::arg("error_flag"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("topk_select", &topk_select, py::kw_only(), py::arg("scores"), py::arg("score_dtype"), py::arg("ld"),
        py::arg("rows"), py::arg("cols"), py::arg("col0"), py::arg("bias"), py::arg("relu"), py::arg("state"),
        py::arg("k"), py::arg("dead_mask"), py::arg("aux_state"), py::arg("aux_k"), py::arg("device"),
        py::arg("stream"));
  m.def("topk_finish", &topk_finish, py::kw_only(), py::arg("state"), py::arg("rows"), py::arg("k"),
        py::arg("values"), py::arg("indices"), py::arg("value_dtype"), py::arg("device"), py::arg("stream"));
}
