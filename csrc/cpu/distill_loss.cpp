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
  device_kernels(c10::DeviceType::CPU).rows = &launch_distill_loss_rows;
  m.impl("_distill_loss_fused", &distill_loss_fused);
  m.impl("_scale_grad_", &scale_grad_cpu);
}

}  // namespace pykd::cpu
