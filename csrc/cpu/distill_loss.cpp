// distill_loss on the CPU: the host side (checks, buffers, reduction) around the row kernel.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu/distill_loss_kernel.h"
#include "distill_loss_common.h"

namespace pykd::cpu {

namespace {

struct IsaChoice {
  RowsKernel fn;
  const char* name;
};

const IsaChoice& isa_choice() {
  static const IsaChoice choice = []() -> IsaChoice {
    const std::string cap = at::get_cpu_capability();
#ifdef PYKD_HAVE_CPU_AVX512
    if (cap == "AVX512") return {&AVX512::distill_loss_rows, "AVX512"};
#endif
#ifdef PYKD_HAVE_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") return {&AVX2::distill_loss_rows, "AVX2"};
#endif
    return {&DEFAULT::distill_loss_rows, "DEFAULT"};
  }();
  return choice;
}

// A fresh [N, V] gradient is mostly page faults on first touch: 4 KB pages cost as much as the
// whole loss at N=2048, V=32000 on the 2-core machine (docs/perf-notes.md). Asking for huge pages
// on the 2 MB-aligned interior (as torch does under THP_MEM_ALLOC_ENABLE) cuts that 512-fold.
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

at::Tensor new_gradient(const at::Tensor& like) {
  auto g = at::empty(like.sizes(), like.options());
  advise_huge_pages(g);
  return g;
}

// student, teacher: (*, V); weight: (*) or None; target: (*) int64 or None.
// Returns (loss: [] or (*), grad_student: (*, V) or [0], grad_teacher: (*, V) or [0],
//          grad_weight: (*) or [0]); gradients are those of the loss itself (d loss = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& target, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
    std::array<bool, 3> grad_mask) {
  const LossConfig cfg = check_distill_args(student, teacher, weight, target, divergence,
                                            temperature, alpha, beta, ignore_index, reduction);
  check_row_values(cfg, weight, target);
  const auto s = as_rows(student, cfg.rows, cfg.classes);
  const auto t = as_rows(teacher, cfg.rows, cfg.classes);
  const auto y = target.has_value() ? target->reshape({cfg.rows}).contiguous() : at::Tensor();
  const RowWeights rw = prepare_rows(cfg, student, weight, target);
  const auto acc = student.options().dtype(accumulate_type(student.scalar_type()));
  auto u = at::empty({cfg.rows}, acc);
  auto grad_s = grad_mask[0] ? new_gradient(student) : no_grad_output(student);
  auto grad_t = grad_mask[1] ? new_gradient(teacher) : no_grad_output(teacher);
  int64_t bad_row = -1;

  KernelArgs a;
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.student_stride = s.stride(0);
  a.teacher_stride = t.stride(0);
  a.rows = cfg.rows;
  a.classes = cfg.classes;
  a.dtype = student.scalar_type();
  a.divergence = cfg.divergence;
  a.temperature = cfg.temperature;
  a.alpha = cfg.alpha;
  a.beta = cfg.beta;
  a.ignore_index = cfg.ignore_index;
  a.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  a.weight = rw.weight.const_data_ptr();
  a.norm = rw.norm.const_data_ptr();
  a.row_loss = u.data_ptr();
  a.grad_student = grad_mask[0] ? grad_s.data_ptr() : nullptr;
  a.grad_teacher = grad_mask[1] ? grad_t.data_ptr() : nullptr;
  a.bad_row = &bad_row;
  if (cfg.rows > 0) isa_choice().fn(a);
  raise_bad_row(bad_row);

  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const bool want_w = grad_mask[2] && weight.has_value();
  auto [loss, grad_w] = reduce_rows(cfg, u, rw, lead, weight, want_w);
  if (!want_w) grad_w = no_grad_output(weight.has_value() ? *weight : u);
  return {loss, grad_s, grad_t, grad_w};
}

// grad: (*, V), scaled in place by scale: [] or (*). Reading a CPU scalar costs no sync, so the
// common d loss = 1 case returns without touching the gradient.
void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  if (grad.numel() == 0) return;
  if (scale.dim() == 0) {
    if (scale.item<double>() != 1.0) grad.mul_(scale);
    return;
  }
  grad.mul_(scale.unsqueeze(-1));
}

}  // namespace

RowsKernel select_rows_kernel() { return isa_choice().fn; }
const char* active_cpu_isa() { return isa_choice().name; }

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("_distill_loss_fused", &distill_loss_fused_cpu);
  m.impl("_scale_grad_", &scale_grad_cpu);
}

}  // namespace pykd::cpu
