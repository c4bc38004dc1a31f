// Row kernel of distill_loss on the CPU. This file is compiled once per instruction set with
// CPU_CAPABILITY set (CMakeLists.txt); csrc/cpu/distill_loss.cpp picks one at run time.
//
// Per row, in chunks of kChunk columns that stay in L1: sweep 1 gathers the streaming log-sum-exp
// statistics (and the KL cross term) for every softmax the loss needs; jsd alone needs sweep 2 for
// sum p log(p/m) and sum q log(q/m); the last sweep writes each requested gradient exactly once.
// Half and bfloat16 chunks are widened to float once per sweep; float32 rows are read in place.
#include "cpu/distill_loss_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/row_kernel.h"

namespace pykd::cpu::CPU_CAPABILITY {
namespace {

// The first sweep's exps of one row, kept (L2-resident: 3 x V floats per thread) so the later
// sweeps turn them into probabilities with one multiply instead of an exp. `shift` holds, per
// chunk and stream, the value each exp was taken relative to.
template <typename A>
struct KeptExps {
  std::vector<A> e;      // [3][V]: teacher / T, student / T, student at T = 1
  std::vector<A> shift;  // [3][chunks]
  int64_t V = 0, chunks = 0;

  void resize(int64_t classes) {
    V = classes;
    chunks = (classes + kChunk - 1) / kChunk;
    e.resize(3 * V);
    shift.resize(3 * chunks);
  }
  A* exps(int stream, int64_t off) { return e.data() + stream * V + off; }
  A& chunk_shift(int stream, int64_t c) { return shift[stream * chunks + c]; }
};

template <Divergence D, bool kHard, typename A>
void stats_chunk(const A* s, const A* t, int64_t n, const Options<A>& o, RowStats<A>& st,
                 KeptExps<A>* kept, int64_t off) {
  using Vec = Vectorized<A>;
  constexpr bool kSoftmax = uses_softmax(D);
  constexpr A kNoMax = -std::numeric_limits<A>::infinity();
  ChunkMax<A> m{kNoMax, kNoMax, A(0), A(0)};
  if (kSoftmax || kHard) m.s = chunk_max(s, n);
  if (kSoftmax) m.t = chunk_max(t, n);
  if (D == Divergence::Cosine) {  // its scales; mse needs no maximum (see run_rows)
    m.abs_s = chunk_max<true, false>(s, n);
    m.abs_t = chunk_max<true, false>(t, n);
  }
  move_maxima<D, kHard>(o, m, st);
  const Shifts<A> sh = chunk_shifts<D>(st);
  A* et = nullptr;
  A* es = nullptr;
  A* e1 = nullptr;
  if (kept) {
    const int64_t c = off / kChunk;
    kept->chunk_shift(0, c) = sh.t;
    kept->chunk_shift(1, c) = sh.s;
    kept->chunk_shift(2, c) = sh.s1;
    et = kept->exps(0, off);
    es = kept->exps(1, off);
    e1 = kept->exps(2, off);
  }
  auto tail = StatLanes<D, kHard, A>::zero();
  int64_t j = 0;
  if (n >= Vec::size()) {  // short rows (a few classes) skip the lane reductions altogether
    auto lanes = StatLanes<D, kHard, Vec>::zero();
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const auto e = lanes.add(Vec::loadu(s + j), Vec::loadu(t + j), o.inv_temperature, sh);
      if (kSoftmax && et) {
        e.t.store(et + j);
        e.s.store(es + j);
      }
      if (kHard && e1) e.s1.store(e1 + j);
    }
    tail.sum_t += lane_sum(lanes.sum_t);
    tail.sum_s += lane_sum(lanes.sum_s);
    tail.sum_1 += lane_sum(lanes.sum_1);
    tail.cross += lane_sum(lanes.cross);
    tail.nss += lane_sum(lanes.nss);
    tail.ntt += lane_sum(lanes.ntt);
  }
  for (; j < n; ++j) {
    const auto e = tail.add(s[j], t[j], o.inv_temperature, sh);
    if (kSoftmax && et) {
      et[j] = e.t;
      es[j] = e.s;
    }
    if (kHard && e1) e1[j] = e.s1;
  }
  tail.add_to(st);
}

// Probabilities of chunk c from the kept exps: p = e_t exp(shift - max - log sum), etc.
template <Divergence D, bool kHard, typename A>
struct ChunkProbs {
  const A *et, *es, *e1;
  A ft, fs, f1;

