// Canonical encoder scores and the per-latent terms of the certified top-k (the CPU half of
// topk_encode's rescoring; flashsae.ops.topk_encode derives the error bound these feed).
//
// Every product x[t] * W[t] of float32/bfloat16/float16 values is exact in float64 (at most 24 + 24
// significant bits), so dot64 below depends only on its summation order, which is fixed: 32 partial
// sums (lane = t mod 32) combined in a fixed tree. Whether the compiler fuses the multiply-add or
// vectorizes the lanes cannot change a bit of it.
#include <cmath>
#include <cstring>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/kernels.h"
#include "cpu/vector_load.h"

namespace flashsae::cpu {
namespace {

constexpr int kLanes = 8;

typedef double v8d __attribute__((vector_size(64)));
typedef VectorTypes<kLanes>::f32 v8f;
typedef VectorTypes<kLanes>::u16 v8u16;
typedef VectorTypes<kLanes>::u32 v8u32;


typedef uint32_t v16u32 __attribute__((vector_size(64)));
typedef float v16f32 __attribute__((vector_size(64)));

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same blocks in AVX-512 intrinsics: GCC compiles widen_block's conversions as pairs of 128 ->
// 256-bit ones plus inserts and extracts even in the avx512f clone; one vcvtps2pd zmm per eight
// elements is what the block needs. Sums identical to widen_block's (products exact in float64).
#define FLASHSAE_AVX512_BLOCKS 1
#pragma GCC diagnostic push
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_* as the masked-off source: a false positive
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// (and _mm512_reduce_add_pd warns outright: sums go through memory instead, sum_lanes)
__attribute__((target("avx512f"))) inline double sum_lanes(__m512d v) {
  double lanes[8];
  _mm512_storeu_pd(lanes, v);
  return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

__attribute__((target("avx512f"))) void dot64_bf16_blocks_512(const double* xp, const bf16* w, int64_t blocks,
                                                              double* lanes_out, bool squares, double* sq_out) {
  __m512d p[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  __m512d q[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  for (int64_t blk = 0; blk < blocks; ++blk) {
    v16u32 u;  // the shift and mask in vector extensions (GCC 12's _mm512_slli_epi32 warns)
    std::memcpy(&u, w + 32 * blk, sizeof u);
    const v16u32 bits[2] = {u << 16, u & 0xffff0000u};
    __m512 halves[2];
    std::memcpy(halves, bits, sizeof halves);
    for (int h = 0; h < 2; ++h) {
      __m256 eight[2];  // the halves by memcpy (GCC 12's cast / extract intrinsics warn as well)
      std::memcpy(eight, &halves[h], sizeof eight);
      const __m512d lo = _mm512_cvtps_pd(eight[0]);
      const __m512d hi = _mm512_cvtps_pd(eight[1]);
      if (xp != nullptr) {
        p[2 * h] = _mm512_fmadd_pd(_mm512_loadu_pd(xp + 32 * blk + 16 * h), lo, p[2 * h]);
        p[2 * h + 1] = _mm512_fmadd_pd(_mm512_loadu_pd(xp + 32 * blk + 16 * h + 8), hi, p[2 * h + 1]);
      }
      if (squares) {
        q[2 * h] = _mm512_fmadd_pd(lo, lo, q[2 * h]);
        q[2 * h + 1] = _mm512_fmadd_pd(hi, hi, q[2 * h + 1]);
      }
    }
  }
  for (int a = 0; a < 4; ++a) _mm512_storeu_pd(lanes_out + 8 * a, p[a]);
  if (squares) {
    const __m512d s = _mm512_add_pd(_mm512_add_pd(q[0], q[1]), _mm512_add_pd(q[2], q[3]));
    *sq_out = sum_lanes(s);
  }
}

// float32 rows, the same way (GCC splits the vector-extension float -> float64 conversions here too;
// used for encoder_latent_stats only: in the rescoring of float32 candidates it measured no faster,
// 12.8 ms either way, bound by fetching the candidates' scattered 3 KiB rows of W):
// blocks of 32 in dot64's natural lane order (lanes_out[l] sums elements t = l mod 32), the dot with
// xd (x or beta; null: none); with `low`, each element rounded to bfloat16 (round8's ties-to-even
// formula) is written there and the squares of the rounded values and of the residuals (exact in
// float32: v - round(v) is v's low mantissa bits) are summed, else the squares of the values.
__attribute__((target("avx512f"))) void f32_blocks_512(const double* xd, const float* w, int64_t blocks,
                                                       double* lanes_out, bf16* low, double* sq_out,
                                                       double* res_out) {
  __m512d p[4], q[4], r[4];
  for (int a = 0; a < 4; ++a) p[a] = q[a] = r[a] = _mm512_setzero_pd();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int h = 0; h < 2; ++h) {
      const int64_t t = 32 * blk + 16 * h;
      const __m512 v = _mm512_loadu_ps(w + t);
      __m256 eight[2];
      std::memcpy(eight, &v, sizeof eight);
      const __m512d vd[2] = {_mm512_cvtps_pd(eight[0]), _mm512_cvtps_pd(eight[1])};
      if (xd != nullptr) {
        p[2 * h] = _mm512_fmadd_pd(_mm512_loadu_pd(xd + t), vd[0], p[2 * h]);
        p[2 * h + 1] = _mm512_fmadd_pd(_mm512_loadu_pd(xd + t + 8), vd[1], p[2 * h + 1]);
      }
      if (low != nullptr) {
        v16u32 u;
        std::memcpy(&u, &v, sizeof u);
        const v16u32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        const v16u32 top = rounded >> 16;
        __m512i top_i;
        std::memcpy(&top_i, &top, sizeof top_i);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + t), _mm512_cvtepi32_epi16(top_i));
        __m512 lo;
        std::memcpy(&lo, &rounded, sizeof lo);
        const __m512 residual = _mm512_sub_ps(v, lo);
        __m256 lo8[2], res8[2];
        std::memcpy(lo8, &lo, sizeof lo8);
        std::memcpy(res8, &residual, sizeof res8);
        for (int e = 0; e < 2; ++e) {
          const __m512d lod = _mm512_cvtps_pd(lo8[e]);
          const __m512d rd = _mm512_cvtps_pd(res8[e]);
          q[2 * h + e] = _mm512_fmadd_pd(lod, lod, q[2 * h + e]);
          r[2 * h + e] = _mm512_fmadd_pd(rd, rd, r[2 * h + e]);
        }
      } else {
        q[2 * h] = _mm512_fmadd_pd(vd[0], vd[0], q[2 * h]);
        q[2 * h + 1] = _mm512_fmadd_pd(vd[1], vd[1], q[2 * h + 1]);
      }
    }
  }
  for (int a = 0; a < 4; ++a) _mm512_storeu_pd(lanes_out + 8 * a, p[a]);
  *sq_out = sum_lanes(_mm512_add_pd(_mm512_add_pd(q[0], q[1]), _mm512_add_pd(q[2], q[3])));
  *res_out = sum_lanes(_mm512_add_pd(_mm512_add_pd(r[0], r[1]), _mm512_add_pd(r[2], r[3])));
}
#pragma GCC diagnostic pop

inline bool has_avx512() {
  static const bool value = __builtin_cpu_supports("avx512f");
  return value;
}
#endif

// Thirty-two lanes as four GCC / Clang vectors of eight (four AVX-512 registers: four independent
// FMA chains, so a 768-long dot is not bound by one chain's latency); lane l sums t = l mod 32 in
// order, exactly as a scalar loop over the lanes would, and the lanes combine in a fixed tree.
template <typename T>
inline __attribute__((always_inline)) double dot64_body(const double* xd, const T* w, int64_t d) {
  v8d acc[4] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  int64_t t = 0;
  for (; t + 4 * kLanes <= d; t += 4 * kLanes) {
    for (int a = 0; a < 4; ++a) {
      v8d xv;
      std::memcpy(&xv, xd + t + a * kLanes, sizeof xv);
      acc[a] += xv * __builtin_convertvector(load_lanes<8>(w + t + a * kLanes), v8d);
    }
  }
  for (int l = 0; t + l < d; ++l) acc[l / kLanes][l % kLanes] += xd[t + l] * static_cast<double>(to_float(w[t + l]));
  const v8d sum = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  return ((sum[0] + sum[4]) + (sum[2] + sum[6])) + ((sum[1] + sum[5]) + (sum[3] + sum[7]));
}

// bfloat16 rows, the same sums with a tenth of the shuffles. dot64_body widens eight bfloat16 values
// through zero-extensions, inserts and extracts (about 7 port-5 shuffles per 8 elements: the
// rescoring of 1024 rows x 42 candidates at d=768 took 5.4 ms on 2 threads with W in cache, bound by
// them). Here a block of 32 elements is one 64-byte load of sixteen 32-bit words, word i holding
// elements 2i (low half) and 2i + 1 (high half): `<< 16` and `& 0xffff0000` widen the even and the odd
// elements to float32 without a shuffle, and four conversions to float64 follow. Physical lanes:
// p[0] = even t < 16, p[1] = even t >= 16, p[2] = odd t < 16, p[3] = odd t >= 16 of each block, so
// x (and b_dec in row_sums_bf16) is stored in that order per full block (permute_blocks) and the
// lanes go back to dot64's order before its tree: every lane sums the same products in the same
// order, the result is bit for bit dot64_body's. Measured on 2 threads, d=768 (median of 9): 1024 rows x 42
// random candidates 7.35 -> 4.82 ms (W in cache: 5.38 -> 3.03); encoder_latent_stats over all 24576
// latents 7.4 -> 3.3 ms inside a bf16 topk_encode.

// Full blocks of 32 of a d-long row into the physical lane order above, in place; the tail stays.
inline void permute_blocks(double* row, int64_t d) {
  double block[4 * kLanes];
  for (int64_t t = 0; t + 4 * kLanes <= d; t += 4 * kLanes) {
    for (int i = 0; i < kLanes; ++i) {
      block[i] = row[t + 2 * i];
      block[kLanes + i] = row[t + 16 + 2 * i];
      block[2 * kLanes + i] = row[t + 2 * i + 1];
      block[3 * kLanes + i] = row[t + 17 + 2 * i];
    }
    std::memcpy(row + t, block, sizeof block);
  }
}

inline __attribute__((always_inline)) void widen_block(const bf16* w, v8d* parts) {
  v16u32 u;
  std::memcpy(&u, w, sizeof u);
  const v16u32 halves[2] = {u << 16, u & 0xffff0000u};
  for (int h = 0; h < 2; ++h) {
    v8f lo, hi;
    std::memcpy(&lo, &halves[h], sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&halves[h]) + sizeof lo, sizeof hi);
    parts[2 * h] = __builtin_convertvector(lo, v8d);
    parts[2 * h + 1] = __builtin_convertvector(hi, v8d);
  }
}

