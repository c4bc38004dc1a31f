// Row kernel of distill_loss_topk on the CPU, compiled once per instruction set like
// distill_loss_kernel.cpp (CMakeLists.txt); csrc/cpu/distill_loss_topk.cpp picks one at run time.
//
// Per row: one streaming sweep over the student's columns for its log-sum-exp at T (and at 1 for
// the hard term), k scalar steps for the teacher's softmax over its entries (and its rest bucket),
// then one gradient sweep in which the top-k columns and the target are rewritten whole.
#include "cpu/distill_loss_topk_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/row_kernel.h"

namespace pykd::cpu::CPU_CAPABILITY {
namespace {

template <typename S, typename A, Divergence D, bool kHard>
void run_topk_rows(const TopkKernelArgs& a, int64_t begin, int64_t end) {
  alignas(64) A buf[2 * kChunk];
  A* const s_buf = buf;
  A* const g_buf = buf + kChunk;
  constexpr bool kInPlace = std::is_same_v<S, A>;
  const Options<A> call{D, A(a.temperature), A(1.0 / a.temperature), A(a.alpha), A(a.beta), kHard};
  const int64_t V = a.classes, K = a.k;
  const A norm = *static_cast<const A*>(a.norm);
  const A* w = static_cast<const A*>(a.weight);
  A* u = static_cast<A*>(a.row_loss);
  std::vector<A> p(K);
  constexpr A kInf = std::numeric_limits<A>::infinity();

  for (int64_t i = begin; i < end; ++i) {
    const S* srow = static_cast<const S*>(a.student) + i * a.student_stride;
    S* g_row = a.grad_student ? static_cast<S*>(a.grad_student) + i * V : nullptr;
    const int64_t* idx = a.topk_index + i * K;
    const A* tl = static_cast<const A*>(a.topk_logit) + i * K;
    const A log_rest = a.log_rest ? static_cast<const A*>(a.log_rest)[i] : -kInf;
    auto fill_row = [&](A u_value, S g_value) {
      u[i] = u_value;
      if (g_row) std::fill_n(g_row, V, g_value);
    };
    auto bad = [&] {
      std::atomic_ref<int64_t>(*a.bad_row).store(i, std::memory_order_relaxed);
      fill_row(std::numeric_limits<A>::quiet_NaN(), S(NAN));
    };
    Options<A> o = call;
    int64_t y;  // < 0: no label is read
    const RowLabel label = begin_row(a, i, o, y);
    if (label == RowLabel::Ignored || label == RowLabel::Bad) {
      fill_row(label == RowLabel::Bad ? std::numeric_limits<A>::quiet_NaN() : A(0),
               label == RowLabel::Bad ? S(NAN) : S(0));
      continue;
    }
    bool indices_ok = true;
    for (int64_t j = 0; j < K; ++j) indices_ok &= idx[j] >= 0 && idx[j] < V;
    if (!indices_ok) {
      bad();
      continue;
    }

    // The student's softmax at T (and at 1 for the hard term): one streaming sweep.
    Lse<A> ls, l1;
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t n = std::min(kChunk, V - off);
      const A* sc = widen(srow + off, n, s_buf);
      const A m = chunk_max(sc, n);
      advance(ls, m * o.inv_temperature);
      if constexpr (kHard) advance(l1, m);
      using Vec = Vectorized<A>;
      const A sh = ls.shift(), sh1 = l1.shift();
      Vec acc(A(0)), acc1(A(0));
      A tail = 0, tail1 = 0;
      int64_t j = 0;
      for (; j + Vec::size() <= n; j += Vec::size()) {
        const Vec x = Vec::loadu(sc + j);
        acc = acc + VMath<Vec>::exp(x * Vec(o.inv_temperature) - Vec(sh));
        if constexpr (kHard) acc1 = acc1 + VMath<Vec>::exp(x - Vec(sh1));
      }
      for (; j < n; ++j) {
        tail += std::exp(sc[j] * o.inv_temperature - sh);
        if constexpr (kHard) tail1 += std::exp(sc[j] - sh1);
      }
      ls.sum += lane_sum(acc) + tail;
      l1.sum += lane_sum(acc1) + tail1;
    }
    // The teacher's softmax over its k entries at T.
    A tmax = -kInf;
    for (int64_t j = 0; j < K; ++j) tmax = nan_max(tmax, tl[j] * o.inv_temperature);
    if (ls.max == -kInf || tmax == -kInf || (kHard && l1.max == -kInf)) {
      bad();
      continue;
    }
    if (bad_max(ls.max) || bad_max(tmax) || (kHard && bad_max(l1.max))) {
      fill_row(std::numeric_limits<A>::quiet_NaN(), S(NAN));  // a NaN or +inf logit
      continue;
    }
    A tsum = 0;
    for (int64_t j = 0; j < K; ++j) tsum += std::exp(tl[j] * o.inv_temperature - tmax);
    // With a rest r the k entries share 1 - r of the teacher's mass.
    const A lt = std::log(tsum) - topk_log_kept(log_rest);

    TopkConsts<A> kc{};
    kc.ms = ls.shift();
    kc.ls = ls.log_sum();
    kc.m1 = l1.shift();
    kc.l1 = l1.log_sum();
    A acc_p = 0, acc_q = 0, q_mass = 0;
    bool target_in_topk = false;
    for (int64_t j = 0; j < K; ++j) {
      const A lp = (tl[j] * o.inv_temperature - tmax) - lt;
      p[j] = std::exp(lp);
      target_in_topk |= idx[j] == y;
      if (topk_slot_in_rest(tl[j], log_rest)) continue;
      topk_entry<D>(o, kc, p[j], lp, static_cast<A>(srow[idx[j]]), acc_p, acc_q, q_mass);
    }
    const A soft = topk_finish<D>(o, acc_p, acc_q, q_mass, log_rest, kc);
    // A soft-only row has no hard term (its weight 1 - alpha is 0).
    const A hard = kHard && y >= 0 ? (kc.m1 - static_cast<A>(srow[y])) + kc.l1 : A(0);
    u[i] = kHard ? o.alpha * soft + (A(1) - o.alpha) * hard : soft;
    if (!g_row) continue;

    grad_scales(o, row_scale(w[i], norm), kc.gs_soft, kc.gs_hard);
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t n = std::min(kChunk, V - off);
      const A* sc = widen(srow + off, n, s_buf);
      A* g = nullptr;
      if constexpr (kInPlace) {
        g = g_row + off;
      } else {
        g = g_buf;
      }
      using Vec = Vectorized<A>;
      int64_t j = 0;
      for (; j + Vec::size() <= n; j += Vec::size()) {
        topk_plain_grad<D, kHard>(Vec::loadu(sc + j), o, kc).store(g + j);
      }
      for (; j < n; ++j) g[j] = topk_plain_grad<D, kHard>(sc[j], o, kc);
      // The top-k columns and the target are rewritten whole, so each is rounded once.
      for (int64_t e = 0; e < K; ++e) {
        const int64_t col = idx[e];
        if (col >= off && col < off + n) {
          g[col - off] = topk_special_grad<D, kHard>(
              sc[col - off], p[e], !topk_slot_in_rest(tl[e], log_rest), col == y, o, kc);
        }
      }
      if (kHard && !target_in_topk && y >= off && y < off + n) {
        g[y - off] = topk_special_grad<D, kHard>(sc[y - off], A(0), false, true, o, kc);
      }
      if constexpr (!kInPlace) at::vec::convert(g, g_row + off, n);
    }
  }
}

template <typename S, typename A, Divergence D>
void run_topk_divergence(const TopkKernelArgs& a) {
  const int64_t grain = row_grain(a.classes);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    if (a.target) {
      run_topk_rows<S, A, D, true>(a, begin, end);
    } else {
      run_topk_rows<S, A, D, false>(a, begin, end);
    }
  });
}

}  // namespace

void distill_loss_topk_rows(const TopkKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, args.dtype, "distill_loss_topk_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        if (args.divergence == Divergence::KL) {
          run_topk_divergence<scalar_t, acc_t, Divergence::KL>(args);
        } else {
          run_topk_divergence<scalar_t, acc_t, Divergence::JSD>(args);
        }
      });
}

}  // namespace pykd::cpu::CPU_CAPABILITY
