// distill_loss_topk on CUDA: the row kernel, its launch and its registration. One block per row;
// the row is read twice (its second read from L2): once for the student's log-sum-exp statistics,
// once for the gradient. The k teacher entries are one thread's scalar steps (the row's columns
// dominate the work). The math is csrc/include/pykd/distill_math.h's, the block merge and column
// walker cuda/row_common.cuh's; nothing here syncs with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "cuda/row_common.cuh"
#include "distill_loss_common.h"
#include "distill_loss_topk.h"
#include "pykd/distill_math.h"

namespace pykd::cuda {
namespace {

template <typename S, Divergence D, bool kHard>
__global__ void __launch_bounds__(kMaxThreads)
    distill_loss_topk_kernel(const TopkKernelArgs a, const bool packed) {
  using A = acc_type_t<S>;
  __shared__ SharedArray<RowStats<A>, kMaxWarps> warp_slots;
  __shared__ SharedArray<RowStats<A>> row_slot;
  __shared__ SharedArray<TopkConsts<A>> consts_slot;
  __shared__ A teacher_max, teacher_log_sum;
  __shared__ bool target_in_topk, row_is_bad;
  RowStats<A>* const row_stats = row_slot.get();
  TopkConsts<A>* const kc_shared = consts_slot.get();

  const int64_t row = blockIdx.x, V = a.classes, K = a.k;
  const S* srow = static_cast<const S*>(a.student) + row * a.student_stride;
  S* g_row = a.grad_student ? static_cast<S*>(a.grad_student) + row * V : nullptr;
  const int64_t* idx = a.topk_index + row * K;
  const A* tl = static_cast<const A*>(a.topk_logit) + row * K;
  const A log_rest = a.log_rest ? static_cast<const A*>(a.log_rest)[row] : A(-INFINITY);
  A* u = static_cast<A*>(a.row_loss);
  Options<A> o{D, A(a.temperature), A(1.0 / a.temperature), A(a.alpha), A(a.beta), kHard};
  auto fill_row = [&](A u_value, float g_value) {
    for (int64_t j = threadIdx.x; g_row && j < V; j += blockDim.x)
      g_row[j] = static_cast<S>(g_value);
    if (threadIdx.x == 0) u[row] = u_value;
  };
  int64_t y;  // < 0: no label is read
  const RowLabel label = begin_row(a, row, o, y);
  if (label == RowLabel::Ignored) return fill_row(A(0), 0.f);
  if (label == RowLabel::Bad) return fill_row(A(NAN), NAN);

  // The student's streaming log-sum-exp at T (stream s) and at 1 (stream s1).
  RowStats<A> st;
  for_each_group<S, A>(srow, nullptr, 0, V, packed, nullptr, nullptr,
                       [&](int64_t, int64_t, const A* s, const A*, int cnt) {
                         A m = s[0];
                         for (int e = 1; e < cnt; ++e) m = nan_max(m, s[e]);
                         advance(st.s, m * o.inv_temperature);
                         if (kHard) advance(st.s1, m);
                         for (int e = 0; e < cnt; ++e) {
                           st.s.sum += ::exp(s[e] * o.inv_temperature - st.s.shift());
                           if (kHard) st.s1.sum += ::exp(s[e] - st.s1.shift());
                         }
                       });
  block_merge<Divergence::JSD>(st, warp_slots.get(), row_stats);

  // The k entries: one thread, k scalar steps (the rows' columns dominate the work).
  if (threadIdx.x == 0) {
    const RowStats<A> rs = *row_stats;
    TopkConsts<A> kc{};
    kc.ms = rs.s.shift();
    kc.ls = rs.s.log_sum();
    kc.m1 = rs.s1.shift();
    kc.l1 = rs.s1.log_sum();
    A tmax = -INFINITY;
    bool bad = rs.s.max == -INFINITY || (kHard && rs.s1.max == -INFINITY);
    for (int64_t j = 0; j < K; ++j) {
      bad |= idx[j] < 0 || idx[j] >= V;  // never read out of bounds
      tmax = nan_max(tmax, tl[j] * o.inv_temperature);
    }
    bad |= tmax == -INFINITY;
    // A NaN or +inf logit gives a NaN row, as on the CPU, without reporting a bad row.
    const bool nonfinite = bad_max(rs.s.max) || bad_max(tmax) || (kHard && bad_max(rs.s1.max));
    A lt = 0, acc_p = 0, acc_q = 0, q_mass = 0;
    bool in_topk = false;
    if (!bad && nonfinite) {
      bad = true;
    } else if (!bad) {
      A tsum = 0;
      for (int64_t j = 0; j < K; ++j) tsum += ::exp(tl[j] * o.inv_temperature - tmax);
      // With a rest r the k entries share 1 - r of the teacher's mass.
      lt = ::log(tsum) - topk_log_kept(log_rest);
      for (int64_t j = 0; j < K; ++j) {
        const A lp = (tl[j] * o.inv_temperature - tmax) - lt;
        in_topk |= idx[j] == y;
        if (topk_slot_in_rest(tl[j], log_rest)) continue;
        topk_entry<D>(o, kc, ::exp(lp), lp, static_cast<A>(srow[idx[j]]), acc_p, acc_q, q_mass);
      }
      const A soft = topk_finish<D>(o, acc_p, acc_q, q_mass, log_rest, kc);
      const A hard = kHard && y >= 0 ? (kc.m1 - static_cast<A>(srow[y])) + kc.l1 : A(0);
      u[row] = kHard ? o.alpha * soft + (A(1) - o.alpha) * hard : soft;
      grad_scales(o,
                  row_scale(static_cast<const A*>(a.weight)[row], *static_cast<const A*>(a.norm)),
                  kc.gs_soft, kc.gs_hard);
    } else {
      *a.bad_row = row;
    }
    *kc_shared = kc;
    teacher_max = tmax;
    teacher_log_sum = lt;
    target_in_topk = in_topk;
    row_is_bad = bad;
  }
  __syncthreads();
  if (row_is_bad) return fill_row(A(NAN), NAN);
  if (!g_row) return;

  // Every column's plain gradient, then the k columns and the target rewritten whole (after a
  // barrier, so the later store wins): each element is rounded once.
  const TopkConsts<A> kc = *kc_shared;
  for_each_group<S, A>(srow, nullptr, 0, V, packed, nullptr, nullptr,
                       [&](int64_t g, int64_t col, const A* s, const A*, int cnt) {
                         constexpr int P = Pack<S>::kSize;
                         if (cnt == 1) {
                           g_row[col] = static_cast<S>(topk_plain_grad<D, kHard>(s[0], o, kc));
                           return;
                         }
                         Pack<S> out;
#pragma unroll
                         for (int e = 0; e < P; ++e)
                           out.v[e] = static_cast<S>(topk_plain_grad<D, kHard>(s[e], o, kc));
                         reinterpret_cast<Pack<S>*>(g_row)[g] = out;
                       });
  __syncthreads();
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const int64_t col = idx[j];
    const A p = ::exp((tl[j] * o.inv_temperature - teacher_max) - teacher_log_sum);
    g_row[col] = static_cast<S>(topk_special_grad<D, kHard>(
        static_cast<A>(srow[col]), p, !topk_slot_in_rest(tl[j], log_rest), col == y, o, kc));
  }
  if (kHard && threadIdx.x == 0 && y >= 0 && !target_in_topk) {
    g_row[y] = static_cast<S>(
        topk_special_grad<D, kHard>(static_cast<A>(srow[y]), A(0), false, true, o, kc));
  }
}

void launch_topk_rows(const TopkKernelArgs& a) {
  TORCH_CHECK(a.rows < (int64_t(1) << 31), "distill_loss_topk: " + std::to_string(a.rows) +
                                               " rows exceed one CUDA launch; split the batch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "distill_loss_topk_cuda", [&] {
    using S = scalar_t;
    const int64_t elem = sizeof(S);
    const bool packed = aligned16(a.student) && (a.student_stride * elem) % kPackBytes == 0 &&
                        (a.classes * elem) % kPackBytes == 0 &&
                        (!a.grad_student || aligned16(a.grad_student));
    const int64_t work = packed ? a.classes * elem / kPackBytes : a.classes;
    const int threads =
        static_cast<int>(std::clamp<int64_t>((work + 31) / 32 * 32, 32, kMaxThreads));
    auto stream = c10::cuda::getCurrentCUDAStream();
    const bool hard = a.target != nullptr;
    const dim3 grid(static_cast<unsigned>(a.rows));
    if (a.divergence == Divergence::KL) {
      if (hard) {
        distill_loss_topk_kernel<S, Divergence::KL, true><<<grid, threads, 0, stream>>>(a, packed);
      } else {
        distill_loss_topk_kernel<S, Divergence::KL, false><<<grid, threads, 0, stream>>>(a, packed);
      }
    } else {
      if (hard) {
        distill_loss_topk_kernel<S, Divergence::JSD, true><<<grid, threads, 0, stream>>>(a, packed);
      } else {
        distill_loss_topk_kernel<S, Divergence::JSD, false>
            <<<grid, threads, 0, stream>>>(a, packed);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  device_kernels(c10::DeviceType::CUDA).topk = &launch_topk_rows;
  m.impl("_distill_loss_topk_fused", &distill_loss_topk_fused);
}

}  // namespace pykd::cuda
