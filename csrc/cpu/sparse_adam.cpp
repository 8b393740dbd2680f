// Fused sparse Adam on CPU: one pass per touched row (see python/flashsae/ops/sparse_adam.py for the
// math: replay of the skipped zero-gradient steps, then the row's own step).
//
// Rows are independent (they are unique), so threads take whole rows. float32 / float64 rows are
// updated in place; other storage (bf16 / f16 parameters or moments, a master copy) is converted
// into thread-local float32 rows once, updated, and rounded back once. The replayed steps sweep the
// row in L1 (the loop over d vectorizes: this file is compiled with -fno-math-errno so sqrt
// vectorizes). The per-step scalars of the replayed steps come from the schedule table.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"

namespace flashsae::cpu {
namespace {

// The float32 row loops are multi-versioned (FLASHSAE_CLONES, cpu/dtype.h): sqrt + division are the
// whole cost of a replayed step, so the vector width matters (4 lanes -> 16).

// torch.lerp's two formulas (aten/src/ATen/native/Lerp.h): from the start for weight < 0.5.
template <typename A> struct Lerp {
  A weight, rest;
  bool from_start;
};

// One Adam step over d elements held in float32 (a replayed zero-gradient step when g is null):
//   m = lerp(m, g, 1 - beta1); v = v * beta2 + (1 - beta2) g^2; p -= ss * m / (sqrt(v) / bs + eps)
FLASHSAE_CLONES void adam_step_f32(float* __restrict p, float* __restrict m, float* __restrict v,
                                   const float* __restrict g, int64_t d, float weight, float rest,
                                   bool from_start, float b2, float c2, float ss, float bs, float eps) {
  if (g == nullptr) {
    if (from_start) {
      for (int64_t t = 0; t < d; ++t) {
        m[t] = m[t] + weight * (0.0f - m[t]);
        v[t] = v[t] * b2;
        p[t] = p[t] + (-ss * m[t]) / (std::sqrt(v[t]) / bs + eps);
      }
    } else {
      for (int64_t t = 0; t < d; ++t) {
        m[t] = 0.0f - (0.0f - m[t]) * rest;
        v[t] = v[t] * b2;
        p[t] = p[t] + (-ss * m[t]) / (std::sqrt(v[t]) / bs + eps);
      }
    }
    return;
  }
  if (from_start) {
    for (int64_t t = 0; t < d; ++t) {
      m[t] = m[t] + weight * (g[t] - m[t]);
      v[t] = v[t] * b2 + (c2 * g[t]) * g[t];
      p[t] = p[t] + (-ss * m[t]) / (std::sqrt(v[t]) / bs + eps);
    }
  } else {
    for (int64_t t = 0; t < d; ++t) {
      m[t] = g[t] - (g[t] - m[t]) * rest;
      v[t] = v[t] * b2 + (c2 * g[t]) * g[t];
      p[t] = p[t] + (-ss * m[t]) / (std::sqrt(v[t]) / bs + eps);
    }
  }
}

// The same in double, for float64 parameters (no multi-versioning: a CPU-side reference dtype).
void adam_step_f64(double* __restrict p, double* __restrict m, double* __restrict v,
                   const double* __restrict g, int64_t d, double weight, double rest, bool from_start,
                   double b2, double c2, double ss, double bs, double eps) {
  for (int64_t t = 0; t < d; ++t) {
    const double gt = g ? g[t] : 0.0;
    m[t] = from_start ? m[t] + weight * (gt - m[t]) : gt - (gt - m[t]) * rest;
    v[t] = v[t] * b2 + (c2 * gt) * gt;
    p[t] = p[t] + (-ss * m[t]) / (std::sqrt(v[t]) / bs + eps);
  }
}

inline void adam_step(float* p, float* m, float* v, const float* g, int64_t d, const Lerp<float>& l,
                      float b2, float c2, float ss, float bs, float eps) {
  adam_step_f32(p, m, v, g, d, l.weight, l.rest, l.from_start, b2, c2, ss, bs, eps);
}
inline void adam_step(double* p, double* m, double* v, const double* g, int64_t d,
                      const Lerp<double>& l, double b2, double c2, double ss, double bs, double eps) {
  adam_step_f64(p, m, v, g, d, l.weight, l.rest, l.from_start, b2, c2, ss, bs, eps);
}

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
  // Rows of the math type in place: no copies (float32 / float64 parameters and moments, no master)
  constexpr bool in_place = std::is_same_v<T, A> && std::is_same_v<S, A>;
#pragma omp parallel
  {
    std::vector<A> buffers(in_place ? 0 : static_cast<size_t>(4 * d));
#pragma omp for schedule(dynamic, 16)
    for (int64_t q = 0; q < m; ++q) {
      const int64_t r = rows[q];
      const int64_t last = last_step[r];
      const int64_t gap = (last > 0 && upto > last) ? upto - last : 0;
      const int64_t replay = std::min(gap, horizon);
      T* prow = param + r * d;
      float* master_row = master ? master + r * d : nullptr;
      S* mrow = exp_avg + r * d;
      S* vrow = exp_avg_sq + r * d;
      const T* grow = has_grad ? grads + q * d : nullptr;
      A *p, *mo, *v;
      const A* g;
      if constexpr (in_place) {
        p = prow, mo = mrow, v = vrow, g = grow;
      } else {
        p = buffers.data(), mo = p + d, v = mo + d;
        A* gbuf = v + d;
        for (int64_t t = 0; t < d; ++t) {
          p[t] = master_row ? A(master_row[t]) : load<A>(prow[t]);
          mo[t] = load<A>(mrow[t]);
          v[t] = load<A>(vrow[t]);
          if (grow) gbuf[t] = load<A>(grow[t]);
        }
        g = grow ? gbuf : nullptr;
      }
      // the skipped steps last+1 .. last+replay, each a dense Adam step with a zero gradient
      for (int64_t j = last + 1; j <= last + replay; ++j)
        adam_step(p, mo, v, nullptr, d, lerp, b2, c2, A(schedule[2 * j]), A(schedule[2 * j + 1]), epsilon);
      if (gap > replay) {  // past the horizon the drift is below rounding; the moments still decay
        const A d1 = A(std::pow(beta1, static_cast<double>(gap - replay)));
        const A d2 = A(std::pow(beta2, static_cast<double>(gap - replay)));
        for (int64_t t = 0; t < d; ++t) {
          mo[t] *= d1;
          v[t] *= d2;
        }
      }
      if (has_grad) adam_step(p, mo, v, g, d, lerp, b2, c2, step_size, bias_sqrt, epsilon);
      if constexpr (!in_place) {
        for (int64_t t = 0; t < d; ++t) {
          if (master_row) master_row[t] = static_cast<float>(p[t]);
          prow[t] = store_acc<T>(p[t]);
          mrow[t] = store_acc<S>(mo[t]);
          vrow[t] = store_acc<S>(v[t]);
        }
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
