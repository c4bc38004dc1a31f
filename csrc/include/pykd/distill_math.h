// Torch-free math of the fused distillation loss (its contract: docs/loss.md), shared by the CPU
// and CUDA kernels. Everything here is a template over the value type V so the same formula serves
// a float, a double (CUDA, CPU tails) and an at::vec::Vectorized lane group (CPU bodies): the loss
// and its gradient are written down exactly once.
//
// Notation per row: t' = teacher / T, s' = student / T, p = softmax(t'), q = softmax(s'),
// q1 = softmax(student) (temperature 1, hard term). Every log-probability is formed as
// (x - max) - log(sum exp(x - max)) so that logits of magnitude 1e4 lose no more than their own
// ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define PYKD_HD __host__ __device__ __forceinline__
#else
#define PYKD_HD inline
#endif

// The CPU kernel file is compiled once per instruction set (CPU_CAPABILITY = DEFAULT, AVX2,
// AVX512). Everything compiled from this header lives in an inline namespace named after that set,
// so the linker can never merge an AVX512 instantiation into the DEFAULT kernel (ATen does the
// same).
#if defined(CPU_CAPABILITY)
#define PYKD_ISA_NAMESPACE CPU_CAPABILITY
#else
#define PYKD_ISA_NAMESPACE portable
#endif

namespace pykd {

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2, MSE = 3, Cosine = 4 };
enum class Reduction : int { Mean = 0, Sum = 1, BatchMean = 2, None = 3 };

// Each norm is clamped at this before dividing, as torch.nn.functional.cosine_similarity does.
constexpr double kCosineEps = 1e-8;

constexpr bool uses_softmax(Divergence d) {
  return d == Divergence::KL || d == Divergence::ReverseKL || d == Divergence::JSD;
}

inline namespace PYKD_ISA_NAMESPACE {

// Elementary functions per value type. Specialised for float/double here and for at::vec lane
// groups in the CPU kernel; `keep(c, v)` is v where c > 0 and exactly 0 elsewhere, which is how
// 0 * log 0 = 0 is honoured without producing 0 * -inf = NaN.
template <typename V>
struct VMath;

template <typename T>
struct ScalarMath {
  static PYKD_HD T exp(T x) { return ::exp(x); }
  static PYKD_HD T log(T x) { return ::log(x); }
  static PYKD_HD T keep(T c, T v) { return c > T(0) ? v : T(0); }
};
template <>
struct VMath<float> : ScalarMath<float> {
  static PYKD_HD float exp(float x) { return ::expf(x); }
  static PYKD_HD float log(float x) { return ::logf(x); }
};
template <>
struct VMath<double> : ScalarMath<double> {};

// Streaming log-sum-exp: running max and sum of exp(x - max). `shift()` is the value to subtract
// before exp: a row that is -inf so far keeps max = -inf but shifts by 0 so exp gives 0, not NaN.
template <typename T>
struct Lse {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);
  PYKD_HD T shift() const { return max == -std::numeric_limits<T>::infinity() ? T(0) : max; }
  PYKD_HD T log_sum() const { return ::log(sum); }
};

// Factor that moves a sum taken relative to `old_max` onto `new_max` (new_max >= old_max).
template <typename T>
PYKD_HD T rescale(T old_max, T new_max) {
  if (old_max == new_max) return T(1);
  // The first finite max moves an empty (-inf) sum: skip the exp, it is 0 (short rows pay per row).
  return old_max == -std::numeric_limits<T>::infinity() ? T(0) : ::exp(old_max - new_max);
}

// Moves a streaming log-sum-exp onto a max that includes `next_max`; returns the factor that sums
// kept at its scale must be multiplied by. A NaN max survives.
template <typename T>
PYKD_HD T advance(Lse<T>& l, T next_max) {
  const T m = (next_max != next_max || l.max != l.max) ? next_max + l.max
                                                       : (l.max > next_max ? l.max : next_max);
  const T f = rescale(l.max, m);
  l.sum *= f;
  l.max = m;
  return f;
}

