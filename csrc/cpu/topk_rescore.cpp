// Canonical encoder scores and the per-latent terms of the certified top-k (the CPU half of
// topk_encode's rescoring; flashsae.ops.topk_encode derives the error bound these feed).
//
// Every product x[t] * W[t] of float32/bfloat16/float16 values is exact in float64 (at most 24 + 24
// significant bits), so dot64 below depends only on its summation order, which is fixed: eight
// partial sums (lane = t mod 8), combined as ((0+4)+(2+6))+((1+5)+(3+7)). Whether the compiler
// fuses the multiply-add or vectorizes the lanes cannot change a bit of it.
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"

namespace flashsae::cpu {
namespace {

constexpr int kLanes = 8;

template <typename T> inline double dot64(const double* xd, const T* w, int64_t d) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += xd[t + l] * load<double>(w[t + l]);
  for (int l = 0; t + l < d; ++l) acc[l] += xd[t + l] * load<double>(w[t + l]);
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// sqrt(sum of squares) rounded up to float: the float64 sum of d squares is within a relative
// d * 2^-53 of the exact one, far inside the 2^-20 added before rounding.
inline float norm_up(double sum_sq) {
  return static_cast<float>(std::sqrt(sum_sq) * (1.0 + 0x1p-20));
}

template <typename T, typename L>
void latent_stats_impl(const T* W, const T* b_enc, const T* b_dec, int64_t n, int64_t d, double* bias64,
                       float* q1, float* q2, L* W_low) {
  std::vector<double> beta(static_cast<size_t>(d), 0.0);
  if (b_dec != nullptr)
    for (int64_t t = 0; t < d; ++t) beta[t] = load<double>(b_dec[t]);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const T* w = W + j * d;
    bias64[j] = load<double>(b_enc[j]) - (b_dec != nullptr ? dot64(beta.data(), w, d) : 0.0);
    double low_sq = 0.0, res_sq = 0.0;
    if (W_low != nullptr) {
      L* out = W_low + j * d;
      for (int64_t t = 0; t < d; ++t) {
        const float v = to_float(w[t]);
        const L r = store<L>(v);
        out[t] = r;
        const double lo = to_float(r);
        low_sq += lo * lo;
        res_sq += (v - lo) * (v - lo);  // v - lo is exact in float64
      }
      q1[j] = norm_up(low_sq) + norm_up(res_sq);  // float addition rounds: norm_up's 2^-20 covers it
      q2[j] = norm_up(res_sq);
    } else {
      for (int64_t t = 0; t < d; ++t) {
        const double v = load<double>(w[t]);
        low_sq += v * v;
      }
      q1[j] = norm_up(low_sq);
      q2[j] = 0.0f;
    }
  }
}

template <typename T>
void rescore_impl(const T* x, const T* W, const double* bias64, const int32_t* idx, int64_t idx_ld,
                  int64_t rows, int64_t m, int64_t n, int64_t d, float* out) {
  std::vector<double> xd(static_cast<size_t>(rows * d));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t t = 0; t < d; ++t) xd[b * d + t] = load<double>(x[b * d + t]);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < m; ++j) {
      const int32_t id = idx[b * idx_ld + j];
      out[b * m + j] = (id < 0 || id >= n)
                           ? -std::numeric_limits<float>::infinity()
                           : static_cast<float>(dot64(xd.data() + b * d, W + id * d, d) + bias64[id]);
    }
  }
}

}  // namespace

void encoder_latent_stats(const void* W, const void* b_enc, const void* b_dec, int64_t n, int64_t d,
                          int dtype, double* bias64, float* q1, float* q2, void* W_low, int low_dtype) {
  dispatch_float(dtype, "W", [&](auto w) {
    using T = decltype(w);
    if constexpr (std::is_same_v<T, double>) {
      throw std::invalid_argument("W: canonical scores are for float32, bfloat16 and float16 weights");
    } else {
      if (W_low == nullptr) {
        latent_stats_impl<T, float>(static_cast<const T*>(W), static_cast<const T*>(b_enc),
                                    static_cast<const T*>(b_dec), n, d, bias64, q1, q2, nullptr);
      } else if (low_dtype == static_cast<int>(DType::BFloat16)) {
        latent_stats_impl<T, bf16>(static_cast<const T*>(W), static_cast<const T*>(b_enc),
                                   static_cast<const T*>(b_dec), n, d, bias64, q1, q2, static_cast<bf16*>(W_low));
      } else if (low_dtype == static_cast<int>(DType::Float32)) {
        latent_stats_impl<T, float>(static_cast<const T*>(W), static_cast<const T*>(b_enc),
                                    static_cast<const T*>(b_dec), n, d, bias64, q1, q2, static_cast<float*>(W_low));
      } else {
        throw std::invalid_argument(std::string("W_low: unsupported dtype ") + dtype_name(low_dtype) +
                                    " (expected bfloat16 or float32)");
      }
    }
    return 0;
  });
}

void topk_rescore(const void* x, const void* W, const double* bias64, const int32_t* idx, int64_t idx_ld,
                  int64_t rows, int64_t m, int64_t n, int64_t d, int dtype, float* out) {
  dispatch_float(dtype, "x", [&](auto v) {
    using T = decltype(v);
    if constexpr (std::is_same_v<T, double>) {
      throw std::invalid_argument("x: canonical scores are for float32, bfloat16 and float16 operands");
    } else {
      rescore_impl(static_cast<const T*>(x), static_cast<const T*>(W), bias64, idx, idx_ld, rows, m, n, d, out);
    }
    return 0;
  });
}

}  // namespace flashsae::cpu
