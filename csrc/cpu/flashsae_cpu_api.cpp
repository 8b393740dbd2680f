// flashsae._C: the host boundary of the CPU kernels, the one file that checks their arguments.
//
// Every binding takes raw addresses (tensor.data_ptr() as a Python int), sizes and dtype codes as
// keyword-only arguments, so a call names every address it passes and two swapped addresses cannot
// go unnoticed. flashsae/_native.py has already checked device, dtype, contiguity and shapes of each
// tensor; this file checks what only C++ can check cheaply (index ranges, which the kernels would
// otherwise read out of bounds with) and the size invariants the kernels rely on, then releases the
// GIL and runs the kernel.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "boundary.h"
#include "cpu/dtype.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using flashsae::DType;

namespace flashsae {
void register_topk_encode_host(py::module_& m);  // csrc/cuda/topk_encode_host.cpp (tests of the CUDA select)
}  // namespace flashsae

namespace {

using namespace flashsae::boundary;

void require_k(int64_t k, int64_t n, const char* name) {
  if (k < 1 || k > n) {
    std::ostringstream m;
    m << name << ": expected 1 <= " << name << " <= n_latents (" << n << "), got " << k;
    throw std::invalid_argument(m.str());
  }
}

// Every index must be a latent in [0, n) or -1 (an empty slot).
void check_indices(addr_t idx_addr, int64_t rows, int64_t k, int64_t n, const char* name) {
  const int32_t* idx = as_ptr<const int32_t>(idx_addr);
  const int64_t count = rows * k;
  int64_t bad = -1;
  for (int64_t p = 0; p < count; ++p) {
    if (idx[p] < -1 || idx[p] >= n) {
      bad = p;
      break;
    }
  }
  if (bad >= 0) {
    std::ostringstream m;
    m << name << ": index " << idx[bad] << " at [" << bad / k << ", " << bad % k
      << "] is out of range; expected a latent in [0, " << n << ") or -1 for an empty slot";
    throw std::invalid_argument(m.str());
  }
}

void check_float_dtype(int code, const char* name) {
  flashsae::dispatch_float(code, name, [](auto) { return 0; });
}

// The checks every sparse-row kernel needs: positive sizes, a float dtype, indices in range.
void check_sparse_rows(addr_t indices, int64_t rows, int64_t k, int64_t n, int64_t d, int dtype,
                       const char* dtype_of) {
  require_positive(rows, "rows");
  require_positive(k, "k");
  require_positive(n, "n_latents");
  require_positive(d, "d");
  check_float_dtype(dtype, dtype_of);
  check_indices(indices, rows, k, n, "indices");
}

// ---------------------------------------------------------------------------------------------
void topk_state_init(addr_t heap_scores, addr_t heap_indices, int64_t rows, int64_t k, int score_dtype) {
  require_addresses({{heap_scores, "heap_scores"}, {heap_indices, "heap_indices"}});
  require_positive(rows, "rows");
  require_positive(k, "k");
  flashsae::cpu::topk_state_init(as_ptr(heap_scores), as_ptr<int32_t>(heap_indices), rows, k, score_dtype);
}

void topk_state_merge(addr_t scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0, int64_t n,
                      addr_t heap_scores, addr_t heap_indices, int64_t k, addr_t dead_mask,
                      addr_t aux_scores, addr_t aux_indices, int64_t aux_k, int score_dtype) {
  require_addresses({{scores, "scores"}, {heap_scores, "heap_scores"}, {heap_indices, "heap_indices"}});
  require_positive(rows, "rows");
  require_positive(cols, "cols");
  require(ld >= cols, "scores: row stride " + std::to_string(ld) + " < cols " + std::to_string(cols));
  require(col0 >= 0 && col0 + cols <= n, "col0: tile [" + std::to_string(col0) + ", " +
                                             std::to_string(col0 + cols) + ") leaves [0, " +
                                             std::to_string(n) + ")");
  require_k(k, n, "k");
  require(aux_k >= 0 && aux_k <= n, "aux_k: expected 0 <= aux_k <= n_latents (" +
                                        std::to_string(n) + "), got " + std::to_string(aux_k));
  if (aux_k > 0) {
    require_addresses({{dead_mask, "dead_mask"}, {aux_scores, "aux_scores"}, {aux_indices, "aux_indices"}});
  }
  flashsae::cpu::topk_state_merge(as_ptr(scores), ld, rows, cols, col0, as_ptr(heap_scores),
                                  as_ptr<int32_t>(heap_indices), k, as_ptr<const uint8_t>(dead_mask),
                                  as_ptr(aux_scores), as_ptr<int32_t>(aux_indices), aux_k, score_dtype);
}

void topk_state_finish(addr_t heap_scores, addr_t heap_indices, int64_t rows, int64_t k,
                       int score_dtype, addr_t values, addr_t indices, int value_dtype) {
  require_addresses({{heap_scores, "heap_scores"}, {heap_indices, "heap_indices"}, {values, "values"},
                     {indices, "indices"}});
  require_positive(rows, "rows");
  require_positive(k, "k");
  flashsae::cpu::topk_state_finish(as_ptr(heap_scores), as_ptr<const int32_t>(heap_indices), rows, k,
                                   score_dtype, as_ptr(values), as_ptr<int32_t>(indices), value_dtype);
}

void sparse_decode_forward(addr_t values, addr_t indices, int64_t rows, int64_t k, addr_t W_dec,
                           int64_t n, int64_t d, addr_t b_dec, addr_t x_hat, int dtype) {
  require_addresses({{values, "values"}, {indices, "indices"}, {W_dec, "W_dec"}, {x_hat, "x_hat"}});
  check_sparse_rows(indices, rows, k, n, d, dtype, "values");
  py::gil_scoped_release release;
  flashsae::cpu::sparse_decode_forward(as_ptr(values), as_ptr<const int32_t>(indices), rows, k,
                                       as_ptr(W_dec), n, d, as_ptr(b_dec), as_ptr(x_hat), dtype);
}

void sparse_decode_backward(addr_t grad, addr_t values, addr_t indices, int64_t rows, int64_t k,
                            addr_t W_dec, int64_t n, int64_t d, addr_t d_values, addr_t dW_dec,
                            addr_t db_dec, int dtype) {
  require_addresses({{grad, "grad"}, {values, "values"}, {indices, "indices"}, {W_dec, "W_dec"},
                     {d_values, "d_values"}, {dW_dec, "dW_dec"}});
  check_sparse_rows(indices, rows, k, n, d, dtype, "values");
  py::gil_scoped_release release;
  flashsae::cpu::sparse_decode_backward(as_ptr(grad), as_ptr(values), as_ptr<const int32_t>(indices),
                                        rows, k, as_ptr(W_dec), n, d, as_ptr(d_values),
                                        as_ptr(dW_dec), as_ptr(db_dec), dtype);
}

void topk_encode_backward(addr_t d_values, addr_t values, addr_t indices, int64_t rows, int64_t k,
                          addr_t x, addr_t b_dec, addr_t W_enc, int64_t n, int64_t d, addr_t dW_enc,
                          addr_t db_enc, addr_t dx, addr_t db_dec, int dtype) {
  require_addresses({{d_values, "d_values"}, {values, "values"}, {indices, "indices"}, {x, "x"},
                     {W_enc, "W_enc"}, {dW_enc, "dW_enc"}, {db_enc, "db_enc"}});
  check_sparse_rows(indices, rows, k, n, d, dtype, "x");
  py::gil_scoped_release release;
  flashsae::cpu::topk_encode_backward(as_ptr(d_values), as_ptr(values),
                                      as_ptr<const int32_t>(indices), rows, k, as_ptr(x),
                                      as_ptr(b_dec), as_ptr(W_enc), n, d, as_ptr(dW_enc),
                                      as_ptr(db_enc), as_ptr(dx), as_ptr(db_dec), dtype);
}

void check_loss_args(addr_t x, addr_t values, addr_t indices, int64_t k, addr_t aux_values,
                     addr_t aux_indices, int64_t aux_k, addr_t W_dec, addr_t b_dec, int64_t rows,
                     int64_t n, int64_t d, int dtype) {
  require_addresses({{x, "x"}, {values, "values"}, {indices, "indices"}, {W_dec, "W_dec"}, {b_dec, "b_dec"}});
  check_sparse_rows(indices, rows, k, n, d, dtype, "x");
  require(aux_k >= 0, "aux_k: expected >= 0, got " + std::to_string(aux_k));
  if (aux_k > 0) {
    require_addresses({{aux_values, "aux_values"}, {aux_indices, "aux_indices"}});
    check_indices(aux_indices, rows, aux_k, n, "aux_indices");
  }
}

void sae_loss_forward(addr_t x, addr_t values, addr_t indices, int64_t k, addr_t aux_values,
                      addr_t aux_indices, int64_t aux_k, addr_t W_dec, addr_t b_dec, int64_t rows,
                      int64_t n, int64_t d, addr_t x_hat, addr_t sse, addr_t aux_sse, int dtype) {
  check_loss_args(x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n, d, dtype);
  require_addresses({{x_hat, "x_hat"}, {sse, "sse"}});
  if (aux_k > 0) require_address(aux_sse, "aux_sse");
  py::gil_scoped_release release;
  flashsae::cpu::sae_loss_forward(as_ptr(x), as_ptr(values), as_ptr<const int32_t>(indices), k,
                                  as_ptr(aux_values), as_ptr<const int32_t>(aux_indices), aux_k,
                                  as_ptr(W_dec), as_ptr(b_dec), rows, n, d, as_ptr(x_hat),
                                  as_ptr(sse), as_ptr(aux_sse), dtype);
}

void sae_loss_backward(addr_t g_xhat, addr_t g_sse, addr_t g_aux, addr_t x, addr_t values,
                       addr_t indices, int64_t k, addr_t aux_values, addr_t aux_indices,
                       int64_t aux_k, addr_t W_dec, addr_t b_dec, int64_t rows, int64_t n, int64_t d,
                       addr_t d_values, addr_t d_aux_values, addr_t dW_dec, addr_t db_dec, addr_t dx,
                       int dtype) {
  check_loss_args(x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n, d, dtype);
  require_addresses({{g_sse, "grad_sse"}, {d_values, "d_values"}, {dW_dec, "dW_dec"}, {db_dec, "db_dec"}});
  if (aux_k > 0) require_addresses({{g_aux, "grad_aux_sse"}, {d_aux_values, "d_aux_values"}});
  py::gil_scoped_release release;
  flashsae::cpu::sae_loss_backward(as_ptr(g_xhat), as_ptr(g_sse), as_ptr(g_aux), as_ptr(x),
                                   as_ptr(values), as_ptr<const int32_t>(indices), k,
                                   as_ptr(aux_values), as_ptr<const int32_t>(aux_indices), aux_k,
                                   as_ptr(W_dec), as_ptr(b_dec), rows, n, d, as_ptr(d_values),
                                   as_ptr(d_aux_values), as_ptr(dW_dec), as_ptr(db_dec), as_ptr(dx),
                                   dtype);
}

// The checks both sparse Adam kernels share: sizes, schedule, horizon, master, and rows in range,
// strictly increasing (threads own whole rows, so a repeat would race) and not ahead of the step.
void check_adam_rows(addr_t param, addr_t last_step, addr_t rows, int64_t m, addr_t grads, int64_t n,
                     int64_t d, int64_t step, addr_t schedule, int64_t schedule_rows, int64_t horizon,
                     int param_dtype, addr_t master) {
  require_addresses({{param, "param"}, {last_step, "last_step"}, {rows, "rows"}, {schedule, "schedule"}});
  require_positive(m, "row_count");
  require_positive(n, "param_rows");
  require_positive(d, "d");
  require_positive(step, "step");
  require(schedule_rows > step, "schedule: expected at least step + 1 = " + std::to_string(step + 1) +
                                    " rows, got " + std::to_string(schedule_rows));
  require(horizon >= 0, "horizon: expected >= 0, got " + std::to_string(horizon));
  check_float_dtype(param_dtype, "param");
  if (master != 0)
    require(param_dtype == static_cast<int>(DType::BFloat16) || param_dtype == static_cast<int>(DType::Float16),
            "master: only bfloat16/float16 parameters keep a float32 master copy");
  const int64_t* r = as_ptr<const int64_t>(rows);
  const int64_t* last = as_ptr<const int64_t>(last_step);
  const int64_t target = grads != 0 ? step - 1 : step;
  for (int64_t q = 0; q < m; ++q) {
    if (r[q] < 0 || r[q] >= n || (q > 0 && r[q] <= r[q - 1])) {
      std::ostringstream msg;
      msg << "rows: row " << r[q] << " at position " << q
          << " is out of range or out of order; expected sorted unique rows in [0, " << n << ")";
      throw std::invalid_argument(msg.str());
    }
    if (last[r[q]] > target) {
      std::ostringstream msg;
      msg << "last_step: row " << r[q] << " was last updated at step " << last[r[q]] << ", after step "
          << target;
      throw std::invalid_argument(msg.str());
    }
  }
}

void sparse_adam(addr_t param, addr_t master, addr_t exp_avg, addr_t exp_avg_sq, addr_t last_step,
                 addr_t rows, int64_t m, addr_t grads, int64_t n, int64_t d, int64_t step,
                 addr_t schedule, int64_t schedule_rows, double beta1, double beta2, double eps,
                 int64_t horizon, int param_dtype, int state_dtype) {
  require_addresses({{exp_avg, "exp_avg"}, {exp_avg_sq, "exp_avg_sq"}});
  check_adam_rows(param, last_step, rows, m, grads, n, d, step, schedule, schedule_rows, horizon,
                  param_dtype, master);
  check_float_dtype(state_dtype, "exp_avg");
  const bool param64 = param_dtype == static_cast<int>(DType::Float64);
  const bool state64 = state_dtype == static_cast<int>(DType::Float64);
  require(param64 == state64, "exp_avg: float64 moments go with float64 parameters only (and vice versa)");
  py::gil_scoped_release release;
  flashsae::cpu::sparse_adam(as_ptr(param), as_ptr<float>(master), as_ptr(exp_avg), as_ptr(exp_avg_sq),
                             as_ptr<int64_t>(last_step), as_ptr<const int64_t>(rows), m,
                             as_ptr<const void>(grads), d, step, as_ptr<const double>(schedule), beta1,
                             beta2, eps, horizon, param_dtype, state_dtype);
}

void sparse_adam_rowwise(addr_t param, addr_t master, addr_t exp_avg, addr_t exp_avg_scale,
                         addr_t exp_avg_sq, addr_t last_step, addr_t rows, int64_t m, addr_t grads,
                         int64_t n, int64_t d, int64_t step, addr_t schedule, int64_t schedule_rows,
                         double beta1, double beta2, double eps, int64_t horizon, int param_dtype,
                         int first_moment, int first_moment_dtype) {
  require_address(exp_avg_sq, "exp_avg_sq");
  check_adam_rows(param, last_step, rows, m, grads, n, d, step, schedule, schedule_rows, horizon,
                  param_dtype, master);
  const bool param64 = param_dtype == static_cast<int>(DType::Float64);
  require(first_moment >= 0 && first_moment <= 2,
          "exp_avg: unknown first-moment kind " + std::to_string(first_moment));
  if (first_moment == 0) require(beta1 == 0.0, "exp_avg: None (no first moment) needs beta1 = 0");
  if (first_moment >= 1) require_address(exp_avg, "exp_avg");
  if (first_moment == 1) {
    check_float_dtype(first_moment_dtype, "exp_avg");
    require(param64 == (first_moment_dtype == static_cast<int>(DType::Float64)),
            "exp_avg: float64 moments go with float64 parameters only (and vice versa)");
  }
  if (first_moment == 2) {
    require_address(exp_avg_scale, "exp_avg_scale");
    require(!param64, "exp_avg: int8 first moments are for float32/bfloat16/float16 parameters");
  }
  py::gil_scoped_release release;
  flashsae::cpu::sparse_adam_rowwise(
      as_ptr(param), as_ptr<float>(master), as_ptr(exp_avg), as_ptr<float>(exp_avg_scale),
      as_ptr(exp_avg_sq), as_ptr<int64_t>(last_step), as_ptr<const int64_t>(rows), m,
      as_ptr<const void>(grads), d, step, as_ptr<const double>(schedule), beta1, beta2, eps, horizon,
      param_dtype, first_moment, first_moment_dtype);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashsae CPU kernels (C++17 + OpenMP). Internal: use flashsae.ops.";
  add_dtype_codes(m);

  m.def("openmp_max_threads", &omp_get_max_threads,
        "Threads the kernels use (shared with torch's pool: torch.set_num_threads applies)");
  // Every kernel binding takes keyword arguments only (py::kw_only), named as in kernels.h.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("topk_state_init", &topk_state_init, nogil, py::kw_only(), py::arg("heap_scores"),
        py::arg("heap_indices"), py::arg("rows"), py::arg("k"), py::arg("score_dtype"));
  m.def("topk_state_merge", &topk_state_merge, nogil, py::kw_only(), py::arg("scores"), py::arg("ld"),
        py::arg("rows"), py::arg("cols"), py::arg("col0"), py::arg("n_latents"), py::arg("heap_scores"),
        py::arg("heap_indices"), py::arg("k"), py::arg("dead_mask"), py::arg("aux_scores"),
        py::arg("aux_indices"), py::arg("aux_k"), py::arg("score_dtype"));
  m.def("topk_state_finish", &topk_state_finish, nogil, py::kw_only(), py::arg("heap_scores"),
        py::arg("heap_indices"), py::arg("rows"), py::arg("k"), py::arg("score_dtype"), py::arg("values"),
        py::arg("indices"), py::arg("value_dtype"));
  // The bindings below check indices while holding the GIL, then release it themselves.
  m.def("sparse_decode_forward", &sparse_decode_forward, py::kw_only(), py::arg("values"), py::arg("indices"),
        py::arg("rows"), py::arg("k"), py::arg("W_dec"), py::arg("n_latents"), py::arg("d"), py::arg("b_dec"),
        py::arg("x_hat"), py::arg("dtype"));
  m.def("sparse_decode_backward", &sparse_decode_backward, py::kw_only(), py::arg("grad"), py::arg("values"),
        py::arg("indices"), py::arg("rows"), py::arg("k"), py::arg("W_dec"), py::arg("n_latents"), py::arg("d"),
        py::arg("d_values"), py::arg("dW_dec"), py::arg("db_dec"), py::arg("dtype"));
  m.def("topk_encode_backward", &topk_encode_backward, py::kw_only(), py::arg("d_values"), py::arg("values"),
        py::arg("indices"), py::arg("rows"), py::arg("k"), py::arg("x"), py::arg("b_dec"), py::arg("W_enc"),
        py::arg("n_latents"), py::arg("d"), py::arg("dW_enc"), py::arg("db_enc"), py::arg("dx"), py::arg("db_dec"),
        py::arg("dtype"));
  m.def("sae_loss_forward", &sae_loss_forward, py::kw_only(), py::arg("x"), py::arg("values"), py::arg("indices"),
        py::arg("k"), py::arg("aux_values"), py::arg("aux_indices"), py::arg("aux_k"), py::arg("W_dec"),
        py::arg("b_dec"), py::arg("rows"), py::arg("n_latents"), py::arg("d"), py::arg("x_hat"), py::arg("sse"),
        py::arg("aux_sse"), py::arg("dtype"));
  m.def("sae_loss_backward", &sae_loss_backward, py::kw_only(), py::arg("grad_x_hat"), py::arg("grad_sse"),
        py::arg("grad_aux_sse"), py::arg("x"), py::arg("values"), py::arg("indices"), py::arg("k"),
        py::arg("aux_values"), py::arg("aux_indices"), py::arg("aux_k"), py::arg("W_dec"), py::arg("b_dec"),
        py::arg("rows"), py::arg("n_latents"), py::arg("d"), py::arg("d_values"), py::arg("d_aux_values"),
        py::arg("dW_dec"), py::arg("db_dec"), py::arg("dx"), py::arg("dtype"));
  m.def("sparse_adam", &sparse_adam, py::kw_only(), py::arg("param"), py::arg("master"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("last_step"), py::arg("rows"), py::arg("row_count"), py::arg("grads"),
        py::arg("param_rows"), py::arg("d"), py::arg("step"), py::arg("schedule"), py::arg("schedule_rows"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("horizon"), py::arg("param_dtype"),
        py::arg("state_dtype"));
  m.def("sparse_adam_rowwise", &sparse_adam_rowwise, py::kw_only(), py::arg("param"), py::arg("master"),
        py::arg("exp_avg"), py::arg("exp_avg_scale"), py::arg("exp_avg_sq"), py::arg("last_step"), py::arg("rows"),
        py::arg("row_count"), py::arg("grads"), py::arg("param_rows"), py::arg("d"), py::arg("step"),
        py::arg("schedule"), py::arg("schedule_rows"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("horizon"), py::arg("param_dtype"), py::arg("first_moment"), py::arg("first_moment_dtype"));
  flashsae::register_topk_encode_host(m);
}