// max(a, b) that keeps a NaN from either side (std::max and fmax drop it): a NaN logit must reach
// the row's non-finite check on every kernel, whatever its exp does with NaN.
template <typename T>
PYKD_HD T nan_max(T a, T b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

// True for NaN and +inf: a maximum like that means the row holds a logit that is not a number or
// is infinitely large, and its loss is NaN (-inf is a masked entry, not an error).
template <typename T>
PYKD_HD bool bad_max(T m) {
  return !(m < std::numeric_limits<T>::infinity());
}

// Cosine sums are taken on x * 2^-e, e = scale_exp(max |x|), so |x| up to the dtype's largest
// finite value neither overflows |x|^2 nor loses tiny rows to underflow; powers of two scale
// exactly. The exponent is clamped so that 2^e and 2^-e are both representable.
template <typename T>
PYKD_HD int scale_exp(T abs_max) {
  if (!(abs_max > T(0)) || bad_max(abs_max)) return 0;
  const int hi = sizeof(T) == 4 ? 127 : 1023;
  const int e = ::ilogb(static_cast<double>(abs_max)) + 1;
  return e < -64 ? -64 : (e > hi ? hi : e);
}

template <typename T>
PYKD_HD T pow2(int e) {
  return static_cast<T>(::ldexp(1.0, e));
}

// Merge two partial log-sum-exp states (CUDA warp/block reductions, CPU lanes). `a_extra` and
// `b_extra` are sums carried at the same scale as each state's sum (the KL / reverse-KL cross
// term).
template <typename T>
PYKD_HD void merge_lse(Lse<T>& a, T& a_extra, const Lse<T>& b, T b_extra) {
  T m = a.max > b.max ? a.max : b.max;
  if (!(m == m)) m = a.max + b.max;  // a NaN max must survive the merge
  T fa = a.sum == T(0) ? T(0) : rescale(a.max, m);
  T fb = b.sum == T(0) ? T(0) : rescale(b.max, m);
  a.sum = a.sum * fa + b.sum * fb;
  a_extra = a_extra * fa + b_extra * fb;
  a.max = m;
}

// Loss options that every row shares.
template <typename T>
struct Options {
  Divergence div;
  T temperature;
  T inv_temperature;
  T alpha;
  T beta;
  bool hard;  // a target was given
};

// Where a row's label puts it: out of the loss (ignore_index), soft-only (soft_index: the row has
// no label, its loss is the soft term alone), labelled, or bad (outside [0, V): a NaN row whose
// label is never read as an index).
enum class RowLabel { Ignored, SoftOnly, Labelled, Bad };

PYKD_HD RowLabel classify_label(int64_t y, int64_t ignore_index, int64_t soft_index, int64_t V) {
  if (y == ignore_index) return RowLabel::Ignored;
  if (y == soft_index) return RowLabel::SoftOnly;
  return y >= 0 && y < V ? RowLabel::Labelled : RowLabel::Bad;
}

// Row i's options: the call's, with the row's own temperature and alpha where the call gives them
// per row (null pointers otherwise), and alpha 1 on a soft-only row. False when a per-row value is
// out of range (a temperature not finite and > 0, an alpha outside [0, 1]): the row is NaN. The
// inverse temperature is rounded from double, as for the scalar, so a per-row copy of a scalar
// gives the scalar's result to the bit.
template <typename T>
PYKD_HD bool set_row_options(Options<T>& o, const T* temperature, const T* alpha, int64_t i,
                             bool soft_only) {
  if (temperature != nullptr) {
    const T t = temperature[i];
    if (!(t > T(0) && t - t == T(0))) return false;
    o.temperature = t;
    o.inv_temperature = static_cast<T>(1.0 / static_cast<double>(t));
  }
  if (alpha != nullptr) {
    const T a = alpha[i];
    if (!(a >= T(0) && a <= T(1))) return false;
    o.alpha = a;
  }
  if (soft_only) o.alpha = T(1);
  return true;
}

// Row i's label and options: the one rule every kernel applies first. `a` is a kernel's
// arguments (target, ignore_index, soft_index, classes and the per-row option pointers, in the
// accumulation type T). Sets y to the label to read (-1: none, on a soft-only row or without
// labels) and o to the row's options. Returns Ignored (out of the loss: loss and gradients 0), Bad
// (a label outside [0, V) or a per-row value out of range: a NaN row) or the row's kind.
template <typename T, typename Args>
PYKD_HD RowLabel begin_row(const Args& a, int64_t i, Options<T>& o, int64_t& y) {
  y = -1;
  RowLabel label = RowLabel::SoftOnly;  // without labels every row is the soft term alone
  if (a.target != nullptr) {
    label = classify_label(a.target[i], a.ignore_index, a.soft_index, a.classes);
    if (label == RowLabel::Ignored || label == RowLabel::Bad) return label;
    if (label == RowLabel::Labelled) y = a.target[i];
  }
  const bool ok =
      set_row_options(o, static_cast<const T*>(a.row_temperature),
                      static_cast<const T*>(a.row_alpha), i, label == RowLabel::SoftOnly);
  return ok ? label : RowLabel::Bad;
}

// Statistics of one row gathered by the first sweep.
template <typename T>
struct RowStats {
  Lse<T> t, s, s1;  // teacher / T, student / T, student at temperature 1 (hard term)
  T cross =
      T(0);      // kl: sum e_t (t'-s'); reverse_kl: sum e_s (s'-t'); mse: sum (t-s)^2; cosine: s.t
  T nss = T(0);  // cosine: |s|^2
  T ntt = T(0);  // cosine: |t|^2
  // mse, cosine: running max |s| and |t|, the non-finite check and cosine's scales (the GPU
  // keeps a NaN in them; the CPU takes no maximum for mse and flags its non-finite rows itself);
  // cosine's cross, nss and ntt are kept on s * 2^-scale_exp(abs_s) and t * 2^-scale_exp(abs_t).
  T abs_s = T(0), abs_t = T(0);
  T jsd_p = T(0);  // jsd (second sweep): sum p (log p - log m)
  T jsd_q = T(0);  // jsd (second sweep): sum q (log q - log m)
  T target_logit = T(0);
};

// Moves cosine's sums onto the scales of the (larger or equal) maxima abs_s, abs_t.
template <typename T>
PYKD_HD void rescale_cosine(RowStats<T>& st, T abs_s, T abs_t) {
  // While a side has seen only zeros, the sums that hold it are 0: nothing to move (and its
  // scale exponent, 0, may lie above the new one).
  const int ds = st.abs_s > T(0) ? scale_exp(st.abs_s) - scale_exp(abs_s) : 0;
  const int dt = st.abs_t > T(0) ? scale_exp(st.abs_t) - scale_exp(abs_t) : 0;
  if (ds != 0 || dt != 0) {  // rare: a scale only moves when a chunk raises the maximum's exponent
    const T fs = pow2<T>(ds), ft = pow2<T>(dt);
    st.cross *= fs * ft;
    st.nss *= fs * fs;
    st.ntt *= ft * ft;
  }
  st.abs_s = abs_s;
  st.abs_t = abs_t;
}

// Merge the first-sweep statistics of two parts of a row (GPU thread, warp, block and cluster
// reductions). The cross term rides on the teacher (kl) or student (reverse_kl) scale.
template <Divergence D, typename T>
PYKD_HD void merge_stats(RowStats<T>& a, const RowStats<T>& b) {
  if constexpr (D == Divergence::Cosine) {
    const T as = nan_max(a.abs_s, b.abs_s), at = nan_max(a.abs_t, b.abs_t);
    RowStats<T> b_moved = b;
    rescale_cosine(a, as, at);
    rescale_cosine(b_moved, as, at);
    a.cross += b_moved.cross;
    a.nss += b_moved.nss;
    a.ntt += b_moved.ntt;
    T none = T(0);
    merge_lse(a.s1, none, b.s1, T(0));
    return;
  }
  T none_a = T(0);
  merge_lse(a.t, D == Divergence::KL ? a.cross : none_a, b.t, D == Divergence::KL ? b.cross : T(0));
  merge_lse(a.s, D == Divergence::ReverseKL ? a.cross : none_a, b.s,
            D == Divergence::ReverseKL ? b.cross : T(0));
  merge_lse(a.s1, none_a, b.s1, T(0));
  if (!uses_softmax(D)) a.cross += b.cross;
  a.abs_s = nan_max(a.abs_s, b.abs_s);
  a.abs_t = nan_max(a.abs_t, b.abs_t);
  a.jsd_p += b.jsd_p;
  a.jsd_q += b.jsd_q;
}

// Row constants derived from the statistics: everything the per-element gradient needs.
template <typename T>
struct RowConsts {
  T mt, lt, ms, ls, m1, l1;  // max and log-sum of each softmax stream
  T centre;                  // kl: sum p (t'-s'); reverse_kl: sum q (s'-t'); jsd: KL(p||m)
  T jsd_q;                   // jsd: KL(q||m)
  // mse/cosine: d soft/ds = c_s (a_s s c_s + a_t t c_t), d soft/dt = c_t (b_s s c_s + b_t t c_t),
  // with c_s, c_t cosine's exact power-of-two input scales (1 for mse).
  T a_s, a_t, b_s, b_t, c_s, c_t;
  T gs_soft, gs_hard, gt_soft;  // row scale of each gradient term (weight / normaliser folded in)
};

// True when the row holds a NaN or +inf logit where a softmax or the hard term reads it, or a NaN
// or infinite feature for mse/cosine: the row's loss and gradients are then NaN, on every kernel.
template <typename T>
PYKD_HD bool row_is_nonfinite(const Options<T>& o, const RowStats<T>& st) {
  if (uses_softmax(o.div) && (bad_max(st.t.max) || bad_max(st.s.max))) return true;
  if (!uses_softmax(o.div) && (bad_max(st.abs_s) || bad_max(st.abs_t))) return true;
  // cosine's sums are of values scaled to at most 1, so they are finite unless a feature is not
  // (the CPU takes its scales with a maximum that may drop a NaN).
  if (o.div == Divergence::Cosine && !(st.nss - st.nss == T(0) && st.ntt - st.ntt == T(0))) {
    return true;
  }
  return o.hard && bad_max(st.s1.max);
}

// True when the row has no finite logit where a softmax is needed (a value error in the contract).
template <typename T>
PYKD_HD bool row_has_empty_softmax(const Options<T>& o, const RowStats<T>& st) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (uses_softmax(o.div) && (st.t.max == ninf || st.s.max == ninf)) return true;
  return o.hard && st.s1.max == ninf;
}