  ChunkProbs(KeptExps<A>& kept, int64_t off, const RowConsts<A>& k) {
    const int64_t c = off / kChunk;
    et = kept.exps(0, off);
    es = kept.exps(1, off);
    e1 = kept.exps(2, off);
    // Only the streams this loss uses: short rows pay these exps once per row.
    ft = uses_softmax(D) ? std::exp((kept.chunk_shift(0, c) - k.mt) - k.lt) : A(0);
    fs = uses_softmax(D) ? std::exp((kept.chunk_shift(1, c) - k.ms) - k.ls) : A(0);
    f1 = kHard ? std::exp((kept.chunk_shift(2, c) - k.m1) - k.l1) : A(0);
  }
  template <typename V>
  Probs<V> at(int64_t j) const {
    Probs<V> pr{V(A(0)), V(A(0)), V(A(0))};
    if constexpr (uses_softmax(D)) {
      pr.p = load<V>(et + j) * V(ft);
      pr.q = load<V>(es + j) * V(fs);
    }
    if constexpr (kHard) pr.q1 = load<V>(e1 + j) * V(f1);
    return pr;
  }
  template <typename V>
  static V load(const A* x) {
    if constexpr (std::is_same_v<V, A>) {
      return *x;
    } else {
      return V::loadu(x);
    }
  }
};

template <Divergence D, typename A>
void jsd_chunk(const A* s, const A* t, int64_t n, const Options<A>& o, const RowConsts<A>& k,
               const ChunkProbs<D, false, A>& pr, RowStats<A>& st) {
  using Vec = Vectorized<A>;
  Vec acc_p(A(0)), acc_q(A(0));
  A tail_p = 0, tail_q = 0;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    jsd_lanes(Vec::loadu(s + j), Vec::loadu(t + j), pr.template at<Vec>(j), o, k, acc_p, acc_q);
  }
  for (; j < n; ++j) jsd_lanes(s[j], t[j], pr.template at<A>(j), o, k, tail_p, tail_q);
  st.jsd_p += lane_sum(acc_p) + tail_p;
  st.jsd_q += lane_sum(acc_q) + tail_q;
}

template <Divergence D, bool kHard, typename A>
void grad_chunk(const A* s, const A* t, int64_t n, const Options<A>& o, const RowConsts<A>& k,
                const ChunkProbs<D, kHard, A>& pr, A* gs, A* gt) {
  using Vec = Vectorized<A>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec g_s, g_t;
    grad_lanes<D, kHard>(Vec::loadu(s + j), Vec::loadu(t + j), pr.template at<Vec>(j), o, k, g_s,
                         g_t);
    if (gs) g_s.store(gs + j);
    if (gt) g_t.store(gt + j);
  }
  for (; j < n; ++j) {
    A g_s, g_t;
    grad_lanes<D, kHard>(s[j], t[j], pr.template at<A>(j), o, k, g_s, g_t);
    if (gs) gs[j] = g_s;
    if (gt) gt[j] = g_t;
  }
}

