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

#include <cmath>
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
template <bool kAbs = false, typename A>
A chunk_max(const A* x, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  A m = kAbs ? A(0) : -std::numeric_limits<A>::infinity();
  auto load = [&](int64_t j) {
    const Vec v = Vec::loadu(x + j);
    return kAbs ? v.abs() : v;
  };
  int64_t j = 0;
  if (n >= 4 * W) {
    Vec m0(m), m1(m), m2(m), m3(m);
    for (; j + 4 * W <= n; j += 4 * W) {
      m0 = at::vec::maximum(load(j), m0);
      m1 = at::vec::maximum(load(j + W), m1);
      m2 = at::vec::maximum(load(j + 2 * W), m2);
      m3 = at::vec::maximum(load(j + 3 * W), m3);
    }
    const Vec mv = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    m = at::vec::vec_reduce_all<A>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, mv);
  }
  for (; j < n; ++j) m = nan_max(m, kAbs ? std::abs(x[j]) : x[j]);
  return m;
}

}  // namespace pykd::cpu::CPU_CAPABILITY