// Soft term of the row (before T^2 for the softmax divergences) from the first-sweep statistics;
// for jsd it needs the second sweep's sums as well. Also fills the constants of the gradient.
template <typename T>
PYKD_HD void finish_row(const Options<T>& o, const RowStats<T>& st, RowConsts<T>& k, T& soft,
                        T& hard) {
  k.mt = st.t.shift();
  k.lt = st.t.log_sum();
  k.ms = st.s.shift();
  k.ls = st.s.log_sum();
  k.m1 = st.s1.shift();
  k.l1 = st.s1.log_sum();
  const T t2 = o.temperature * o.temperature;
  switch (o.div) {
    case Divergence::KL:
      // sum p (log p - log q) = sum p (t' - s') - (lse_t - lse_s), the max difference taken first
      k.centre = st.cross / st.t.sum;
      soft = t2 * (k.centre - (k.mt - k.ms) - (k.lt - k.ls));
      break;
    case Divergence::ReverseKL:
      k.centre = st.cross / st.s.sum;
      soft = t2 * (k.centre - (k.ms - k.mt) - (k.ls - k.lt));
      break;
    case Divergence::JSD:
      k.centre = st.jsd_p;
      k.jsd_q = st.jsd_q;
      soft = t2 * (o.beta * st.jsd_p + (T(1) - o.beta) * st.jsd_q);
      break;
    case Divergence::MSE:
      soft = st.cross;
      k.a_s = T(2);
      k.a_t = T(-2);
      k.b_s = T(-2);
      k.b_t = T(2);
      k.c_s = k.c_t = T(1);
      break;
    case Divergence::Cosine: {
      // On the scaled rows s~ = s 2^-es, t~ = t 2^-et: |s| = 2^es |s~|, so each norm's clamp at
      // eps becomes a clamp at eps 2^-es, and cos and the gradients below follow without forming
      // |s|^2 (which overflows float32 from |s| ~ 1e19).
      const int es = scale_exp(st.abs_s), et = scale_exp(st.abs_t);
      const T rs = ::sqrt(st.nss), rt = ::sqrt(st.ntt);
      const bool s_free = static_cast<T>(::ldexp(static_cast<double>(rs), es)) > T(kCosineEps);
      const bool t_free = static_cast<T>(::ldexp(static_cast<double>(rt), et)) > T(kCosineEps);
      const T ns = s_free ? rs : static_cast<T>(::ldexp(kCosineEps, -es));  // a clamped norm is
      const T nt = t_free ? rt : static_cast<T>(::ldexp(kCosineEps, -et));  // a constant
      const T inv = T(1) / (ns * nt);
      const T cos = st.cross * inv;
      soft = T(1) - cos;
      k.a_s = s_free ? cos / (ns * ns) : T(0);
      k.a_t = -inv;
      k.b_s = -inv;
      k.b_t = t_free ? cos / (nt * nt) : T(0);
      k.c_s = pow2<T>(-es);
      k.c_t = pow2<T>(-et);
      break;
    }
  }
  // -log softmax(student)_y = (max - s_y) + log sum
  hard = o.hard ? (k.m1 - st.target_logit) + k.l1 : T(0);
}

