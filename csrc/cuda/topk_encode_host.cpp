// Sequential host mirror of the CUDA top-k select (topk_encode.cu), compiled into flashsae._C.
//
// It runs the kernel's algorithm step for step with the same shared functions (topk_keys.h: keys,
// choose_digit, RadixCut) on one CPU thread: per row, slices of scores, the threshold filter, the
// capacity rule that triggers a merge, the radix cut and the compaction. Its slice and capacity are
// parameters, so tests drive many merges on small inputs (the kernel's are 2048 and 2048).
// tests/test_cuda_select_host.py checks it against a stable sort on every CI run; the kernel then
// differs only in how each step is parallelized (see the comments there).
//
// Not used by any op: it is a test of the algorithm, not a CPU backend (the cpu backend has its own
// heap-based select, csrc/cpu/topk_encode.cpp).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "boundary.h"
#include "cuda/topk_keys.h"

namespace py = pybind11;

namespace flashsae::topk::host {
namespace {

// The cut of topk_keys.h over keys[0 .. m), 1 <= k <= m (block_radix_cut in the kernel).
uint64_t radix_cut(const uint64_t* keys, int64_t m, int64_t k) {
  RadixCut cut;
  cut.remaining = static_cast<uint32_t>(k);
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    uint32_t bins[kRadixBins] = {};
    for (int64_t i = 0; i < m; ++i)
      if ((keys[i] & cut.mask) == cut.prefix) ++bins[key_digit(keys[i], shift)];
    if (cut.fold(choose_digit(bins, kRadixBins - 1, 0, cut.remaining), shift)) break;
  }
  return cut.prefix;
}

// One selection of one row: buf = [state: k keys | buffer: count candidates], and its threshold.
struct Selection {
  std::vector<uint64_t> buf;
  int64_t k = 0;
  int64_t count = 0;
  uint64_t threshold = kEmptyKey;
};

uint64_t state_min(const Selection& s) {
  return *std::min_element(s.buf.begin(), s.buf.begin() + s.k);
}

// The kernel's merge(): the k best keys of state + buffer become the state.
void merge(Selection& s, std::vector<uint64_t>& scratch) {
  const int64_t m = s.k + s.count;
  const uint64_t cut = radix_cut(s.buf.data(), m, s.k);
  int64_t kept = 0;
  for (int64_t i = 0; i < m; ++i) {
    const uint64_t key = s.buf[i];
    if (key != kEmptyKey && key >= cut) {
      if (kept >= s.k) throw std::logic_error("topk select mirror: the cut kept more than k keys");
      scratch[kept++] = key;
    }
  }
  for (int64_t j = 0; j < s.k; ++j) s.buf[j] = j < kept ? scratch[j] : kEmptyKey;
  s.count = 0;
  s.threshold = state_min(s);
}

void append(Selection& s, uint64_t key, int64_t capacity) {
  if (s.count >= capacity) throw std::logic_error("topk select mirror: candidate buffer overflow");
  s.buf[s.k + s.count++] = key;
}

// The kernel's per-row loop (topk_select_kernel), one slice at a time.
void select_row(const float* row, int64_t cols, int64_t col0, const float* bias, bool relu, const uint8_t* dead_mask,
                Selection& main, Selection* aux, int64_t slice, int64_t capacity, std::vector<uint64_t>& scratch) {
  std::vector<uint64_t> keys(static_cast<size_t>(slice));
  std::vector<char> dead(static_cast<size_t>(slice));
  for (int64_t s0 = 0; s0 < cols; s0 += slice) {
    const int64_t len = std::min(slice, cols - s0);
    int64_t pass_main = 0, pass_aux = 0;
    for (int64_t u = 0; u < len; ++u) {
      const int64_t latent = col0 + s0 + u;
      float s = row[s0 + u];
      if (bias != nullptr) s += bias[latent];
      if (relu) s = relu_score(s);
      keys[u] = make_key(s, static_cast<int32_t>(latent));
      dead[u] = aux != nullptr && dead_mask[latent] != 0;
      pass_main += keys[u] > main.threshold;
      pass_aux += dead[u] && keys[u] > aux->threshold;
    }
    if (main.count + pass_main > capacity) merge(main, scratch);
    if (aux != nullptr && aux->count + pass_aux > capacity) merge(*aux, scratch);
    for (int64_t u = 0; u < len; ++u) {
      if (keys[u] > main.threshold) append(main, keys[u], capacity);
      if (dead[u] && keys[u] > aux->threshold) append(*aux, keys[u], capacity);
    }
  }
  if (main.count > 0) merge(main, scratch);
  if (aux != nullptr && aux->count > 0) merge(*aux, scratch);
}

using namespace flashsae::boundary;

Selection load_selection(const uint64_t* state, int64_t k, int64_t capacity) {
  Selection s;
  s.k = k;
  s.buf.assign(static_cast<size_t>(k + capacity), kEmptyKey);
  std::copy(state, state + k, s.buf.begin());
  s.threshold = state_min(s);
  return s;
}

// Same arguments as flashsae._C_cuda.topk_select, with float32 scores only and the kernel's slice
// and capacity as parameters.
void topk_select_host(addr_t scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0, addr_t bias, bool relu,
                      addr_t state, int64_t k, addr_t dead_mask, addr_t aux_state, int64_t aux_k, int64_t slice,
                      int64_t capacity) {
  require(scores != 0 && state != 0, "scores, state: null address");
  require(rows >= 1 && cols >= 1 && ld >= cols && col0 >= 0 && col0 + cols <= 0x7fffffff,
          "rows, cols, ld, col0: expected rows, cols >= 1, ld >= cols, 0 <= col0, col0 + cols < 2^31");
  require(k >= 1 && aux_k >= 0, "k, aux_k: expected k >= 1, aux_k >= 0");
  require(slice >= 1 && capacity >= slice, "slice, capacity: expected 1 <= slice <= capacity");
  require(aux_k == 0 || (dead_mask != 0 && aux_state != 0), "dead_mask, aux_state: null address with aux_k > 0");
  py::gil_scoped_release release;
  std::vector<uint64_t> scratch(static_cast<size_t>(std::max(k, aux_k)));
  for (int64_t r = 0; r < rows; ++r) {
    uint64_t* row_state = as_ptr<uint64_t>(state) + r * k;
    uint64_t* row_aux = aux_k > 0 ? as_ptr<uint64_t>(aux_state) + r * aux_k : nullptr;
    Selection main = load_selection(row_state, k, capacity);
    Selection aux;
    if (aux_k > 0) aux = load_selection(row_aux, aux_k, capacity);
    select_row(as_ptr<const float>(scores) + r * ld, cols, col0, as_ptr<const float>(bias), relu,
               as_ptr<const uint8_t>(dead_mask), main, aux_k > 0 ? &aux : nullptr, slice, capacity, scratch);
    std::copy(main.buf.begin(), main.buf.begin() + k, row_state);
    if (aux_k > 0) std::copy(aux.buf.begin(), aux.buf.begin() + aux_k, row_aux);
  }
}

// flashsae._C_cuda.topk_finish with float32 values: each row's keys sorted descending.
void topk_finish_host(addr_t state, int64_t rows, int64_t k, addr_t values, addr_t indices) {
  require(state != 0 && values != 0 && indices != 0, "state, values, indices: null address");
  require(rows >= 1 && k >= 1, "rows, k: expected >= 1");
  std::vector<uint64_t> keys(static_cast<size_t>(k));
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* row = as_ptr<const uint64_t>(state) + r * k;
    std::copy(row, row + k, keys.begin());
    std::sort(keys.begin(), keys.end(), [](uint64_t a, uint64_t b) { return a > b; });
    for (int64_t j = 0; j < k; ++j) {
      as_ptr<float>(values)[r * k + j] = keys[j] == kEmptyKey ? 0.f : key_value(keys[j]);
      as_ptr<int32_t>(indices)[r * k + j] = key_latent(keys[j]);
    }
  }
}