template <typename S, typename A, Divergence D, bool kHard>
void run_rows(const KernelArgs& a, int64_t begin, int64_t end) {
  alignas(64) A buf[4 * kChunk];
  A* const s_buf = buf;
  A* const t_buf = buf + kChunk;
  A* const gs_buf = buf + 2 * kChunk;
  A* const gt_buf = buf + 3 * kChunk;
  constexpr bool kInPlace = std::is_same_v<S, A>;  // float32/float64 gradients are written directly

  const Options<A> call{D, A(a.temperature), A(1.0 / a.temperature), A(a.alpha), A(a.beta), kHard};
  const int64_t V = a.classes;
  const A norm = *static_cast<const A*>(a.norm);
  const A* w = static_cast<const A*>(a.weight);
  A* u = static_cast<A*>(a.row_loss);
  const bool want_grad = a.grad_student || a.grad_teacher;
  KeptExps<A> kept;
  if (want_grad || D == Divergence::JSD) kept.resize(V);
  std::vector<A> zeros(D == Divergence::KL && want_grad ? kChunk : 0, A(0));
  KeptExps<A>* const keep = kept.V ? &kept : nullptr;

  for (int64_t i = begin; i < end; ++i) {
    const S* srow = static_cast<const S*>(a.student) + i * a.student_stride;
    const S* trow = static_cast<const S*>(a.teacher) + i * a.teacher_stride;
    S* gs_row = a.grad_student ? static_cast<S*>(a.grad_student) + i * V : nullptr;
    S* gt_row = a.grad_teacher ? static_cast<S*>(a.grad_teacher) + i * V : nullptr;
    auto fill_row = [&](A u_value, S g_value) {
      u[i] = u_value;
      if (gs_row) std::fill_n(gs_row, V, g_value);
      if (gt_row) std::fill_n(gt_row, V, g_value);
    };

    if (a.populate_rows) {
      populate_pages(gs_row, V * sizeof(S));
      populate_pages(gt_row, V * sizeof(S));
    }
    Options<A> o = call;
    int64_t y;  // < 0: no label is read
    const RowLabel label = begin_row(a, i, o, y);
    if (label == RowLabel::Ignored || label == RowLabel::Bad) {  // the CPU host raises on Bad
      fill_row(label == RowLabel::Bad ? std::numeric_limits<A>::quiet_NaN() : A(0),
               label == RowLabel::Bad ? S(NAN) : S(0));
      continue;
    }

    RowStats<A> st;
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t n = std::min(kChunk, V - off);
      stats_chunk<D, kHard>(widen(srow + off, n, s_buf), widen(trow + off, n, t_buf), n, o, st,
                            keep, off);
    }
    if constexpr (D == Divergence::MSE) {
      // mse takes no maxima: a finite sum of squares means finite features, and only a row whose
      // sum is not finite is read again, to tell a NaN or infinite feature (a NaN row) from an
      // overflow (an infinite loss).
      if (!(st.cross - st.cross == A(0)) && (any_nonfinite(srow, V) || any_nonfinite(trow, V))) {
        st.abs_s = std::numeric_limits<A>::infinity();
      }
    }
    if (row_has_empty_softmax(o, st)) {  // a value error (all -inf); a NaN max is not -inf
      std::atomic_ref<int64_t>(*a.bad_row).store(i, std::memory_order_relaxed);
      fill_row(std::numeric_limits<A>::quiet_NaN(), S(NAN));
      continue;
    }
    if (row_is_nonfinite(o, st)) {  // NaN, not an error: the training API stops on it
      fill_row(std::numeric_limits<A>::quiet_NaN(), S(NAN));
      continue;
    }
    // A soft-only row's hard term uses no logit and has weight 1 - alpha = 0.
    if constexpr (kHard) st.target_logit = y >= 0 ? static_cast<A>(srow[y]) : A(0);

    RowConsts<A> k;
    A soft, hard;
    finish_row(o, st, k, soft, hard);
    if constexpr (D == Divergence::JSD) {
      for (int64_t off = 0; off < V; off += kChunk) {
        const int64_t n = std::min(kChunk, V - off);
        jsd_chunk<D>(widen(srow + off, n, s_buf), widen(trow + off, n, t_buf), n, o, k,
                     ChunkProbs<D, false, A>(kept, off, k), st);
      }
      finish_row(o, st, k, soft, hard);
    }
    u[i] = kHard ? o.alpha * soft + (A(1) - o.alpha) * hard : soft;

    if (!want_grad) continue;
    set_grad_scales(o, row_scale(w[i], norm), k);
    for (int64_t off = 0; off < V; off += kChunk) {
      const int64_t n = std::min(kChunk, V - off);
      A* gs = nullptr;
      A* gt = nullptr;
      if constexpr (kInPlace) {
        gs = gs_row ? gs_row + off : nullptr;
        gt = gt_row ? gt_row + off : nullptr;
      } else {
        gs = gs_row ? gs_buf : nullptr;
        gt = gt_row ? gt_buf : nullptr;
      }
      // The student's KL gradient needs only the kept probabilities: skip reading (and, for
      // bf16/fp16, widening) the logits again; zeros stand in for them.
      const bool need_logits = D != Divergence::KL || gt_row;
      grad_chunk<D, kHard>(need_logits ? widen(srow + off, n, s_buf) : zeros.data(),
                           need_logits ? widen(trow + off, n, t_buf) : zeros.data(), n, o, k,
                           ChunkProbs<D, kHard, A>(kept, off, k), gs, gt);
      // The hard term's -1 at the target class, applied in the accumulation type before rounding.
      if (kHard && gs && y >= off && y < off + n) gs[y - off] -= k.gs_hard;
      if constexpr (!kInPlace) {
        if (gs) at::vec::convert(gs, gs_row + off, n);
        if (gt) at::vec::convert(gt, gt_row + off, n);
      }
    }
  }
}

template <typename S, typename A, Divergence D>
void run_divergence(const KernelArgs& a) {
  const int64_t grain = row_grain(a.classes);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    if (a.target) {
      run_rows<S, A, D, true>(a, begin, end);
    } else {
      run_rows<S, A, D, false>(a, begin, end);
    }
  });
}

template <typename S, typename A>
void run_typed(const KernelArgs& a) {
  switch (a.divergence) {
    case Divergence::KL:
      return run_divergence<S, A, Divergence::KL>(a);
    case Divergence::ReverseKL:
      return run_divergence<S, A, Divergence::ReverseKL>(a);
    case Divergence::JSD:
      return run_divergence<S, A, Divergence::JSD>(a);
    case Divergence::MSE:
      return run_divergence<S, A, Divergence::MSE>(a);
    case Divergence::Cosine:
      return run_divergence<S, A, Divergence::Cosine>(a);
  }
}

}  // namespace

void distill_loss_rows(const KernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "distill_loss_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    run_typed<scalar_t, acc_t>(args);
  });
}

}  // namespace pykd::cpu::CPU_CAPABILITY