// The row scales of the student's soft and hard gradient terms, c = w_i / normaliser. d/ds of
// the softmax divergences carries 1/T from s' = s/T and T^2 from the loss.
template <typename T>
PYKD_HD void grad_scales(const Options<T>& o, T c, T& soft, T& hard) {
  const T soft_c = o.hard ? c * o.alpha : c;
  soft = uses_softmax(o.div) ? soft_c * o.temperature : soft_c;
  hard = o.hard ? c * (T(1) - o.alpha) : T(0);
}

template <typename T>
PYKD_HD void set_grad_scales(const Options<T>& o, T c, RowConsts<T>& k) {
  grad_scales(o, c, k.gs_soft, k.gs_hard);
  k.gt_soft = k.gs_soft;
}

// The maxima of one chunk (CPU) or group (GPU thread) that the first sweep needs, NaN kept: the
// raw max of student and teacher (softmax streams, hard term) and, for mse/cosine, max |x|.
template <typename T>
struct ChunkMax {
  T s, t, abs_s, abs_t;
};

// Maxima of a few values (a GPU thread's pack); the CPU vectorises its own.
template <Divergence D, bool kHard, typename T>
PYKD_HD ChunkMax<T> group_max(const T* s, const T* t, int n) {
  ChunkMax<T> m{s[0], t[0], ::fabs(s[0]), ::fabs(t[0])};
  for (int e = 1; e < n; ++e) {
    m.s = nan_max(m.s, s[e]);
    m.t = nan_max(m.t, t[e]);
    if constexpr (!uses_softmax(D)) {
      m.abs_s = nan_max(m.abs_s, T(::fabs(s[e])));
      m.abs_t = nan_max(m.abs_t, T(::fabs(t[e])));
    }
  }
  return m;
}

