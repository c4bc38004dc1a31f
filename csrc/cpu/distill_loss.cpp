// distill_loss on the CPU: the host side (checks, buffers, reduction) around the row kernel.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "cpu/distill_loss_kernel.h"
#include "distill_loss_common.h"
#include "fused_linear_distill_loss.h"

namespace pykd::cpu {

namespace {

struct IsaChoice {
  RowKernelLauncher fn;
  TopkKernelLauncher topk;
  const char* name;
};

const IsaChoice& isa_choice() {
  static const IsaChoice choice = []() -> IsaChoice {
    const std::string cap = at::get_cpu_capability();
#ifdef PYKD_HAVE_CPU_AVX512
    if (cap == "AVX512") {
      return {&AVX512::distill_loss_rows, &AVX512::distill_loss_topk_rows, "AVX512"};
    }
#endif
#ifdef PYKD_HAVE_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") {
      return {&AVX2::distill_loss_rows, &AVX2::distill_loss_topk_rows, "AVX2"};
    }
#endif
    return {&DEFAULT::distill_loss_rows, &DEFAULT::distill_loss_topk_rows, "DEFAULT"};
  }();
  return choice;
}

void launch_rows(const KernelArgs& a) { isa_choice().fn(a); }
void launch_topk_rows(const TopkKernelArgs& a) { isa_choice().topk(a); }

// student, teacher: (*, V); weight: (*) or None; target: (*) int64 or None.
// Returns (loss: [] or (*), grad_student: (*, V) or [0], grad_teacher: (*, V) or [0],
//          grad_weight: (*) or [0]); gradients are those of the loss itself (d loss = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& target, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
    std::array<bool, 3> grad_mask) {
  return distill_loss_fused_impl(student, teacher, weight, target, divergence, temperature, alpha,
                                 beta, ignore_index, reduction, grad_mask, &launch_rows,
                                 /*value_checks=*/true);
}

// student_hidden (*, Hs), student_weight [V, Hs], teacher_hidden (*, Ht), teacher_weight [V, Ht].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_distill_loss_cpu(const at::Tensor& hs, const at::Tensor& ws,
                              const std::optional<at::Tensor>& bs, const at::Tensor& ht,
                              const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& target, c10::string_view divergence,
                              double temperature, double alpha, double beta, int64_t ignore_index,
                              c10::string_view reduction, int64_t chunk_size,
                              std::array<bool, 4> grad_mask) {
  return fused_linear_distill_loss_impl(hs, ws, bs, ht, wt, bt, weight, target, divergence,
                                        temperature, alpha, beta, ignore_index, reduction,
                                        chunk_size, grad_mask, &launch_rows,
                                        /*value_checks=*/true);
}

// student (*, V); teacher_indices, teacher_logits (*, k).
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_topk_cpu(
    const at::Tensor& student, const at::Tensor& index, const at::Tensor& logit,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction, std::array<bool, 2> grad_mask) {
  return distill_loss_topk_impl(student, index, logit, weight, target, divergence, temperature,
                                alpha, beta, ignore_index, reduction, grad_mask, &launch_topk_rows,
                                /*value_checks=*/true);
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

const char* active_cpu_isa() { return isa_choice().name; }

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("_distill_loss_fused", &distill_loss_fused_cpu);
  m.impl("_scale_grad_", &scale_grad_cpu);
  m.impl("_fused_linear_distill_loss", &fused_linear_distill_loss_cpu);
  m.impl("_distill_loss_topk_fused", &distill_loss_topk_cpu);
}

}  // namespace pykd::cpu