// Physical lanes p back to dot64's lane order (lane l at lanes[l]).
inline __attribute__((always_inline)) void unpermute(const v8d* p, double* lanes) {
  for (int i = 0; i < kLanes; ++i) {
    lanes[2 * i] = p[0][i];
    lanes[16 + 2 * i] = p[1][i];
    lanes[2 * i + 1] = p[2][i];
    lanes[17 + 2 * i] = p[3][i];
  }
}

inline double tree(const double* lanes) {  // dot64's fixed tree over lanes 0 .. 31
  v8d acc[4];
  std::memcpy(acc, lanes, sizeof acc);
  const v8d sum = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  return ((sum[0] + sum[4]) + (sum[2] + sum[6])) + ((sum[1] + sum[5]) + (sum[3] + sum[7]));
}


// The full 4·kLanes blocks of a bfloat16 row through dot64_bf16_blocks_512 where the CPU has
// AVX-512 (their lanes into acc, the sum of the squares of w into *sq unless sq is null); returns
// where the portable loop goes on: d rounded down to whole blocks, or 0 without AVX-512.
inline __attribute__((always_inline)) int64_t avx512_full_blocks(const double* xp, const bf16* w, int64_t d, v8d* acc,
                                                                 double* sq) {
#ifdef FLASHSAE_AVX512_BLOCKS
  if (has_avx512()) {
    double physical[4 * kLanes];
    dot64_bf16_blocks_512(xp, w, d / (4 * kLanes), physical, sq != nullptr, sq);
    std::memcpy(acc, physical, sizeof physical);
    return d / (4 * kLanes) * (4 * kLanes);
  }
#endif
  return 0;
}

