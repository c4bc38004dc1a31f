// fused_linear_distill_loss on CUDA: cuBLAS matmuls (through ATen) around distill_loss's row
// kernel (cuda/distill_loss.cu), in row chunks (the host loop is
// csrc/fused_linear_distill_loss.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/distill_loss.h"
#include "distill_loss_common.h"
#include "fused_linear_distill_loss.h"

namespace pykd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_distill_loss_cuda(const at::Tensor& hs, const at::Tensor& ws,
                               const std::optional<at::Tensor>& bs, const at::Tensor& ht,
                               const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& target, c10::string_view divergence,
                               double temperature, double alpha, double beta, int64_t ignore_index,
                               c10::string_view reduction, int64_t chunk_size,
                               std::array<bool, 4> grad_mask) {
  const c10::cuda::CUDAGuard guard(hs.device());
  return fused_linear_distill_loss_impl(hs, ws, bs, ht, wt, bt, weight, target, divergence,
                                        temperature, alpha, beta, ignore_index, reduction,
                                        chunk_size, grad_mask, &launch_distill_loss_rows,
                                        /*value_checks=*/debug_checks_enabled());
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("_fused_linear_distill_loss", &fused_linear_distill_loss_cuda);
}

}  // namespace pykd::cuda
