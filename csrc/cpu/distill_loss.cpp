// distill_loss on the CPU: the host side (checks, buffers, reduction) around the row kernel, and
// the in-place gradient scaling its backward uses.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/distill_loss_kernel.h"
#include "distill_loss_common.h"

namespace pykd::cpu {

void launch_distill_loss_rows(const KernelArgs& a) {
  static const auto kernel = PYKD_CPU_KERNEL(distill_loss_rows);
  kernel(a);
}

namespace {

// student, teacher: (*, V); weight: (*) or None; target: (*) int64 or None.
// Returns (loss: [] or (*), grad_student: (*, V) or [0], grad_teacher: (*, V) or [0],
//          grad_weight: (*) or [0]); gradients are those of the loss itself (d loss = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& target, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
    std::array<bool, 3> grad_mask) {
  return distill_loss_fused_impl(student, teacher, weight, target, divergence, temperature, alpha,
                                 beta, ignore_index, reduction, grad_mask,
                                 &launch_distill_loss_rows,
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

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("_distill_loss_fused", &distill_loss_fused_cpu);
  m.impl("_scale_grad_", &scale_grad_cpu);
}

}  // namespace pykd::cpu
