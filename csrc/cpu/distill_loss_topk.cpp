// distill_loss_topk on the CPU: the host side (checks, buffers, reduction, in
// csrc/distill_loss_topk.cpp) around its row kernel.
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

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CPU, m) { m.impl("_distill_loss_topk_fused", &distill_loss_topk_cpu); }

}  // namespace pykd::cpu
