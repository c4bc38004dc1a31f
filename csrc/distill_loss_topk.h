// distill_loss_topk: the student's full logits against a teacher given as its top-k (index,
// logit) pairs per row (a teacher-output cache). Host code shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#include "distill_loss_common.h"

namespace pykd {

// Raw views of one call for a device's top-k row kernel (see RowKernelArgs for the shared fields).
struct TopkKernelArgs {
  const void* student;  // [rows, classes] logits dtype, row stride student_stride, unit columns
  int64_t student_stride;
  int64_t rows;
  int64_t classes;
  int64_t k;
  c10::ScalarType dtype;
  Divergence divergence;  // kl or jsd
  double temperature;
  double alpha;
  double beta;
  int64_t ignore_index;
  int64_t soft_index;
  const void* row_temperature;  // [rows] accumulation type, or nullptr
  const void* row_alpha;        // [rows] accumulation type, or nullptr
  const int64_t* topk_index;    // [rows, k] contiguous
  const void* topk_logit;       // [rows, k] accumulation type, contiguous
  const void* log_rest;         // [rows] accumulation type: log of the teacher's rest, or nullptr
  const int64_t* target;        // [rows] or nullptr
  const void* weight;           // [rows] accumulation type, 0 on ignored rows
  const void* norm;             // [] accumulation type
  void* row_loss;               // [rows] accumulation type, out
  void* grad_student;  // [rows, classes] logits dtype, contiguous, out; nullptr = not wanted
  int64_t* bad_row;    // [1] out: a row with no finite logit or an index outside [0, V)
};

// _distill_loss_topk_fused on any device: student (*, V); teacher_indices, teacher_logits (*, k);
// teacher_log_rest (*) or none.
// Returns (loss, grad_student or [0], grad_weight or [0]) for d loss = 1; grad_mask asks for
// (student, weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_topk_fused(
    const at::Tensor& student, const at::Tensor& topk_index, const at::Tensor& topk_logit,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index, const std::optional<at::Tensor>& teacher_log_rest,
    std::array<bool, 2> grad_mask);

}  // namespace pykd
