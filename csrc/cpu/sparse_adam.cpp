// Fused sparse Adam on CPU: one pass per touched row (see python/flashsae/ops/sparse_adam.py for the
// math: replay of the skipped zero-gradient steps, then the row's own step).
//
// Rows are independent (they are unique), so threads take whole rows: a row's d elements are loaded
// once into thread-local accumulators, the replay steps sweep them in registers / L1 (the inner loop
// over d vectorizes: this file is compiled with -fno-math-errno so sqrt vectorizes), and they are
// stored once. The per-step scalars of the replayed steps come from the schedule table.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"

namespace flashsae::cpu {
namespace {

// torch.lerp's two formulas (aten/src/ATen/native/Lerp.h): from the start for weight < 0.5.
template <typename A> struct Lerp {
  A weight, rest;
  bool from_start;
  A operator()(A start, A end) const {
    return from_start ? start + weight * (end - start) : end - (end - start) * rest;
  }
};

template <typename T, typename S>
void adam_rows(T* param, float* master, S* exp_avg, S* exp_avg_sq, const int64_t* last_step,
               const int64_t* rows, int64_t m, const T* grads, int64_t d, int64_t step,
               const double* schedule, double beta1, double beta2, double eps, int64_t horizon) {
  using A = Acc<T>;
  const bool has_grad = grads != nullptr;
  const int64_t upto = has_grad ? step - 1 : step;
  const double w1 = 1.0 - beta1;  // Python's 1 - beta1, rounded to the math type as torch does
  const Lerp<A> lerp{A(w1), A(1) - A(w1), std::abs(A(w1)) < A(0.5)};
  const A b2 = A(beta2), c2 = A(1.0 - beta2), epsilon = A(eps);
  const A step_size = A(schedule[2 * step]), bias_sqrt = A(schedule[2 * step + 1]);
#pragma omp parallel
  {
    std::vector<A> pbuf(static_cast<size_t>(d)), mbuf(static_cast<size_t>(d)), vbuf(static_cast<size_t>(d));
#pragma omp for schedule(dynamic, 16)
    for (int64_t q = 0; q < m; ++q) {
      const int64_t r = rows[q];
      const int64_t last = last_step[r];
      const int64_t gap = (last > 0 && upto > last) ? upto - last : 0;
      const int64_t replay = std::min(gap, horizon);
      A* p = pbuf.data();
      A* mo = mbuf.data();
      A* v = vbuf.data();
      T* prow = param + r * d;
      float* master_row = master ? master + r * d : nullptr;
      S* mrow = exp_avg + r * d;
      S* vrow = exp_avg_sq + r * d;
      for (int64_t t = 0; t < d; ++t) {
        p[t] = master_row ? A(master_row[t]) : load<A>(prow[t]);
        mo[t] = load<A>(mrow[t]);
        v[t] = load<A>(vrow[t]);
      }
      // the skipped steps last+1 .. last+replay, each a dense Adam step with a zero gradient
      for (int64_t j = last + 1; j <= last + replay; ++j) {
        const A ss = A(schedule[2 * j]), bs = A(schedule[2 * j + 1]);
        for (int64_t t = 0; t < d; ++t) {
          mo[t] = lerp(mo[t], A(0));
          v[t] = v[t] * b2;
          p[t] = p[t] + (-ss * mo[t]) / (std::sqrt(v[t]) / bs + epsilon);
        }
      }
      if (gap > replay) {  // past the horizon the drift is below rounding; the moments still decay
        const A d1 = A(std::pow(beta1, static_cast<double>(gap - replay)));
        const A d2 = A(std::pow(beta2, static_cast<double>(gap - replay)));
        for (int64_t t = 0; t < d; ++t) {
          mo[t] *= d1;
          v[t] *= d2;
        }
      }
      if (has_grad) {
        const T* g = grads + q * d;
        for (int64_t t = 0; t < d; ++t) {
          const A gt = load<A>(g[t]);
          mo[t] = lerp(mo[t], gt);
          v[t] = v[t] * b2 + (c2 * gt) * gt;
          p[t] = p[t] + (-step_size * mo[t]) / (std::sqrt(v[t]) / bias_sqrt + epsilon);
        }
      }
      for (int64_t t = 0; t < d; ++t) {
        if (master_row) master_row[t] = static_cast<float>(p[t]);
        prow[t] = store_acc<T>(p[t]);
        mrow[t] = store_acc<S>(mo[t]);
        vrow[t] = store_acc<S>(v[t]);
      }
    }
  }
}

}  // namespace

void sparse_adam(void* param, float* master, void* exp_avg, void* exp_avg_sq, int64_t* last_step,
                 const int64_t* rows, int64_t m, const void* grads, int64_t d, int64_t step,
                 const double* schedule, double beta1, double beta2, double eps, int64_t horizon,
                 int param_dtype, int state_dtype) {
  dispatch_float(param_dtype, "param", [&](auto ptag) {
    using T = decltype(ptag);
    return dispatch_float(state_dtype, "exp_avg", [&](auto stag) {
      using S = decltype(stag);
      adam_rows<T, S>(static_cast<T*>(param), master, static_cast<S*>(exp_avg),
                      static_cast<S*>(exp_avg_sq), last_step, rows, m, static_cast<const T*>(grads), d,
                      step, schedule, beta1, beta2, eps, horizon);
      return 0;
    });
  });
  for (int64_t q = 0; q < m; ++q) last_step[rows[q]] = step;
}

}  // namespace flashsae::cpu