// Before a chunk is added: move each streaming maximum to include the chunk's maxima and rescale
// every sum kept at its scale.
template <Divergence D, bool kHard, typename T>
PYKD_HD void move_maxima(const Options<T>& o, const ChunkMax<T>& m, RowStats<T>& st) {
  if constexpr (uses_softmax(D)) {
    // max(x / T) = max(x) / T: scaling by a positive number is monotone, rounding included.
    const T ft = advance(st.t, m.t * o.inv_temperature);
    const T fs = advance(st.s, m.s * o.inv_temperature);
    if constexpr (D == Divergence::KL) st.cross *= ft;
    if constexpr (D == Divergence::ReverseKL) st.cross *= fs;
  } else if constexpr (D == Divergence::Cosine) {
    rescale_cosine(st, nan_max(st.abs_s, m.abs_s), nan_max(st.abs_t, m.abs_t));
  } else {
    st.abs_s = nan_max(st.abs_s, m.abs_s);
    st.abs_t = nan_max(st.abs_t, m.abs_t);
  }
  if constexpr (kHard) advance(st.s1, m.s);
}

// What the first sweep subtracts from (softmax streams) or multiplies by (cosine's scales) each
// value of a chunk: fixed for the chunk by move_maxima.
template <typename T>
struct Shifts {
  T t, s, s1, c_s, c_t;
};

template <Divergence D, typename T>
PYKD_HD Shifts<T> chunk_shifts(const RowStats<T>& st) {
  Shifts<T> sh{st.t.shift(), st.s.shift(), st.s1.shift(), T(1), T(1)};
  if constexpr (D == Divergence::Cosine) {
    sh.c_s = pow2<T>(-scale_exp(st.abs_s));
    sh.c_t = pow2<T>(-scale_exp(st.abs_t));
  }
  return sh;
}

// First sweep, one group of lanes: accumulate into per-lane partial sums. The caller owns the
// streaming maxima (`shift_*`) and rescales the partials when a maximum moves. Padded lanes carry
// -inf for softmax streams (exp gives 0) and 0 for mse/cosine (adds 0).
// The exps one first-sweep lane group computed (teacher / T, student / T, student at T = 1, each
// relative to its stream's shift then): the CPU keeps them so later sweeps need no exp.
template <typename V>
struct LaneExps {
  V t, s, s1;
};

