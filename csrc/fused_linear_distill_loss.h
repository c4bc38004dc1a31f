// fused_linear_distill_loss: the student's and teacher's linear heads and distill_loss, in row
// chunks, so no [N, V] tensor is ever made. Host code for every device around that device's
// distill_loss row kernel (see DeviceKernels); the matmuls are ATen's (MKL on CPU, cuBLAS on CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#include "distill_loss_common.h"

namespace pykd {

// _fused_linear_distill_loss on any device: student_hidden (*, Hs), student_weight [V, Hs],
// teacher_hidden (*, Ht), teacher_weight [V, Ht].
// Returns (loss, grad_student_hidden, grad_student_weight, grad_student_bias, grad_weight), each
// gradient for d loss = 1 or an empty [0] tensor when grad_mask did not ask for it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_distill_loss_fused(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index, std::array<bool, 4> grad_mask);

}  // namespace pykd
