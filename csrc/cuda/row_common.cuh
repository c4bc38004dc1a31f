// Row machinery shared by the CUDA row kernels (distill_loss.cu, distill_loss_topk.cu): raw shared
// storage, 16-byte packs, the deterministic warp/block/cluster merges of RowStats, and the column
// walker. Templates and inline functions only: each .cu file gets its own copy of the device code.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "pykd/distill_math.h"

namespace pykd::cuda {

namespace cg = cooperative_groups;

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kPackBytes = 16;  // one vector load or store

template <typename S>
using acc_type_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Raw shared storage: __shared__ variables cannot have constructors, RowStats has initialisers.
template <typename T, int N = 1>
struct SharedArray {
  alignas(T) unsigned char bytes[N * sizeof(T)];
  __device__ T* get() { return reinterpret_cast<T*>(bytes); }
};

template <typename S>
struct alignas(kPackBytes) Pack {
  static constexpr int kSize = kPackBytes / sizeof(S);
  S v[kSize];
};

template <typename A>
__device__ RowStats<A> shfl_xor(const RowStats<A>& v, int mask) {
  RowStats<A> o;
  o.t.max = __shfl_xor_sync(0xffffffffu, v.t.max, mask);
  o.t.sum = __shfl_xor_sync(0xffffffffu, v.t.sum, mask);
  o.s.max = __shfl_xor_sync(0xffffffffu, v.s.max, mask);
  o.s.sum = __shfl_xor_sync(0xffffffffu, v.s.sum, mask);
  o.s1.max = __shfl_xor_sync(0xffffffffu, v.s1.max, mask);
  o.s1.sum = __shfl_xor_sync(0xffffffffu, v.s1.sum, mask);
  o.cross = __shfl_xor_sync(0xffffffffu, v.cross, mask);
  o.nss = __shfl_xor_sync(0xffffffffu, v.nss, mask);
  o.ntt = __shfl_xor_sync(0xffffffffu, v.ntt, mask);
  o.abs_s = __shfl_xor_sync(0xffffffffu, v.abs_s, mask);
  o.abs_t = __shfl_xor_sync(0xffffffffu, v.abs_t, mask);
  o.jsd_p = __shfl_xor_sync(0xffffffffu, v.jsd_p, mask);
  o.jsd_q = __shfl_xor_sync(0xffffffffu, v.jsd_q, mask);
  return o;
}

// Merges every thread's statistics into `out` (shared memory), in a fixed order: deterministic.
template <Divergence D, typename A>
__device__ void block_merge(RowStats<A> v, RowStats<A>* warp_buf, RowStats<A>* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = (blockDim.x + 31) / 32;
  for (int m = 16; m > 0; m >>= 1) merge_stats<D>(v, shfl_xor(v, m));
  if (lane == 0) warp_buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? warp_buf[lane] : RowStats<A>{};
    for (int m = 16; m > 0; m >>= 1) merge_stats<D>(v, shfl_xor(v, m));
    if (lane == 0) *out = v;
  }
  __syncthreads();
}

// Merges the per-block statistics of a row's cluster into `row` (every block gets the same,
// merged in rank order). A single-block row just copies.
template <Divergence D, typename A>
__device__ void cluster_merge(RowStats<A>* block, RowStats<A>* row, int cluster) {
  if (cluster == 1) {
    if (threadIdx.x == 0) *row = *block;
    __syncthreads();
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();
  if (threadIdx.x == 0) {
    RowStats<A> total = *cl.map_shared_rank(block, 0);
    for (int r = 1; r < cluster; ++r) merge_stats<D>(total, *cl.map_shared_rank(block, r));
    *row = total;
  }
  cl.sync();  // no block leaves (or reuses `block`) while another still reads it
#else
  __trap();  // clusters are only launched on sm_90 and newer
#endif
}

// Calls f(g, column, s, t, count) for each group of this block's slice, reading sp/tp (shared or
// global memory): a 16-byte pack (count = pack size, g = pack index) when packed, else a single
// column (count = 1, g = column index). s and t are in the accumulation type. With cache_s and
// cache_t, the raw values are also copied there (the first sweep filling shared memory).
template <typename S, typename A, typename F>
__device__ void for_each_group(const S* sp, const S* tp, int64_t first, int64_t n, bool packed,
                               S* cache_s, S* cache_t, F&& f) {
  // tp == nullptr: a student-only sweep (the top-k op); f then sees the student values as t too.
  if (packed) {
    constexpr int P = Pack<S>::kSize;
    for (int64_t g = threadIdx.x; g * P < n; g += blockDim.x) {
      const Pack<S> ps = reinterpret_cast<const Pack<S>*>(sp)[g];
      const Pack<S> pt = tp ? reinterpret_cast<const Pack<S>*>(tp)[g] : ps;
      if (cache_s) {
        reinterpret_cast<Pack<S>*>(cache_s)[g] = ps;
        reinterpret_cast<Pack<S>*>(cache_t)[g] = pt;
      }
      A s[P], t[P];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        s[e] = static_cast<A>(ps.v[e]);
        t[e] = static_cast<A>(pt.v[e]);
      }
      f(g, first + g * P, s, t, P);
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (cache_s) {
        cache_s[j] = sp[j];
        cache_t[j] = tp[j];
      }
      const A s = static_cast<A>(sp[j]), t = tp ? static_cast<A>(tp[j]) : s;
      f(j, first + j, &s, &t, 1);
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0; }

}  // namespace pykd::cuda