// xp: x in float64, full blocks permuted (permute_blocks).
inline __attribute__((always_inline)) double dot64_bf16_body(const double* xp, const bf16* w, int64_t d) {
  v8d p[4] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  int64_t t = avx512_full_blocks(xp, w, d, p, nullptr);
  for (; t + 4 * kLanes <= d; t += 4 * kLanes) {
    v8d wv[4];
    widen_block(w + t, wv);
    for (int a = 0; a < 4; ++a) {
      v8d xv;
      std::memcpy(&xv, xp + t + a * kLanes, sizeof xv);
      p[a] += xv * wv[a];
    }
  }
  double lanes[4 * kLanes];
  unpermute(p, lanes);
  for (int l = 0; t + l < d; ++l) lanes[l] += xp[t + l] * static_cast<double>(to_float(w[t + l]));
  return tree(lanes);
}

// One clone per storage type (FLASHSAE_CLONES, cpu/dtype.h): eight float64 lanes are one AVX-512
// register, which keeps the rescoring of k + margin candidates per row small next to the GEMM.
// bfloat16: x must be in permute_blocks order.
FLASHSAE_CLONES double dot64(const double* xd, const float* w, int64_t d) { return dot64_body(xd, w, d); }
FLASHSAE_CLONES double dot64(const double* xp, const bf16* w, int64_t d) { return dot64_bf16_body(xp, w, d); }
FLASHSAE_CLONES double dot64(const double* xd, const f16* w, int64_t d) { return dot64_body(xd, w, d); }