template <Divergence D, bool kHard, typename V>
struct StatLanes {
  V sum_t, sum_s, sum_1, cross, nss, ntt;

  static PYKD_HD StatLanes zero() { return {V(0), V(0), V(0), V(0), V(0), V(0)}; }

  // Fold lane sums that are already scalars (a GPU thread, a CPU tail) into the row statistics.
  template <typename T>
  PYKD_HD void add_to(RowStats<T>& st) const {
    st.t.sum += sum_t;
    st.s.sum += sum_s;
    st.s1.sum += sum_1;
    st.cross += cross;
    st.nss += nss;
    st.ntt += ntt;
  }

  template <typename T>
  PYKD_HD LaneExps<V> add(V s, V t, T inv_temp, const Shifts<T>& sh) {
    using M = VMath<V>;
    LaneExps<V> e{V(0), V(0), V(0)};
    if constexpr (uses_softmax(D)) {
      const V tp = t * V(inv_temp), sp = s * V(inv_temp);
      e.t = M::exp(tp - V(sh.t));
      e.s = M::exp(sp - V(sh.s));
      sum_t = sum_t + e.t;
      sum_s = sum_s + e.s;
      if constexpr (D == Divergence::KL) cross = cross + M::keep(e.t, e.t * (tp - sp));
      if constexpr (D == Divergence::ReverseKL) cross = cross + M::keep(e.s, e.s * (sp - tp));
    } else if constexpr (D == Divergence::MSE) {
      const V d = t - s;
      cross = cross + d * d;
    } else {
      const V ss = s * V(sh.c_s), ts = t * V(sh.c_t);
      cross = cross + ss * ts;
      nss = nss + ss * ss;
      ntt = ntt + ts * ts;
    }
    if constexpr (kHard) {
      e.s1 = M::exp(s - V(sh.s1));
      sum_1 = sum_1 + e.s1;
    }
    return e;
  }
};

// The probabilities of one lane group: p = softmax(t')_v, q = softmax(s')_v and, with a target,
// q1 = softmax(s)_v. Computed with exps here (GPU), or by the CPU from the first sweep's kept exps.
template <typename V>
struct Probs {
  V p, q, q1;
};

template <Divergence D, bool kHard, typename V, typename T>
PYKD_HD Probs<V> probs_by_exp(V s, V t, const Options<T>& o, const RowConsts<T>& k) {
  using M = VMath<V>;
  Probs<V> pr{V(0), V(0), V(0)};
  if constexpr (uses_softmax(D)) {
    pr.p = M::exp((t * V(o.inv_temperature) - V(k.mt)) - V(k.lt));
    pr.q = M::exp((s * V(o.inv_temperature) - V(k.ms)) - V(k.ls));
  }
  if constexpr (kHard) pr.q1 = M::exp((s - V(k.m1)) - V(k.l1));
  return pr;
}

// jsd's log m, m = beta p + (1 - beta) q. Where p and q are denormals the mixture can round to 0
// (the scalar exps keep the denormals that the vector ones flush), and p (log p - log m) would be
// p * inf: the smallest normal number added to m keeps it finite. It changes no m that matters
// (in float it is below the rounding of any m above ~1e-31), and the terms it touches are ~0.
template <typename V, typename T>
PYKD_HD V log_mixture(V p, V q, T beta) {
  using M = VMath<V>;
  return M::log(V(beta) * p + V(T(1) - beta) * q + V(std::numeric_limits<T>::min()));
}

// Second sweep of jsd, one group of lanes: sum p (log p - log m) and sum q (log q - log m).
template <typename V, typename T>
PYKD_HD void jsd_lanes(V s, V t, const Probs<V>& pr, const Options<T>& o, const RowConsts<T>& k,
                       V& acc_p, V& acc_q) {
  using M = VMath<V>;
  const V lp = (t * V(o.inv_temperature) - V(k.mt)) - V(k.lt);
  const V lq = (s * V(o.inv_temperature) - V(k.ms)) - V(k.ls);
  const V lm = log_mixture(pr.p, pr.q, o.beta);
  acc_p = acc_p + M::keep(pr.p, pr.p * (lp - lm));
  acc_q = acc_q + M::keep(pr.q, pr.q * (lq - lm));
}

