// distill_loss on CUDA: the row kernel, its launch, and the in-place gradient scaling.
//
// One row is one block, or on sm_90 a cluster of up to 8 blocks that split the row's columns.
// Sweep 1 reads each block's slice of student and teacher once from HBM, keeps it in shared memory
// when it fits (64 KB per block, so a 128256-column bf16 row spreads over 8 blocks), and gathers
// the streaming log-sum-exp statistics; the blocks of a cluster merge them through distributed
// shared memory. jsd alone needs a second sweep. The gradient sweep then reads the slice from
// shared memory and writes each gradient element once, so HBM sees one read of each input and one
// write of each gradient: the 3 N V floor. Without clusters (sm_80) or when a slice does not fit,
// the later sweeps read the slice again and rely on it still being in L2. All the math is the
// shared header's (csrc/include/pykd/distill_math.h), the block and cluster merges are
// cuda/row_common.cuh's; nothing here syncs with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "cuda/distill_loss.h"
#include "cuda/row_common.cuh"
#include "distill_loss_common.h"
#include "pykd/distill_math.h"

namespace pykd::cuda {
namespace {

constexpr int kMaxCluster = 8;                   // the portable cluster size
constexpr int64_t kSliceBytes = 64 * 1024;       // student + teacher slice cached per block
constexpr int64_t kMaxCachedBytes = 160 * 1024;  // largest slice still worth caching

// Launch shape shared by every block of one call.
struct Layout {
  int64_t slice;  // columns per block (a multiple of the pack size when `packed`)
  int cluster;    // blocks per row
  bool cached;    // the slice lives in shared memory between sweeps
  bool packed;    // rows are 16-byte aligned: 16-byte loads and stores
};

template <typename S, Divergence D, bool kHard>
__global__ void __launch_bounds__(kMaxThreads)
    distill_loss_kernel(const RowKernelArgs a, const Layout L) {
  using A = acc_type_t<S>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ SharedArray<RowStats<A>, kMaxWarps> warp_slots;
  __shared__ SharedArray<RowStats<A>> block_slot, row_slot;
  RowStats<A>* const warp_buf = warp_slots.get();
  RowStats<A>* const block_stats = block_slot.get();
  RowStats<A>* const row_stats = row_slot.get();

  const int64_t row = blockIdx.x / L.cluster;
  const int rank = blockIdx.x % L.cluster;  // the block's rank in its (x-major) cluster
  const int64_t V = a.classes;
  const int64_t first = rank * L.slice;
  const int64_t n = first < V ? min(L.slice, V - first) : 0;
  const S* srow = static_cast<const S*>(a.student) + row * a.student_stride;
  const S* trow = static_cast<const S*>(a.teacher) + row * a.teacher_stride;
  S* gs_row = a.grad_student ? static_cast<S*>(a.grad_student) + row * V : nullptr;
  S* gt_row = a.grad_teacher ? static_cast<S*>(a.grad_teacher) + row * V : nullptr;
  S* s_cache = reinterpret_cast<S*>(smem);
  S* t_cache = s_cache + L.slice;
  A* u = static_cast<A*>(a.row_loss);

  Options<A> o{D, A(a.temperature), A(1.0 / a.temperature), A(a.alpha), A(a.beta), kHard};
  // Every block of a row takes the same branches below: cluster barriers stay matched.
  auto fill_row = [&](A u_value, float g_value) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (gs_row) gs_row[first + j] = static_cast<S>(g_value);
      if (gt_row) gt_row[first + j] = static_cast<S>(g_value);
    }
    if (rank == 0 && threadIdx.x == 0) u[row] = u_value;
  };
  int64_t y;  // < 0: no label is read
  const RowLabel label = begin_row(a, row, o, y);
  if (label == RowLabel::Ignored) return fill_row(A(0), 0.f);
  if (label == RowLabel::Bad) return fill_row(A(NAN), NAN);  // no label is read out of bounds

