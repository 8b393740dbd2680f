// Sparse Adam with a row-wise second moment on CPU: one pass per touched row (math in
// python/flashsae/ops/sparse_adam_rowwise.py). The skipped steps' drift is m times a per-row scalar
// (the denominator is per row), so the catch-up is a scalar loop of at most `horizon` steps and one
// axpy over the row, instead of `horizon` passes over d elements (sparse_adam.cpp).
//
// Rows are independent (unique), so threads take whole rows. The row's weights and first moment are
// held in thread-local float32 (float64) buffers: decoded from int8 codes + row scale, converted from
// bf16 / f16, or copied; written back once (int8: re-coded against the new row max).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"

namespace flashsae::cpu {
namespace {

constexpr int kNoFirstMoment = 0, kFloatFirstMoment = 1, kInt8FirstMoment = 2;
constexpr float kCodeMax = 127.0f;

template <typename A> struct RowwiseArgs {
  A weight, rest;  // lerp(m, g, weight) as torch computes it: rest = 1 - weight
  bool from_start;
  A beta1, beta2, c2, eps;
};

// The skipped steps' drift coefficient: sum_{i=1..replay} ss_{last+i} b1^i / (sqrt(v b2^i) / bs_{last+i} + eps).
template <typename A>
A drift_coefficient(A v, int64_t last, int64_t replay, const double* schedule, const RowwiseArgs<A>& a) {
  A coef = 0, decay1 = 1, second = v;
  for (int64_t j = last + 1; j <= last + replay; ++j) {
    decay1 *= a.beta1;
    second *= a.beta2;
    coef += A(schedule[2 * j]) * decay1 / (std::sqrt(second) / A(schedule[2 * j + 1]) + a.eps);
  }
  return coef;
}

template <typename T>
void rowwise_rows(T* param, float* master, void* exp_avg, int first_moment, int first_dtype,
                  float* exp_avg_scale, Acc<T>* exp_avg_sq, const int64_t* last_step,
                  const int64_t* rows, int64_t m, const T* grads, int64_t d, int64_t step,
                  const double* schedule, double beta1, double beta2, double eps, int64_t horizon) {
  using A = Acc<T>;
  const bool has_grad = grads != nullptr;
  const int64_t upto = has_grad ? step - 1 : step;
  const double w1 = 1.0 - beta1;
  const RowwiseArgs<A> args{A(w1), A(1) - A(w1), std::abs(A(w1)) < A(0.5), A(beta1), A(beta2), A(1.0 - beta2),
                            A(eps)};
  const A step_size = A(schedule[2 * step]), bias_sqrt = A(schedule[2 * step + 1]);
#pragma omp parallel
  {
    std::vector<A> buffers(static_cast<size_t>(2 * d));
#pragma omp for schedule(dynamic, 16)
    for (int64_t q = 0; q < m; ++q) {
      const int64_t r = rows[q];
      const int64_t last = last_step[r];
      const int64_t gap = (last > 0 && upto > last) ? upto - last : 0;
      A* p = buffers.data();
      A* mo = p + d;
      T* prow = param + r * d;
      float* master_row = master ? master + r * d : nullptr;
      for (int64_t t = 0; t < d; ++t) p[t] = master_row ? A(master_row[t]) : load<A>(prow[t]);
      if (first_moment == kInt8FirstMoment) {
        const int8_t* codes = static_cast<const int8_t*>(exp_avg) + r * d;
        const A unit = A(exp_avg_scale[r]) / A(kCodeMax * kCodeMax);
        for (int64_t t = 0; t < d; ++t) {
          const A c = A(codes[t]);
          mo[t] = (c * std::abs(c)) * unit;
        }
      } else if (first_moment == kFloatFirstMoment) {
        dispatch_float(first_dtype, "exp_avg", [&](auto stag) {
          using S = decltype(stag);
          const S* row = static_cast<const S*>(exp_avg) + r * d;
          for (int64_t t = 0; t < d; ++t) mo[t] = load<A>(row[t]);
          return 0;
        });
      } else {
        std::fill(mo, mo + d, A(0));
      }
      A v = exp_avg_sq[r];
      if (gap > 0) {
        const A coef = drift_coefficient(v, last, std::min(gap, horizon), schedule, args);
        const A decay1 = A(std::pow(beta1, static_cast<double>(gap)));
        for (int64_t t = 0; t < d; ++t) {
          p[t] = p[t] - coef * mo[t];
          mo[t] *= decay1;
        }
        v *= A(std::pow(beta2, static_cast<double>(gap)));
      }
      if (has_grad) {
        const T* grow = grads + q * d;
        A sum_sq = 0;
        for (int64_t t = 0; t < d; ++t) {
          const A g = load<A>(grow[t]);
          sum_sq += g * g;
          mo[t] = args.from_start ? mo[t] + args.weight * (g - mo[t]) : g - (g - mo[t]) * args.rest;
        }
        v = v * args.beta2 + (args.c2 * sum_sq) / A(d);
        const A factor = step_size / (std::sqrt(v) / bias_sqrt + args.eps);
        for (int64_t t = 0; t < d; ++t) p[t] = p[t] - factor * mo[t];
      }
      for (int64_t t = 0; t < d; ++t) {
        if (master_row) master_row[t] = static_cast<float>(p[t]);
        prow[t] = store_acc<T>(p[t]);
      }
      if (first_moment == kInt8FirstMoment) {
        A scale = 0;
        for (int64_t t = 0; t < d; ++t) scale = std::max(scale, std::abs(mo[t]));
        int8_t* codes = static_cast<int8_t*>(exp_avg) + r * d;
        const A safe = scale > 0 ? scale : A(1);
        for (int64_t t = 0; t < d; ++t) {
          const A magnitude = std::floor(A(kCodeMax) * std::sqrt(std::abs(mo[t]) / safe) + A(0.5));
          codes[t] = static_cast<int8_t>(mo[t] < 0 ? -magnitude : magnitude);
        }
        exp_avg_scale[r] = static_cast<float>(scale);
      } else if (first_moment == kFloatFirstMoment) {
        dispatch_float(first_dtype, "exp_avg", [&](auto stag) {
          using S = decltype(stag);
          S* row = static_cast<S*>(exp_avg) + r * d;
          for (int64_t t = 0; t < d; ++t) row[t] = store_acc<S>(mo[t]);
          return 0;
        });
      }
      exp_avg_sq[r] = v;
    }
  }
}

}  // namespace

void sparse_adam_rowwise(void* param, float* master, void* exp_avg, float* exp_avg_scale,
                         void* exp_avg_sq, int64_t* last_step, const int64_t* rows, int64_t m,
                         const void* grads, int64_t d, int64_t step, const double* schedule, double beta1,
                         double beta2, double eps, int64_t horizon, int param_dtype, int first_moment,
                         int first_moment_dtype) {
  dispatch_float(param_dtype, "param", [&](auto ptag) {
    using T = decltype(ptag);
    rowwise_rows<T>(static_cast<T*>(param), master, exp_avg, first_moment, first_moment_dtype, exp_avg_scale,
                    static_cast<Acc<T>*>(exp_avg_sq), last_step, rows, m, static_cast<const T*>(grads), d,
                    step, schedule, beta1, beta2, eps, horizon);
    return 0;
  });
  for (int64_t q = 0; q < m; ++q) last_step[rows[q]] = step;
}

}  // namespace flashsae::cpu
