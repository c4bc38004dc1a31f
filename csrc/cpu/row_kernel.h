// Per-ISA helpers shared by the CPU row kernels (distill_loss_kernel.cpp,
// distill_loss_topk_kernel.cpp). Only those files include it: CMake compiles each once per
// instruction set with CPU_CAPABILITY set, so every helper here is built for that ISA's vectors
// and lives in its namespace (pykd::cpu::AVX2::chunk_max, ...); a file compiled once would get the
// DEFAULT lanes only.
#pragma once

#ifndef CPU_CAPABILITY
#error "cpu/row_kernel.h belongs to the per-ISA kernel files (CMakeLists.txt: PYKD_CPU_KERNEL_SRC)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "pykd/distill_math.h"

namespace pykd {
inline namespace PYKD_ISA_NAMESPACE {
// Lane-group math for the shared formulas: exp_u20 is ATen's fast float exp (about 1e-6 relative
// error, a third of Sleef's cost); it is plain exp for double.
template <typename A>
struct VMath<at::vec::Vectorized<A>> {
  using Vec = at::vec::Vectorized<A>;
  static Vec exp(Vec x) { return x.exp_u20(); }
  static Vec log(Vec x) { return x.log(); }
  static Vec keep(Vec c, Vec v) { return Vec::blendv(Vec(A(0)), v, c > Vec(A(0))); }
};
}  // namespace PYKD_ISA_NAMESPACE
}  // namespace pykd

namespace pykd::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Populate the pages under [p, p + bytes) for writing (new_gradient's row-by-row plan); pages
// shared with a neighbouring row are populated twice, which is a no-op the second time.
inline void populate_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  if (p == nullptr) return;
  const auto begin = reinterpret_cast<uintptr_t>(p) & ~(kPage - 1);
  const auto end = (reinterpret_cast<uintptr_t>(p) + bytes + kPage - 1) & ~(kPage - 1);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#endif
}

// Columns per chunk: two float inputs and two gradients of this size fit a 48 KB L1.
constexpr int64_t kChunk = 2048;

template <typename S, typename A>
const A* widen(const S* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<S, A>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename A>
A lane_sum(Vectorized<A> v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A> x, Vectorized<A> y) { return x + y; }, v);
}

// Max (or with kAbs, max |x|) of a chunk, NaN kept: the row's non-finite check reads it, and no
// kernel may rely on its exp to carry a NaN along (ATen's fast exp does not on every ISA). Four
// independent accumulators keep the max units busy (one running max is a latency-bound chain).
// The max itself is the one-instruction kind, which may drop a NaN (at::vec::maximum keeps it
// but costs four, measured +12..30% on whole calls); instead the bits of x * 0 are OR-ed
// alongside, which turn NaN for any NaN or infinite x, and only a chunk flagged that way is
// scanned again for NaN (a chunk with masked -inf entries pays that L1-resident pass).
// Without kFlag no NaN is looked for (cosine: a NaN shows in its scaled sums instead).
template <bool kAbs = false, bool kFlag = true, typename A>
A chunk_max(const A* x, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  A m = kAbs ? A(0) : -std::numeric_limits<A>::infinity();
  A flag = 0;
  auto load = [&](int64_t j) {
    const Vec v = Vec::loadu(x + j);
    return kAbs ? v.abs() : v;
  };
  int64_t j = 0;
  if (n >= 4 * W) {
    const Vec zero(A(0));
    Vec m0(m), m1(m), m2(m), m3(m), f0(zero), f1(zero);
    for (; j + 4 * W <= n; j += 4 * W) {
      const Vec a = load(j), b = load(j + W), c = load(j + 2 * W), d = load(j + 3 * W);
      m0 = at::vec::clamp_min(a, m0);
      m1 = at::vec::clamp_min(b, m1);
      m2 = at::vec::clamp_min(c, m2);
      m3 = at::vec::clamp_min(d, m3);
      // x * 0 is a signed zero unless x is NaN or infinite; OR-ing the bits keeps a NaN
      // pattern once one appears, with a one-cycle loop-carried dependency (an add or a fused
      // multiply-add chain here made mse's first sweep latency-bound: +12 ms at 2048 x 32000).
      if constexpr (kFlag) {
        f0 = f0 | ((a * zero) | (b * zero));
        f1 = f1 | ((c * zero) | (d * zero));
      }
    }
    const Vec mv = at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3));
    m = at::vec::vec_reduce_all<A>([](Vec a, Vec b) { return at::vec::clamp_min(a, b); }, mv);
    flag = lane_sum(f0 | f1);
  }
  for (; j < n; ++j) {
    const A v = kAbs ? std::abs(x[j]) : x[j];
    m = std::max(m, v);
    if constexpr (kFlag) flag += v * A(0);
  }
  if (kFlag && flag != flag) {  // a NaN or an infinity somewhere: a NaN makes the max NaN
    for (int64_t i = 0; i < n; ++i) {
      if (x[i] != x[i]) return std::numeric_limits<A>::quiet_NaN();
    }
  }
  return m;
}

// Rows per parallel task: enough work that scheduling costs little next to it. A row costs its
// classes plus a fixed part (label, logs, lane reductions: ~100 ns, some 64 columns' worth), which
// counts at small V: at V = 2, 16384 / V rows kept 4096-row batches on one thread.
inline int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, 16384 / (std::max<int64_t>(classes, 1) + 64));
}

// Whether a row holds a NaN or an infinity: the slow path of a row whose sums came out
// non-finite, to tell a bad input from an overflow.
template <typename S>
bool any_nonfinite(const S* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    if (!(v - v == 0.0)) return true;
  }
  return false;
}

}  // namespace pykd::cpu::CPU_CAPABILITY