// Gradient sweep, one group of lanes: d loss / d student and d loss / d teacher (soft part for the
// teacher; the hard term's -1 at the target class is applied by the caller, once, in float).
template <Divergence D, bool kHard, typename V, typename T>
PYKD_HD void grad_lanes(V s, V t, const Probs<V>& pr, const Options<T>& o, const RowConsts<T>& k,
                        V& gs, V& gt) {
  using M = VMath<V>;
  const V p = pr.p, q = pr.q;
  if constexpr (uses_softmax(D)) {
    const V tp = t * V(o.inv_temperature), sp = s * V(o.inv_temperature);
    // kl: d/dt' = p (log p - log q - KL) = p ((t' - s') - sum p (t' - s')): the log-sum-exps
    // cancel, and the centre is summed from the very same (t' - s') values, so a near one-hot row
    // of 1e4 logits cancels exactly instead of leaving the logits' ulp behind.
    if constexpr (D == Divergence::KL) {
      gs = V(k.gs_soft) * (q - p);
      gt = V(k.gt_soft) * M::keep(p, p * ((tp - sp) - V(k.centre)));
    } else if constexpr (D == Divergence::ReverseKL) {
      gs = V(k.gs_soft) * M::keep(q, q * ((sp - tp) - V(k.centre)));
      gt = V(k.gt_soft) * (p - q);
    } else {
      const V lp = (tp - V(k.mt)) - V(k.lt);
      const V lq = (sp - V(k.ms)) - V(k.ls);
      const V lm = log_mixture(p, q, o.beta);
      gs = V(k.gs_soft * (T(1) - o.beta)) * M::keep(q, q * ((lq - lm) - V(k.jsd_q)));
      gt = V(k.gt_soft * o.beta) * M::keep(p, p * ((lp - lm) - V(k.centre)));
    }
  } else if constexpr (D == Divergence::Cosine) {
    const V ss = s * V(k.c_s), ts = t * V(k.c_t);
    gs = V(k.gs_soft * k.c_s) * (V(k.a_s) * ss + V(k.a_t) * ts);
    gt = V(k.gt_soft * k.c_t) * (V(k.b_s) * ss + V(k.b_t) * ts);
  } else {  // mse: no scales (c_s = c_t = 1), so no multiplies for them either
    gs = V(k.gs_soft) * (V(k.a_s) * s + V(k.a_t) * t);
    gt = V(k.gt_soft) * (V(k.b_s) * s + V(k.b_t) * t);
  }
  if constexpr (kHard) gs = gs + V(k.gs_hard) * pr.q1;
}

// Row scale c_i = w_i / normaliser; a batch whose normaliser is 0 has loss 0 and zero gradients.
template <typename T>
PYKD_HD T row_scale(T w, T norm) {
  return norm == T(0) ? T(0) : w / norm;
}

// ---- distill_loss_topk: the teacher is k (index, logit) pairs per row ----------------------
// p is the softmax of the k teacher logits at T, with zero mass on every other column; q is the
// student's full softmax at T. kl: T^2 sum_j p_j (log p_j - log q_{i_j}). jsd: KL(p||m) over the
// k entries, and KL(q||m) = sum over the k entries + (1 - sum_j q_{i_j}) (-log(1 - beta)), since
// m = (1 - beta) q off the top-k.
//
// With the teacher's rest mass r (kl only) the k entries carry 1 - r and the columns off the
// top-k (and those of unused -inf slots) form one bucket of mass r, matched against the
// student's bucket q_rest = 1 - sum_j q_{i_j} (sum over the used entries):
// the loss gains T^2 r (log r - log q_rest) and d/dz_c off the top-k is q_c (1 - r / q_rest)
// instead of q_c, so the student keeps a tail of the teacher's size rather than none.

template <typename T>
struct TopkConsts {
  T ms, ls, m1, l1;    // student's streaming max and log-sum at T, and at 1 (hard term)
  T kq;                // jsd: KL(q || m)
  T off_topk;          // per unit q off the top-k, d soft / d s': kl 1 - r / q_rest (1 without a
                       // rest), jsd -log(1 - beta) - KL(q||m)
  T gs_soft, gs_hard;  // row scales (weight / normaliser, alpha, T folded in)
};

// Gradient of a column that is neither a top-k index nor the target, in any value type.
template <Divergence D, bool kHard, typename V, typename T>
PYKD_HD V topk_plain_grad(V s, const Options<T>& o, const TopkConsts<T>& k) {
  using M = VMath<V>;
  const V q = M::exp((s * V(o.inv_temperature) - V(k.ms)) - V(k.ls));
  V g = D == Divergence::KL ? V(k.gs_soft * k.off_topk) * q
                            : V(k.gs_soft * (T(1) - o.beta) * k.off_topk) * q;
  if constexpr (kHard) g = g + V(k.gs_hard) * M::exp((s - V(k.m1)) - V(k.l1));
  return g;
}

