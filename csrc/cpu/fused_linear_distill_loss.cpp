// fused_linear_distill_loss on the CPU: ATen's matmuls (MKL) around distill_loss's row kernel, in
// row chunks (the host loop is csrc/fused_linear_distill_loss.cpp).
#include "fused_linear_distill_loss.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/distill_loss_kernel.h"

namespace pykd::cpu {
namespace {

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
                                        chunk_size, grad_mask, &launch_distill_loss_rows,
                                        /*value_checks=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("_fused_linear_distill_loss", &fused_linear_distill_loss_cpu);
}

}  // namespace pykd::cpu
