// Top-k select over wide rows on CUDA: the selection half of topk_encode's cuda backend, and a
// standalone row top-k (torch.topk's job) for scores of any width.
//
// topk_select_kernel: one 256-thread block per row. The block streams the row's scores once, in
// slices of 2048 (8 consecutive scores per thread, one or two 16-byte loads, the next slice's loads
// issued before the current one is processed), and keeps the row's select state in shared memory:
// the k best keys so far plus a buffer of candidates (topk_keys.h has the key format and the
// algorithm; topk_encode_host.cpp is the sequential mirror CI tests). Per slice:
//   1. keys of the 8 scores (optionally + bias[latent], relu'd); count those above the threshold
//      (the state's minimum key), for the main and the aux (dead latents only) selections;
//   2. if the buffer cannot take them, merge: radix select over state + buffer, 8 bits per pass
//      from the top (histogram, then the bin holding rank k), usually done after 3-4 passes; the k
//      keys at or above the cut become the state, and the threshold rises to their minimum;
//   3. append the slice's candidates (warp-aggregated: one shared atomic per warp).
// State in global memory ([rows, k] uint64, initially 0 = empty) is read at the start and written
// at the end, so a row can be fed in several launches (the chunked encoder: one launch per latent
// chunk) with the same result as one launch over the whole row.
// topk_finish_kernel sorts each row's state (CUB block radix sort, keys descending) and writes
// values (in the output dtype) and int32 latents; an empty key gives value 0 and latent -1.
//
// Cost: the scores are read once; the state (8k bytes per row) once per launch. Merges cost
// O(passes * (k + 2048)) shared-memory work and, after the first slice, happen only when 2048
// candidates have piled up: ~k (1 + ln(n / k)) candidates reach a row's buffer in all, so a row of
// n = 131072 at k = 256 merges ~3 times.
#include <cub/block/block_radix_sort.cuh>

#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"
#include "cuda/topk_keys.h"
#include "dtype_codes.h"

