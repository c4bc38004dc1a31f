// distill_loss_topk on the CPU: its row kernel, under the host side shared by every device
// (checks, buffers, reduction, in csrc/distill_loss_topk.cpp).
#include "distill_loss_topk.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/distill_loss_topk_kernel.h"

namespace pykd::cpu {
namespace {

void launch_topk_rows(const TopkKernelArgs& a) {
  static const auto kernel = PYKD_CPU_KERNEL(distill_loss_topk_rows);
  kernel(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  device_kernels(c10::DeviceType::CPU).topk = &launch_topk_rows;
  m.impl("_distill_loss_topk_fused", &distill_loss_topk_fused);
}

}  // namespace pykd::cpu