// sqrt(sum of squares) rounded up to float: the float64 sum of d squares is within a relative
// d * 2^-53 of the exact one, far inside the 2^-20 added before rounding.
inline float norm_up(double sum_sq) {
  return static_cast<float>(std::sqrt(sum_sq) * (1.0 + 0x1p-20));
}

inline __attribute__((always_inline)) v8f round8(v8f v, bf16*) {  // to bfloat16, ties to even
  v8u32 u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  v8f r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}
inline __attribute__((always_inline)) v8f round8(v8f v, float*) { return v; }
inline __attribute__((always_inline)) void store8(v8f v, bf16* out) {
  v8u32 u;
  std::memcpy(&u, &v, sizeof u);
  const v8u16 h = __builtin_convertvector(u >> 16, v8u16);
  std::memcpy(out, &h, sizeof h);
}
inline __attribute__((always_inline)) void store8(v8f v, float* out) { std::memcpy(out, &v, sizeof v); }

inline double sum8(v8d a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

// What one latent row contributes, in one pass over it (each element loaded and widened once):
// dot64(beta, w) in dot64's lane order when HasBeta, the sum of squares of w rounded to L (written
// to `low`) and of the rounding residuals when HasLow, else of w itself. Four accumulators of each
// kind, so no sum waits on its own previous FMA. One thread, W in cache (n=512, d=768): a dot pass
// plus a separate single-chain pass for the squares took 0.70 ns per bfloat16 element (0.35 float32),
// this 0.36 (0.20); at n=24576 the pass is then bound by reading W from memory.
struct RowSums {
  double dot, low_sq, res_sq;
};

template <typename T, typename L, bool HasBeta, bool HasLow>
inline __attribute__((always_inline)) RowSums row_sums_body(const double* beta, const T* w, int64_t d, L* low) {
  const v8d zero = {0, 0, 0, 0, 0, 0, 0, 0};
  v8d dot[4] = {zero, zero, zero, zero}, sq[4] = {zero, zero, zero, zero}, res[4] = {zero, zero, zero, zero};
  int64_t t = 0;
  double sq512 = 0, res512 = 0;
#ifdef FLASHSAE_AVX512_BLOCKS
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<L, bf16> || !HasLow)) {
    if (has_avx512()) {  // float32 weights (certified): 13.5 -> 7.2 ms per fp32 topk_encode
      double lanes[4 * kLanes];
      t = d / (4 * kLanes) * (4 * kLanes);
      bf16* low_bf16 = nullptr;
      if constexpr (HasLow) low_bf16 = low;
      f32_blocks_512(HasBeta ? beta : nullptr, w, d / (4 * kLanes), lanes, low_bf16, &sq512, &res512);
      std::memcpy(dot, lanes, sizeof dot);
    }
  }