  // Sweep 1: one read from HBM, statistics per thread, the slice kept in shared memory.
  RowStats<A> st;
  for_each_group<S, A>(srow + first, trow + first, first, n, L.packed, L.cached ? s_cache : nullptr,
                       L.cached ? t_cache : nullptr,
                       [&](int64_t, int64_t, const A* s, const A* t, int cnt) {
                         move_maxima<D, kHard>(o, group_max<D, kHard>(s, t, cnt), st);
                         const Shifts<A> sh = chunk_shifts<D>(st);
                         auto lanes = StatLanes<D, kHard, A>::zero();
                         for (int e = 0; e < cnt; ++e) lanes.add(s[e], t[e], o.inv_temperature, sh);
                         lanes.add_to(st);
                       });
  block_merge<D>(st, warp_buf, block_stats);
  cluster_merge<D>(block_stats, row_stats, L.cluster);
  st = *row_stats;
  // Later sweeps read the slice from shared memory when it was cached, else again from global.
  const S* const sp = L.cached ? s_cache : srow + first;
  const S* const tp = L.cached ? t_cache : trow + first;

  if (row_has_empty_softmax(o, st)) {
    if (rank == 0 && threadIdx.x == 0) *a.bad_row = row;
    return fill_row(A(NAN), NAN);
  }
  if (row_is_nonfinite(o, st)) return fill_row(A(NAN), NAN);  // NaN, not an error (any device)
  // A soft-only row's hard term uses no logit and has weight 1 - alpha = 0.
  if constexpr (kHard) st.target_logit = y >= 0 ? static_cast<A>(srow[y]) : A(0);
  RowConsts<A> k;
  A soft, hard;
  finish_row(o, st, k, soft, hard);

  if constexpr (D == Divergence::JSD) {
    RowStats<A> part;
    for_each_group<S, A>(sp, tp, first, n, L.packed, nullptr, nullptr,
                         [&](int64_t, int64_t, const A* s, const A* t, int cnt) {
                           for (int e = 0; e < cnt; ++e) {
                             jsd_lanes(s[e], t[e], probs_by_exp<D, false>(s[e], t[e], o, k), o, k,
                                       part.jsd_p, part.jsd_q);
                           }
                         });
    __syncthreads();  // block_stats and row_stats are reused
    block_merge<D>(part, warp_buf, block_stats);
    cluster_merge<D>(block_stats, row_stats, L.cluster);
    st.jsd_p = row_stats->jsd_p;
    st.jsd_q = row_stats->jsd_q;
    finish_row(o, st, k, soft, hard);
  }
  if (rank == 0 && threadIdx.x == 0)
    u[row] = kHard ? o.alpha * soft + (A(1) - o.alpha) * hard : soft;
  if (!gs_row && !gt_row) return;

  // Gradient sweep: each element written once, in the logits dtype, from float math.
  set_grad_scales(
      o, row_scale(static_cast<const A*>(a.weight)[row], *static_cast<const A*>(a.norm)), k);
  auto grad = [&](int64_t col, A s, A t, S& out_s, S& out_t) {
    A g_s, g_t;
    grad_lanes<D, kHard>(s, t, probs_by_exp<D, kHard>(s, t, o, k), o, k, g_s, g_t);
    if (kHard && col == y) g_s -= k.gs_hard;  // the hard term's -1, before rounding
    out_s = static_cast<S>(g_s);
    out_t = static_cast<S>(g_t);
  };
  for_each_group<S, A>(sp, tp, first, n, L.packed, nullptr, nullptr,
                       [&](int64_t g, int64_t col, const A* s, const A* t, int cnt) {
                         constexpr int P = Pack<S>::kSize;
                         if (cnt == 1) {
                           S out_s, out_t;
                           grad(col, s[0], t[0], out_s, out_t);
                           if (gs_row) gs_row[col] = out_s;
                           if (gt_row) gt_row[col] = out_t;
                           return;
                         }
                         Pack<S> out_s, out_t;
#pragma unroll
                         for (int e = 0; e < P; ++e)
                           grad(col + e, s[e], t[e], out_s.v[e], out_t.v[e]);
                         if (gs_row) reinterpret_cast<Pack<S>*>(gs_row + first)[g] = out_s;
                         if (gt_row) reinterpret_cast<Pack<S>*>(gt_row + first)[g] = out_t;
                       });
}