// keys[i] = make_key(values[i], latents[i]) (for tests of the key order).
void topk_make_keys_host(addr_t values, addr_t latents, int64_t count, addr_t keys) {
  require(values != 0 && latents != 0 && keys != 0, "values, latents, keys: null address");
  for (int64_t i = 0; i < count; ++i)
    as_ptr<uint64_t>(keys)[i] = make_key(as_ptr<const float>(values)[i], as_ptr<const int32_t>(latents)[i]);
}

}  // namespace
}  // namespace flashsae::topk::host

namespace flashsae {

// Called from flashsae._C's module init (csrc/cpu/flashsae_cpu_api.cpp).
void register_topk_encode_host(py::module_& m) {
  using namespace flashsae::topk::host;
  m.attr("TOPK_HOST_MAX_K") = flashsae::topk::kMaxK;
  m.def("topk_select_host", &topk_select_host, "Sequential mirror of _C_cuda.topk_select (tests only)",
        py::kw_only(), py::arg("scores"), py::arg("ld"), py::arg("rows"), py::arg("cols"), py::arg("col0"),
        py::arg("bias"), py::arg("relu"), py::arg("state"), py::arg("k"), py::arg("dead_mask"), py::arg("aux_state"),
        py::arg("aux_k"), py::arg("slice"), py::arg("capacity"));
  m.def("topk_finish_host", &topk_finish_host, "Sequential mirror of _C_cuda.topk_finish (tests only)",
        py::kw_only(), py::arg("state"), py::arg("rows"), py::arg("k"), py::arg("values"), py::arg("indices"));
  m.def("topk_make_keys_host", &topk_make_keys_host, "The select's 64-bit keys (tests only)", py::kw_only(),
        py::arg("values"), py::arg("latents"), py::arg("count"), py::arg("keys"));
}

}  // namespace flashsae