#endif
  for (; t + 4 * kLanes <= d; t += 4 * kLanes) {
    for (int a = 0; a < 4; ++a) {
      const v8f v = load_lanes<8>(w + t + a * kLanes);
      const v8d vd = __builtin_convertvector(v, v8d);
      if constexpr (HasBeta) {
        v8d bv;
        std::memcpy(&bv, beta + t + a * kLanes, sizeof bv);
        dot[a] += bv * vd;
      }
      if constexpr (HasLow) {
        const v8f lo = round8(v, low);
        store8(lo, low + t + a * kLanes);
        const v8d lod = __builtin_convertvector(lo, v8d);
        const v8d r = vd - lod;  // exact: lo is v rounded
        sq[a] += lod * lod;
        res[a] += r * r;
      } else {
        sq[a] += vd * vd;
      }
    }
  }
  for (int l = 0; t + l < d; ++l) {  // the tail, lane l % 32 as in dot64
    const float v = to_float(w[t + l]);
    float lo = v;
    if constexpr (HasLow) {
      const L rounded = store<L>(v);
      low[t + l] = rounded;
      lo = to_float(rounded);
    }
    if constexpr (HasBeta) dot[l / kLanes][l % kLanes] += beta[t + l] * static_cast<double>(v);
    const double r = static_cast<double>(v) - lo;
    sq[l / kLanes][l % kLanes] += static_cast<double>(lo) * lo;
    res[l / kLanes][l % kLanes] += r * r;
  }
  // the dot's fixed tree is dot64's; the squares' order is free (they only feed norm_up's bound)
  return {sum8((dot[0] + dot[2]) + (dot[1] + dot[3])), sum8((sq[0] + sq[1]) + (sq[2] + sq[3])),
          sum8((res[0] + res[1]) + (res[2] + res[3]))};
}