// Every row of the call starts on a 16-byte boundary and spans whole 16-byte packs.
bool rows_packed(const RowKernelArgs& a, int64_t elem_bytes) {
  return aligned16(a.student) && aligned16(a.teacher) &&
         (a.student_stride * elem_bytes) % kPackBytes == 0 &&
         (a.teacher_stride * elem_bytes) % kPackBytes == 0 &&
         (a.classes * elem_bytes) % kPackBytes == 0 &&
         (!a.grad_student || aligned16(a.grad_student)) &&
         (!a.grad_teacher || aligned16(a.grad_teacher));
}

Layout plan(int64_t classes, int64_t elem_bytes, bool packed, bool clusters_ok,
            int64_t max_cached) {
  Layout L;
  const int64_t pack = kPackBytes / elem_bytes;
  L.packed = packed;
  const int64_t row_bytes = 2 * classes * elem_bytes;
  L.cluster = 1;
  if (clusters_ok && row_bytes > kSliceBytes) {
    L.cluster = static_cast<int>(
        std::min<int64_t>(kMaxCluster, (row_bytes + kSliceBytes - 1) / kSliceBytes));
  }
  int64_t slice = (classes + L.cluster - 1) / L.cluster;
  if (L.packed) slice = (slice + pack - 1) / pack * pack;
  L.slice = slice;
  L.cached = 2 * slice * elem_bytes <= std::min(kMaxCachedBytes, max_cached);
  return L;
}

// PYKD_CUDA_PLAN=single keeps each row in one block where clusters are available (the sm_80
// paths, so tests can run them on sm_90); auto (or unset) is the default. Read at every launch, so
// a test can switch it within one process; a getenv costs far less than the launch.
bool single_block_forced() {
  const char* env = std::getenv("PYKD_CUDA_PLAN");
  const std::string mode = env ? env : "";
  TORCH_CHECK(mode.empty() || mode == "auto" || mode == "single",
              "PYKD_CUDA_PLAN must be auto or single, got '" + mode + "'");
  return mode == "single";
}

// What one kernel instantiation can do on one device, asked once. Clusters need a cluster-capable
// device *and* sm_90 code in this kernel (built from compute_80 PTX, cluster_merge would trap);
// the shared memory a block may opt into is the device's limit less the kernel's static usage.
struct KernelLimits {
  bool clusters = false;
  int64_t max_dynamic_smem = 0;
  int64_t static_smem = 0;
};

template <typename Kernel>
const KernelLimits& kernel_limits(Kernel kernel, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, KernelLimits> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  int major = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  KernelLimits lim;
  lim.clusters = major >= 9 && fa.ptxVersion >= 90;
  lim.static_smem = static_cast<int64_t>(fa.sharedSizeBytes);
  lim.max_dynamic_smem = optin - lim.static_smem;
  // Raise the kernel's dynamic limit once to all it may use; the default stops at 48 KB of
  // static + dynamic, so near-48 KB slices would otherwise fail to launch.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(lim.max_dynamic_smem)));
  return cache.emplace(key, lim).first->second;
}

template <typename S, Divergence D, bool kHard>
void launch_typed(const RowKernelArgs& a) {
  const int device = c10::cuda::current_device();
  auto kernel = distill_loss_kernel<S, D, kHard>;
  const KernelLimits& lim = kernel_limits(kernel, device);
  const Layout L = plan(a.classes, sizeof(S), rows_packed(a, sizeof(S)),
                        lim.clusters && !single_block_forced(), lim.max_dynamic_smem);
  const size_t smem = L.cached ? 2 * L.slice * sizeof(S) : 0;
  // Enough threads for the slice in 16-byte packs, a whole number of warps, at most 512.
  const int64_t work = L.packed ? (L.slice * sizeof(S) + kPackBytes - 1) / kPackBytes : L.slice;
  const int threads = static_cast<int>(std::clamp<int64_t>((work + 31) / 32 * 32, 32, kMaxThreads));
  TORCH_CHECK(
      a.rows <= (int64_t(1) << 31) / L.cluster - 1,
      "distill_loss: " + std::to_string(a.rows) + " rows exceed one CUDA launch; split the batch");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.rows * L.cluster));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c10::cuda::getCurrentCUDAStream(device).stream();
  cudaLaunchAttribute attr[1];
  if (L.cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = L.cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a, L));
}

