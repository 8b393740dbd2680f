// The top-k select of flashsae._C_cuda (topk_encode.cu), as plain functions shared by the device
// kernel and a sequential host mirror (topk_encode_host.cpp, compiled into flashsae._C), so that the
// algorithm itself is tested on every CI run, GPU or not. The kernel parallelizes the same steps;
// where it differs (histograms by shared-memory atomics, the digit search split over a warp), the
// comments in topk_encode.cu say why the parallel form computes the same thing.
//
// Keys. A candidate (score v, latent i) is one 64-bit key
//     key = ordered_bits(v) << 32 | ~i        (i in [0, 2^31), so ~i in [2^31, 2^32))
// ordered_bits maps floats to uint32 monotonically (-inf < ... < -0 < +0 < ... < +inf < NaN), so
// comparing keys as integers orders by score, then by LOWER latent first (the reference's stable
// sort). Keys of distinct latents are distinct, so "the k largest keys" is one well-defined set.
// Key 0 (kEmptyKey) is "no candidate": every real key has its low word >= 2^31, so 0 is below all
// of them; it decodes to latent -1 (~0u), the empty-slot marker of the ops.
//
// Select state. Per row, `k` keys, unordered, initially all kEmptyKey. The row's scores arrive in
// slices; a score is a candidate when its key beats the state's minimum (the threshold). Candidates
// are appended to a buffer of `capacity` keys; when the next slice's candidates would not fit, the
// buffer is merged: a radix select over state + buffer finds the cut, the k best keys become the
// new state and the threshold rises to their minimum. After the first slices a new latent enters a
// row's top k with probability ~k / latents seen, so few scores pass the threshold and merges are rare.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FLASHSAE_HD __host__ __device__ __forceinline__
#else
#define FLASHSAE_HD inline
#endif

namespace flashsae::topk {

constexpr uint64_t kEmptyKey = 0;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;  // 256 bins: one per thread of a 256-thread block
constexpr int kKeyBits = 64;
// Largest k (and aux_k) the CUDA select takes: its final sort holds 8 keys per thread of 256.
constexpr int kMaxK = 2048;

// The bits of a float as uint32 and back: the device intrinsics on the GPU, memcpy on the host
// (the type punning C++17 defines).
template <typename To, typename From> FLASHSAE_HD To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From) && (std::is_same_v<To, float> || std::is_same_v<To, uint32_t>),
                "bit_cast is for float <-> uint32");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<To, uint32_t>)
    return __float_as_uint(v);
  else
    return __uint_as_float(v);
#else
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
#endif
}

// Monotone float -> uint32: non-negative floats get the sign bit set (above every negative one,
// ordered by their bits); negative floats are inverted (a larger magnitude becomes a smaller key).
FLASHSAE_HD uint32_t ordered_bits(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

FLASHSAE_HD float from_ordered_bits(uint32_t o) {
  return bit_cast<float>((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// relu that maps -0, negative values and NaN to +0 (fmaxf may keep -0 or propagate NaN), so all
// relu'd zeros share one key value and tie-break by latent.
FLASHSAE_HD float relu_score(float s) { return s > 0.f ? s : 0.f; }

FLASHSAE_HD uint64_t make_key(float value, int32_t latent) {
  return (static_cast<uint64_t>(ordered_bits(value)) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(latent));
}

FLASHSAE_HD float key_value(uint64_t key) { return from_ordered_bits(static_cast<uint32_t>(key >> 32)); }

// kEmptyKey decodes to -1.
FLASHSAE_HD int32_t key_latent(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key & 0xffffffffu));
}

// One step of the radix select: among the entries still in play, bins[dgt] counts those whose
// current digit is dgt. The entry of rank `remaining` (1 = largest) lies in the first bin, scanning
// digits from hi down to lo, where the running count reaches `remaining`.
// Returns that digit, the rank left inside its bin, and the bin's count.
// Precondition: 1 <= remaining <= bins[lo] + ... + bins[hi].
struct DigitChoice {
  uint32_t digit;
  uint32_t remaining;
  uint32_t bucket;
};

FLASHSAE_HD DigitChoice choose_digit(const uint32_t* bins, int hi, int lo, uint32_t remaining) {
  for (int dgt = hi; dgt > lo; --dgt) {
    const uint32_t count = bins[dgt];
    if (remaining <= count) return {static_cast<uint32_t>(dgt), remaining, count};
    remaining -= count;
  }
  return {static_cast<uint32_t>(lo), remaining, bins[lo]};  // the precondition puts it here
}

// Radix-select bookkeeping: the digits fixed so far (`prefix`, under `mask`) and how many of the
// entries matching them are still to be taken. Both implementations run exactly these updates.
struct RadixCut {
  uint64_t prefix = 0;
  uint64_t mask = 0;
  uint32_t remaining = 0;

  // Folds in the digit chosen at `shift`; returns true when the cut is final: every entry matching
  // the new prefix is taken (bucket == remaining), so "key >= prefix" selects exactly the k largest
  // (counting duplicates). After the last digit the prefix is the k-th largest key itself.
  FLASHSAE_HD bool fold(const DigitChoice& choice, int shift) {
    prefix |= static_cast<uint64_t>(choice.digit) << shift;
    mask |= static_cast<uint64_t>(kRadixBins - 1) << shift;
    remaining = choice.remaining;
    return choice.bucket == choice.remaining || shift == 0;
  }
};

FLASHSAE_HD uint32_t key_digit(uint64_t key, int shift) {
  return static_cast<uint32_t>(key >> shift) & static_cast<uint32_t>(kRadixBins - 1);
}

// Why "key >= cut" selects exactly k keys: entries whose masked bits exceed the prefix sit in bins
// above the chosen digit at some earlier step, and were all counted as taken (k - remaining of
// them); entries matching the prefix number `bucket` = `remaining`, all >= prefix (their low bits are
// >= 0); entries below the prefix at some digit are < prefix. Only kEmptyKey can repeat, and it is
// the smallest key, so a cut of 0 takes every real key (fewer than k) and empties fill the rest.

}  // namespace flashsae::topk