// bfloat16 rows without a low copy (bfloat16 weights, bfloat16 GEMM): dot64_bf16_body's widening,
// beta in permute_blocks order; the dot's lanes return to dot64's order before its tree.
inline __attribute__((always_inline)) RowSums row_sums_bf16_body(const double* beta_p, const bf16* w, int64_t d) {
  const v8d zero = {0, 0, 0, 0, 0, 0, 0, 0};
  v8d dot[4] = {zero, zero, zero, zero}, sq[4] = {zero, zero, zero, zero};
  double sq512 = 0;
  int64_t t = avx512_full_blocks(beta_p, w, d, dot, &sq512);
  for (; t + 4 * kLanes <= d; t += 4 * kLanes) {
    v8d wv[4];
    widen_block(w + t, wv);
    for (int a = 0; a < 4; ++a) {
      if (beta_p != nullptr) {
        v8d bv;
        std::memcpy(&bv, beta_p + t + a * kLanes, sizeof bv);
        dot[a] += bv * wv[a];
      }
      sq[a] += wv[a] * wv[a];
    }
  }
  double lanes[4 * kLanes];
  unpermute(dot, lanes);
  double tail_sq = 0;
  for (int l = 0; t + l < d; ++l) {
    const double v = to_float(w[t + l]);
    if (beta_p != nullptr) lanes[l] += beta_p[t + l] * v;
    tail_sq += v * v;
  }
  return {tree(lanes), sum8((sq[0] + sq[1]) + (sq[2] + sq[3])) + sq512 + tail_sq, 0.0};
}
FLASHSAE_CLONES RowSums row_sums_bf16(const double* beta_p, const bf16* w, int64_t d) {
  return row_sums_bf16_body(beta_p, w, d);
}

#define FLASHSAE_ROW_SUMS(T, L)                                                                          \
  FLASHSAE_CLONES RowSums row_sums(const double* beta, const T* w, int64_t d, L* low) {                  \
    if (beta != nullptr)                                                                                 \
      return low != nullptr ? row_sums_body<T, L, true, true>(beta, w, d, low)                           \
                            : row_sums_body<T, L, true, false>(beta, w, d, low);                         \
    return low != nullptr ? row_sums_body<T, L, false, true>(beta, w, d, low)                            \
                          : row_sums_body<T, L, false, false>(beta, w, d, low);                          \
  }
FLASHSAE_ROW_SUMS(float, float)
FLASHSAE_ROW_SUMS(float, bf16)
FLASHSAE_ROW_SUMS(bf16, float)
FLASHSAE_ROW_SUMS(bf16, bf16)
FLASHSAE_ROW_SUMS(f16, float)
FLASHSAE_ROW_SUMS(f16, bf16)
#undef FLASHSAE_ROW_SUMS

template <typename T, typename L>
void latent_stats_impl(const T* W, const T* b_enc, const T* b_dec, int64_t n, int64_t d, double* bias64,
                       float* q1, float* q2, L* W_low) {
  std::vector<double> beta(static_cast<size_t>(d), 0.0);
  if (b_dec != nullptr)
    for (int64_t t = 0; t < d; ++t) beta[t] = load<double>(b_dec[t]);
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  if (kBf16 && W_low == nullptr) permute_blocks(beta.data(), d);
#pragma omp parallel for schedule(dynamic, 64)  // dynamic: see topk_state_merge
  for (int64_t j = 0; j < n; ++j) {
    const double* beta_p = b_dec != nullptr ? beta.data() : nullptr;
    RowSums sums;
    if constexpr (kBf16) {
      sums = W_low == nullptr ? row_sums_bf16(beta_p, W + j * d, d) : row_sums(beta_p, W + j * d, d, W_low + j * d);
    } else {
      sums = row_sums(beta_p, W + j * d, d, W_low != nullptr ? W_low + j * d : nullptr);
    }
    bias64[j] = load<double>(b_enc[j]) - sums.dot;
    // float addition rounds down by at most 2^-24: norm_up's 2^-20 covers it
    q1[j] = norm_up(sums.low_sq) + norm_up(sums.res_sq);
    q2[j] = norm_up(sums.res_sq);
  }
}