template <typename S>
void launch_divergence(const RowKernelArgs& a) {
  const bool hard = a.target != nullptr;
  switch (a.divergence) {
#define PYKD_CASE(D) \
  case D:            \
    return hard ? launch_typed<S, D, true>(a) : launch_typed<S, D, false>(a);
    PYKD_CASE(Divergence::KL)
    PYKD_CASE(Divergence::ReverseKL)
    PYKD_CASE(Divergence::JSD)
    PYKD_CASE(Divergence::MSE)
    PYKD_CASE(Divergence::Cosine)
#undef PYKD_CASE
  }
}

}  // namespace

void launch_distill_loss_rows(const RowKernelArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "distill_loss_cuda",
                                  [&] { launch_divergence<scalar_t>(a); });
}

namespace {

// grad (rows, classes) *= scale: one scalar (a thread returns at once when it is exactly 1, so the
// usual d loss = 1 costs a launch and no traffic) or one value per row.
template <typename S, typename A>
__global__ void scale_grad_kernel(S* grad, const A* scale, int64_t classes, int64_t total,
                                  bool per_row) {
  const A c = per_row ? A(0) : *scale;
  if (!per_row && c == A(1)) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const A f = per_row ? scale[i / classes] : c;
    grad[i] = static_cast<S>(static_cast<A>(grad[i]) * f);
  }
}

// grad: (*, V) contiguous, scaled in place by scale: [] or (*). Never syncs with the host.
void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.is_contiguous(), "_scale_grad_: grad must be contiguous");
  TORCH_CHECK(scale.device() == grad.device(), "_scale_grad_: scale must be on grad's device");
  TORCH_CHECK(scale.dim() == 0 || scale.numel() * grad.size(-1) == grad.numel(),
              "_scale_grad_: scale must be a scalar or hold one value per row of grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const bool per_row = scale.dim() > 0;
  const int64_t classes = grad.size(-1);
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto sc = scale.to(acc).contiguous();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((grad.numel() + threads - 1) / threads, 65536);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
        using A = acc_type_t<scalar_t>;
        scale_grad_kernel<scalar_t, A><<<blocks, threads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), sc.const_data_ptr<A>(), classes, grad.numel(), per_row);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The plan distill_loss launches for rows of `classes` columns of `dtype` on `device`, its rows
// 16-byte aligned or not: "single" or "cluster<blocks per row>", then "cached" (the slice stays in
// shared memory between sweeps) or "uncached", then "packed" (16-byte loads) or "scalar". Tests
// use it to know which path they exercise. Every divergence and target/no-target kernel uses the
// same static shared memory, so the KL kernel's limits stand for all of them.
std::string launch_plan(int64_t classes, const std::string& dtype, int64_t device, bool aligned) {
  static const std::map<std::string, at::ScalarType> kTypes = {{"float32", at::kFloat},
                                                               {"float64", at::kDouble},
                                                               {"float16", at::kHalf},
                                                               {"bfloat16", at::kBFloat16}};
  const auto type = kTypes.find(dtype);
  TORCH_CHECK(type != kTypes.end(),
              "dtype must be float32, float64, float16 or bfloat16, got '" + dtype + "'");
  TORCH_CHECK(classes > 0, "classes must be positive, got " + std::to_string(classes));
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(),
              "no CUDA device " + std::to_string(device));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  std::string name;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type->second, "launch_plan", [&] {
    const int64_t elem = sizeof(scalar_t);
    const KernelLimits& lim = kernel_limits(distill_loss_kernel<scalar_t, Divergence::KL, false>,
                                            static_cast<int>(device));
    const Layout L = plan(classes, elem, aligned && (classes * elem) % kPackBytes == 0,
                          lim.clusters && !single_block_forced(), lim.max_dynamic_smem);
    name = (L.cluster > 1 ? "cluster" + std::to_string(L.cluster) : std::string("single")) +
           (L.cached ? "/cached" : "/uncached") + (L.packed ? "/packed" : "/scalar");
  });
  return name;
}

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  device_kernels(c10::DeviceType::CUDA).rows = &launch_distill_loss_rows;
  m.impl("_distill_loss_fused", &distill_loss_fused);
  m.impl("_scale_grad_", &scale_grad_cuda);
}

}  // namespace pykd::cuda