namespace flashsae::cuda {
namespace {

using topk::DigitChoice;
using topk::kEmptyKey;
using topk::kRadixBins;
using topk::RadixCut;

constexpr int kThreads = 256;
constexpr int kItems = 8;                   // scores per thread per slice
constexpr int kSlice = kThreads * kItems;   // 2048 scores per slice
constexpr int kCapacity = kSlice;           // candidate buffer: after a merge a whole slice fits
constexpr uint32_t kFullMask = 0xffffffffu;
static_assert(kThreads == kRadixBins, "one histogram bin per thread");
static_assert(32 * 8 == kRadixBins, "warp 0's 32 lanes scan 8 bins each");

struct SelectShared {
  uint32_t bins[kRadixBins];
  uint32_t count[2];       // candidates in the buffer: [0] main, [1] aux
  uint32_t slice_pass[2];  // candidates of the current slice, counted before they are appended
  uint64_t threshold[2];   // minimum key of each state
  DigitChoice choice;      // the radix step's result, written by one lane of warp 0
  uint32_t kept;           // compaction counter of a merge
  unsigned long long min_key;
};

// Block-wide (all 32 lanes of every warp call it): reserves one slot per lane with take == true
// in *counter; returns this lane's slot (meaningful only where take is true). One shared atomic per
// warp; slots within a warp follow lane order.
__device__ __forceinline__ uint32_t warp_reserve(bool take, uint32_t* counter) {
  const uint32_t ballot = __ballot_sync(kFullMask, take);
  const int lane = threadIdx.x & 31;
  uint32_t base = 0;
  if (lane == 0 && ballot != 0) base = atomicAdd(counter, static_cast<uint32_t>(__popc(ballot)));
  base = __shfl_sync(kFullMask, base, 0);
  return base + static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
}

__device__ __forceinline__ uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

// Block-wide: *out = min(keys[0 .. k)). Ends with a barrier, so *out is visible to all.
__device__ void set_threshold(const uint64_t* keys, int k, uint64_t* out, SelectShared& sh) {
  if (threadIdx.x == 0) sh.min_key = ~0ull;
  __syncthreads();
  uint64_t m = ~0ull;
  for (int j = threadIdx.x; j < k; j += kThreads) m = min_u64(m, keys[j]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = min_u64(m, __shfl_xor_sync(kFullMask, m, offset));
  if ((threadIdx.x & 31) == 0) atomicMin(&sh.min_key, static_cast<unsigned long long>(m));
  __syncthreads();
  if (threadIdx.x == 0) *out = sh.min_key;
  __syncthreads();
}

// Block-wide radix select over keys[0 .. m), 1 <= k <= m: returns the cut of topk_keys.h (exactly
// the k largest keys, counting duplicates, are >= cut). Same steps as host::radix_cut.
__device__ uint64_t block_radix_cut(const uint64_t* keys, int m, int k, SelectShared& sh) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  RadixCut cut;
  cut.remaining = static_cast<uint32_t>(k);
  for (int shift = topk::kKeyBits - topk::kRadixBits; shift >= 0; shift -= topk::kRadixBits) {
    sh.bins[threadIdx.x] = 0;
    __syncthreads();
    // Histogram of the current digit over the entries still in play (matching the prefix). The trip
    // count is the same for every thread, so all 32 lanes reach __match_any_sync together; lanes
    // with the same digit add their count with one atomic (the top digits of nearby scores are
    // shared by most entries, which would otherwise serialize 32 atomics on one bin).
    for (int base = 0; base < m; base += kThreads) {
      const int i = base + static_cast<int>(threadIdx.x);
      const uint64_t key = i < m ? keys[i] : kEmptyKey;
      const bool in_play = i < m && (key & cut.mask) == cut.prefix;
      const uint32_t digit = in_play ? topk::key_digit(key, shift) : static_cast<uint32_t>(kRadixBins);
      const uint32_t peers = __match_any_sync(kFullMask, digit);
      if (in_play && lane == __ffs(peers) - 1) atomicAdd(&sh.bins[digit], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();
    // The bin of rank `remaining`, digits scanned from 255 down (host: choose_digit(bins, 255, 0)).
    // Lane l sums digits 255 - 8l .. 248 - 8l; an inclusive scan over lanes gives the count above
    // each lane's range; exactly one lane has excl < remaining <= incl (counts are >= 0 and the
    // total in play is >= remaining), and it finishes the scan inside its 8 bins.
    if (warp == 0) {
      const int hi = kRadixBins - 1 - 8 * lane;
      uint32_t own = 0;
#pragma unroll
      for (int t = 0; t < 8; ++t) own += sh.bins[hi - t];
      uint32_t incl = own;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const uint32_t up = __shfl_up_sync(kFullMask, incl, offset);
        if (lane >= offset) incl += up;
      }
      const uint32_t excl = incl - own;
      if (excl < cut.remaining && cut.remaining <= incl)
        sh.choice = topk::choose_digit(sh.bins, hi, hi - 7, cut.remaining - excl);
    }
    __syncthreads();
    // Every thread folds the same choice, so the loop exit below is uniform. The next pass rewrites
    // bins only after every thread has passed the barrier above (their reads of bins and choice
    // happen before it or right here).
    if (cut.fold(sh.choice, shift)) break;
  }
  return cut.prefix;
}

// Block-wide merge of one selection: buf = [state: k keys | buffer: count[which] candidates].
// Afterwards buf[0 .. k) holds the k best keys (empty keys fill up when fewer real keys exist),
// the buffer is empty and threshold[which] is the new state minimum. Ends with a barrier.
__device__ void merge(uint64_t* buf, int k, int which, uint64_t* scratch, SelectShared& sh) {
  const int m = k + static_cast<int>(sh.count[which]);  // read by all before any barrier below
  const uint64_t cut = block_radix_cut(buf, m, k, sh);
  if (threadIdx.x == 0) sh.kept = 0;
  __syncthreads();
  // Real keys >= cut: exactly k of them, or all real keys when fewer than k exist (then cut is 0).
  for (int base = 0; base < m; base += kThreads) {
    const int i = base + static_cast<int>(threadIdx.x);
    const uint64_t key = i < m ? buf[i] : kEmptyKey;
    const bool take = key != kEmptyKey && key >= cut;
    const uint32_t pos = warp_reserve(take, &sh.kept);
    if (take && pos < static_cast<uint32_t>(k)) scratch[pos] = key;  // pos < k always; the test guards memory
  }
  __syncthreads();
  const int kept = min(static_cast<int>(sh.kept), k);
  for (int j = threadIdx.x; j < k; j += kThreads) buf[j] = j < kept ? scratch[j] : kEmptyKey;
  if (threadIdx.x == 0) sh.count[which] = 0;
  __syncthreads();
  set_threshold(buf, k, &sh.threshold[which], sh);
}

// A thread's 8 scores of one slice, as the raw 32-bit words they were loaded in (bf16/fp16: two
// per word). Kept packed until used so that a prefetched slice's loads stay in flight.
template <typename T> struct SliceWords {
  static constexpr int kWords = static_cast<int>(kItems * sizeof(T) / 4);
  uint32_t w[kWords];

  __device__ __forceinline__ float score(int u) const {
    return Elem<T>::get(w[u / Elem<T>::kPerWord], u % Elem<T>::kPerWord);
  }
};

// Loads the thread's scores of the slice starting at s0: 16-byte loads when the whole slice is in
// the row and the row is 16-byte aligned (kVector), else element by element (columns >= cols read
// as 0 and are never used).
template <typename T, bool kVector>
__device__ __forceinline__ void load_slice(const T* row, int64_t s0, int64_t cols, SliceWords<T>& out) {
  const int64_t c = s0 + static_cast<int64_t>(threadIdx.x) * kItems;
  if (kVector && s0 + kSlice <= cols) {
    const uint4* q = reinterpret_cast<const uint4*>(row + c);
#pragma unroll
    for (int v = 0; v < SliceWords<T>::kWords / 4; ++v) {
      const uint4 u = __ldg(q + v);
      out.w[4 * v] = u.x;
      out.w[4 * v + 1] = u.y;
      out.w[4 * v + 2] = u.z;
      out.w[4 * v + 3] = u.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < SliceWords<T>::kWords; ++i) out.w[i] = 0;
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      if (c + u < cols) {
        constexpr int kPer = Elem<T>::kPerWord;
        out.w[u / kPer] |= Elem<T>::raw(row[c + u]) << (16 * (u % kPer));
      }
    }
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    topk_select_kernel(const T* __restrict__ scores, int64_t ld, int64_t cols, int64_t col0,
                       const float* __restrict__ bias, int relu, uint64_t* __restrict__ state, int k,
                       const uint8_t* __restrict__ dead_mask, uint64_t* __restrict__ aux_state, int aux_k) {
  extern __shared__ uint64_t smem_keys[];
  __shared__ SelectShared sh;
  const int64_t row = blockIdx.x;
  const bool has_aux = aux_k > 0;
  uint64_t* buf_main = smem_keys;                                     // [k + kCapacity]
  uint64_t* buf_aux = buf_main + k + kCapacity;                       // [aux_k + kCapacity] if has_aux
  uint64_t* scratch = buf_aux + (has_aux ? aux_k + kCapacity : 0);    // [max(k, aux_k)]

  for (int j = threadIdx.x; j < k; j += kThreads) buf_main[j] = state[row * k + j];
  for (int j = threadIdx.x; j < aux_k; j += kThreads) buf_aux[j] = aux_state[row * aux_k + j];
  if (threadIdx.x == 0) {
    sh.count[0] = sh.count[1] = 0;
    sh.slice_pass[0] = sh.slice_pass[1] = 0;
    sh.threshold[1] = ~0ull;  // no aux selection: nothing passes
  }
  __syncthreads();
  set_threshold(buf_main, k, &sh.threshold[0], sh);
  if (has_aux) set_threshold(buf_aux, aux_k, &sh.threshold[1], sh);

  const T* row_scores = scores + row * ld;
  SliceWords<T> words;
  load_slice<T, kVector>(row_scores, 0, cols, words);
  for (int64_t s0 = 0; s0 < cols; s0 += kSlice) {
    const bool has_next = s0 + kSlice < cols;
    SliceWords<T> next;
    if (has_next) load_slice<T, kVector>(row_scores, s0 + kSlice, cols, next);

    // 1. keys of this thread's 8 scores (an out-of-row column gets the empty key, which never passes)
    uint64_t keys[kItems];
    bool dead[kItems];
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const int64_t c = s0 + static_cast<int64_t>(threadIdx.x) * kItems + u;
      const bool valid = c < cols;
      const int64_t latent = col0 + c;  // < 2^31: checked by the host
      float s = words.score(u);
      if (bias != nullptr && valid) s += __ldg(bias + latent);
      if (relu) s = topk::relu_score(s);
      keys[u] = valid ? topk::make_key(s, static_cast<int32_t>(latent)) : kEmptyKey;
      dead[u] = has_aux && valid && __ldg(dead_mask + latent) != 0;
    }
    {
      const uint64_t thr_main = sh.threshold[0];
      const uint64_t thr_aux = sh.threshold[1];
      uint32_t pass_main = 0, pass_aux = 0;
#pragma unroll
      for (int u = 0; u < kItems; ++u) {
        pass_main += keys[u] > thr_main;
        pass_aux += dead[u] && keys[u] > thr_aux;
      }
      pass_main = __reduce_add_sync(kFullMask, pass_main);
      pass_aux = __reduce_add_sync(kFullMask, pass_aux);
      if ((threadIdx.x & 31) == 0) {
        if (pass_main) atomicAdd(&sh.slice_pass[0], pass_main);
        if (pass_aux) atomicAdd(&sh.slice_pass[1], pass_aux);
      }
    }
    __syncthreads();
    // 2. merge a buffer that cannot take this slice's candidates (a uniform decision: every thread
    // reads the same counts between the two barriers)
    const bool merge_main = sh.count[0] + sh.slice_pass[0] > static_cast<uint32_t>(kCapacity);
    const bool merge_aux = has_aux && sh.count[1] + sh.slice_pass[1] > static_cast<uint32_t>(kCapacity);
    // Once the thresholds are up most slices have no candidate at all: skip their appends. (A merge
    // only raises a threshold, so a slice with none before a merge has none after it.)
    const bool any_candidate = sh.slice_pass[0] + sh.slice_pass[1] > 0;
    __syncthreads();
    if (threadIdx.x == 0) sh.slice_pass[0] = sh.slice_pass[1] = 0;  // next written after the barrier at the end
    if (merge_main) merge(buf_main, k, 0, scratch, sh);
    if (merge_aux) merge(buf_aux, aux_k, 1, scratch, sh);
    // 3. append the candidates against the (possibly raised) thresholds. At most kSlice of them,
    // and the buffer held at most kCapacity - (their count at the old threshold) or was just
    // emptied, so every slot is < kCapacity.
    if (any_candidate) {  // uniform
      const uint64_t thr_main = sh.threshold[0];
      const uint64_t thr_aux = sh.threshold[1];
#pragma unroll
      for (int u = 0; u < kItems; ++u) {
        const bool take_main = keys[u] > thr_main;
        const uint32_t pos_main = warp_reserve(take_main, &sh.count[0]);
        if (take_main && pos_main < static_cast<uint32_t>(kCapacity)) buf_main[k + pos_main] = keys[u];
        if (has_aux) {  // uniform
          const bool take_aux = dead[u] && keys[u] > thr_aux;
          const uint32_t pos_aux = warp_reserve(take_aux, &sh.count[1]);
          if (take_aux && pos_aux < static_cast<uint32_t>(kCapacity)) buf_aux[aux_k + pos_aux] = keys[u];
        }
      }
    }
    __syncthreads();
    if (has_next) words = next;
  }
  if (sh.count[0] > 0) merge(buf_main, k, 0, scratch, sh);
  if (has_aux && sh.count[1] > 0) merge(buf_aux, aux_k, 1, scratch, sh);
  for (int j = threadIdx.x; j < k; j += kThreads) state[row * k + j] = buf_main[j];
  for (int j = threadIdx.x; j < aux_k; j += kThreads) aux_state[row * aux_k + j] = buf_aux[j];
}

template <int kSortItems, typename V>
__global__ void __launch_bounds__(kThreads)
    topk_finish_kernel(const uint64_t* __restrict__ state, int k, V* __restrict__ values,
                       int32_t* __restrict__ indices) {
  using Sort = cub::BlockRadixSort<uint64_t, kThreads, kSortItems>;
  __shared__ typename Sort::TempStorage temp;
  const int64_t row = blockIdx.x;
  uint64_t keys[kSortItems];  // blocked arrangement: thread t holds ranks t * kSortItems + u
#pragma unroll
  for (int u = 0; u < kSortItems; ++u) {
    const int j = static_cast<int>(threadIdx.x) * kSortItems + u;
    keys[u] = j < k ? state[row * k + j] : kEmptyKey;  // padding sorts last, with the empty keys
  }
  Sort(temp).SortDescending(keys);
#pragma unroll
  for (int u = 0; u < kSortItems; ++u) {
    const int j = static_cast<int>(threadIdx.x) * kSortItems + u;
    if (j < k) {
      const uint64_t key = keys[u];
      Elem<V>::store(values + row * k + j, key == kEmptyKey ? 0.f : topk::key_value(key));
      indices[row * k + j] = topk::key_latent(key);
    }
  }
}

template <typename T, bool kVector>
cudaError_t launch_select(const void* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                          const float* bias, bool relu, uint64_t* state, int k, const uint8_t* dead_mask,
                          uint64_t* aux_state, int aux_k, cudaStream_t stream) {
  const size_t keys = static_cast<size_t>(k + kCapacity) + (aux_k > 0 ? static_cast<size_t>(aux_k + kCapacity) : 0) +
                      static_cast<size_t>(k > aux_k ? k : aux_k);
  const size_t bytes = keys * sizeof(uint64_t);
  auto kernel = topk_select_kernel<T, kVector>;
  if (bytes > 32 * 1024) {
    // Past 48 KiB of static + dynamic shared memory a kernel must opt in; the static part is ~1 KiB,
    // so opt in from 32 KiB on. At most 80 KiB (k = aux_k = 2048): within every sm_80+ opt-in limit.
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear it, or the next call's launch check would report it again
      return err;
    }
  }
  kernel<<<static_cast<unsigned>(rows), kThreads, bytes, stream>>>(
      static_cast<const T*>(scores), ld, cols, col0, bias, relu ? 1 : 0, state, k, dead_mask, aux_state, aux_k);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_select(const void* scores, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                            const float* bias, bool relu, uint64_t* state, int k, const uint8_t* dead_mask,
                            uint64_t* aux_state, int aux_k, cudaStream_t stream) {
  // 16-byte loads need every row start aligned: the base pointer and the row stride in bytes
  const bool vector = aligned16(scores) && (static_cast<int64_t>(ld * sizeof(T)) % 16) == 0;
  if (vector)
    return launch_select<T, true>(scores, ld, rows, cols, col0, bias, relu, state, k, dead_mask, aux_state, aux_k,
                                  stream);
  return launch_select<T, false>(scores, ld, rows, cols, col0, bias, relu, state, k, dead_mask, aux_state, aux_k,
                                 stream);
}

template <typename V>
cudaError_t launch_finish(const uint64_t* state, int64_t rows, int k, void* values, int32_t* indices,
                          cudaStream_t stream) {
  V* out = static_cast<V*>(values);
  const dim3 grid(static_cast<unsigned>(rows));
  if (k <= kThreads)
    topk_finish_kernel<1, V><<<grid, kThreads, 0, stream>>>(state, k, out, indices);
  else if (k <= 2 * kThreads)
    topk_finish_kernel<2, V><<<grid, kThreads, 0, stream>>>(state, k, out, indices);
  else if (k <= 4 * kThreads)
    topk_finish_kernel<4, V><<<grid, kThreads, 0, stream>>>(state, k, out, indices);
  else
    topk_finish_kernel<8, V><<<grid, kThreads, 0, stream>>>(state, k, out, indices);
  return cudaGetLastError();
}

static_assert(8 * kThreads == topk::kMaxK, "the finish kernel's largest sort holds kMaxK keys");

}  // namespace

int topk_select_slice() { return kSlice; }
int topk_select_capacity() { return kCapacity; }

cudaError_t topk_select(const void* scores, int score_dtype, int64_t ld, int64_t rows, int64_t cols, int64_t col0,
                        const float* bias, bool relu, uint64_t* state, int k, const uint8_t* dead_mask,
                        uint64_t* aux_state, int aux_k, cudaStream_t stream) {
  return dispatch_dtype(score_dtype, [&](auto tag) {
    return dispatch_select<decltype(tag)>(scores, ld, rows, cols, col0, bias, relu, state, k, dead_mask, aux_state,
                                          aux_k, stream);
  });
}

cudaError_t topk_finish(const uint64_t* state, int64_t rows, int k, void* values, int32_t* indices, int value_dtype,
                        cudaStream_t stream) {
  return dispatch_dtype(value_dtype, [&](auto tag) {
    return launch_finish<decltype(tag)>(state, rows, k, values, indices, stream);
  });
}

}  // namespace flashsae::cuda