// x in float64 (bfloat16: in dot64's physical lane order), in a buffer kept per calling thread: a
// fresh 6 MiB vector (rows=1024, d=768) comes from mmap and pages in on every call once the process
// has freed larger blocks (torch's dense tensors), about 1.4 ms of a bf16 topk_encode. (The OpenMP
// workers reach it through the returned plain pointer: inside the regions the name of a thread_local
// would be each worker's own, empty, vector.)
template <typename T>
double* widen_rows(const T* x, int64_t rows, int64_t d) {
  thread_local std::vector<double> buffer;
  if (buffer.size() < static_cast<size_t>(rows * d)) buffer.resize(static_cast<size_t>(rows * d));
  double* const xd = buffer.data();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t t = 0; t < d; ++t) xd[b * d + t] = load<double>(x[b * d + t]);
    if constexpr (std::is_same_v<T, bf16>) permute_blocks(xd + b * d, d);  // dot64's bf16 order
  }
  return xd;
}

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// Candidates shared by every row (idx_ld == 0: the exact recompute of a few rows, chunk by chunk):
// row by row, the chunk of W stays in cache across rows.
template <typename T>
void rescore_shared(const double* xd, const T* W, const double* bias64, const int32_t* idx, int64_t rows,
                    int64_t m, int64_t n, int64_t d, float* out) {
#pragma omp parallel for collapse(2) schedule(dynamic, 64)
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < m; ++j) {  // collapsed: a few recomputed rows still use every thread
      const int32_t id = idx[j];
      out[b * m + j] = (id < 0 || id >= n) ? -std::numeric_limits<float>::infinity()
                                           : static_cast<float>(dot64(xd + b * d, W + id * d, d) + bias64[id]);
    }
  }
}

// Candidates per row (the heaps): latent by latent. Row by row, every candidate was a scattered row
// of W fetched from memory (1024 rows x 64 candidates of a float32 [24576, 768] W: 200 MB of random
// 3 KiB reads for 50 M products, 19-20 ms on 2 threads of the EPYC, 12.8 ms on the Xeon). Grouped by
// latent (a counting sort of the (row, slot) pairs), each touched row of W is read once, in index
// order, and the scattered reads are of x's float64 rows, 6 MiB that stay in the last-level cache.
// The sums are the same dot64 calls: the scores are bit for bit the row-by-row ones.
template <typename T>
void rescore_by_latent(const double* xd, const T* W, const double* bias64, const int32_t* idx, int64_t idx_ld,
                       int64_t rows, int64_t m, int64_t n, int64_t d, float* out) {
  thread_local std::vector<int64_t> start;  // CSR over latents: pairs of latent j at start[j] .. start[j+1]
  thread_local std::vector<int64_t> pairs;  // b * m + slot
  start.assign(static_cast<size_t>(n + 1), 0);
  pairs.resize(static_cast<size_t>(rows * m));
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < m; ++j) {
      const int32_t id = idx[b * idx_ld + j];
      if (id < 0 || id >= n) {
        out[b * m + j] = -std::numeric_limits<float>::infinity();  // an empty heap slot
      } else {
        ++start[id + 1];
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) start[j + 1] += start[j];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t j = 0; j < m; ++j) {
        const int32_t id = idx[b * idx_ld + j];
        if (id >= 0 && id < n) pairs[fill[id]++] = b * m + j;
      }
    }
  }
  const int64_t* const s = start.data();
  const int64_t* const p = pairs.data();
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t id = 0; id < n; ++id) {
    const T* w = W + id * d;
    const double bias = bias64[id];
    for (int64_t e = s[id]; e < s[id + 1]; ++e) {
      if (e + 1 < s[id + 1]) prefetch_row(xd + p[e + 1] / m * d, d * static_cast<int64_t>(sizeof(double)));
      out[p[e]] = static_cast<float>(dot64(xd + p[e] / m * d, w, d) + bias);
    }
  }
}

template <typename T>
void rescore_impl(const T* x, const T* W, const double* bias64, const int32_t* idx, int64_t idx_ld,
                  int64_t rows, int64_t m, int64_t n, int64_t d, float* out) {
  const double* xd = widen_rows(x, rows, d);
  if (idx_ld == 0) {
    rescore_shared(xd, W, bias64, idx, rows, m, n, d, out);
  } else {
    rescore_by_latent(xd, W, bias64, idx, idx_ld, rows, m, n, d, out);
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