// Gradient of a top-k column (p > 0 possible) or of the target column, written whole so the
// value is rounded once: `p` is the teacher's mass there (0 off the top-k), `is_target` adds -1.
template <Divergence D, bool kHard, typename T>
PYKD_HD T topk_special_grad(T s, T p, bool in_topk, bool is_target, const Options<T>& o,
                            const TopkConsts<T>& k) {
  T g;
  const T lq = (s * o.inv_temperature - k.ms) - k.ls;
  const T q = ::exp(lq);
  if (D == Divergence::KL) {
    g = k.gs_soft * (in_topk ? q - p : k.off_topk * q);
  } else if (!in_topk) {
    g = k.gs_soft * (T(1) - o.beta) * k.off_topk * q;
  } else {
    const T lm = log_mixture(p, q, o.beta);
    g = q > T(0) ? k.gs_soft * (T(1) - o.beta) * q * ((lq - lm) - k.kq) : T(0);
  }
  if (kHard) g += k.gs_hard * (::exp((s - k.m1) - k.l1) - (is_target ? T(1) : T(0)));
  return g;
}

// One top-k entry's share of the row loss: p_j, log p_j and the student's logit at i_j.
template <Divergence D, typename T>
PYKD_HD void topk_entry(const Options<T>& o, const TopkConsts<T>& k, T p, T lp, T s_at, T& acc_p,
                        T& acc_q, T& q_mass) {
  const T lq = (s_at * o.inv_temperature - k.ms) - k.ls;
  const T q = ::exp(lq);
  if (D == Divergence::KL) {
    acc_p += p > T(0) ? p * (lp - lq) : T(0);
    q_mass += q;  // for the rest bucket
  } else {
    const T lm = log_mixture(p, q, o.beta);
    acc_p += p > T(0) ? p * (lp - lm) : T(0);
    acc_q += q > T(0) ? q * (lq - lm) : T(0);
    q_mass += q;
  }
}

// log(1 - r) for the teacher's rest mass r = exp(log_rest): what each top-k entry's log p gains.
// Two forms, each accurate where the other loses digits (r near 1, r near 0).
template <typename T>
PYKD_HD T topk_log_kept(T log_rest) {
  if (log_rest == -std::numeric_limits<T>::infinity()) return T(0);
  return log_rest > T(-0.6931471805599453) ? ::log(-::expm1(log_rest)) : ::log1p(-::exp(log_rest));
}

// With a rest, an unused slot (-inf logit) names no mass of its own: its class is one of the
// rest bucket's (whose mass r already counts it), not a class the teacher rules out.
template <typename T>
PYKD_HD bool topk_slot_in_rest(T logit, T log_rest) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  return log_rest != -kInf && logit == -kInf;
}

// The soft term from the entries' sums and the teacher's rest (log r; -inf without one); sets kq
// and off_topk for the gradient.
template <Divergence D, typename T>
PYKD_HD T topk_finish(const Options<T>& o, T acc_p, T acc_q, T q_mass, T log_rest,
                      TopkConsts<T>& k) {
  const T t2 = o.temperature * o.temperature;
  if (D == Divergence::KL) {
    k.off_topk = T(1);
    if (log_rest == -std::numeric_limits<T>::infinity()) return t2 * acc_p;
    // 1 - sum q_{i_j} holds the student's rest to ~eps absolute: floored there, so a student
    // with (nearly) no tail gets a large but finite pull towards one, never a NaN.
    const T q_rest = ::fmax(T(1) - q_mass, std::numeric_limits<T>::epsilon());
    const T r = ::exp(log_rest);
    k.off_topk = T(1) - r / q_rest;
    return t2 * (acc_p + r * (log_rest - ::log(q_rest)));
  }
  const T off = -::log(T(1) - o.beta);  // log q - log m where m = (1 - beta) q
  const T rest = T(1) - q_mass;
  k.kq = acc_q + (rest > T(0) ? rest : T(0)) * off;
  k.off_topk = off - k.kq;
  return t2 * (o.beta * acc_p + (T(1) - o.beta) * k.kq);
}

}  // namespace PYKD_ISA_NAMESPACE
}  // namespace pykd
