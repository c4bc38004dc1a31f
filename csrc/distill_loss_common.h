// Host-side pieces of distill_loss shared by the CPU and CUDA implementations: option parsing,
// argument checks, and the O(N) work around the row kernel (normaliser, reduction, weight
// gradient), written with ATen ops so that on CUDA it stays on the device with no host sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "pykd/distill_math.h"

namespace pykd {

// Error messages are built with std::to_string: streaming a number into a std::ostream inside an
// extension crashed the lent GPU machine's image (shared/BUILD_NOTES.md).
std::string shape_str(c10::IntArrayRef sizes);

struct LossConfig {
  Divergence divergence;
  Reduction reduction;
  double temperature;
  double alpha;
  double beta;
  int64_t ignore_index;
  int64_t rows;     // N: product of the leading dims
  int64_t classes;  // V: size of the last dim
};

// Checks everything that needs no data (LOSS_SPEC.md "Bad input"); Python checks first, with the
// same rules, so these fire only for direct torch.ops calls.
LossConfig check_distill_args(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& target, c10::string_view divergence,
                              double temperature, double alpha, double beta, int64_t ignore_index,
                              c10::string_view reduction);

// Whether PYKD_DEBUG=1 asks the CUDA path to check the data (a device sync) and raise.
bool debug_checks_enabled();

// Raw views of one call, handed to a device's row kernel. Pointers typed void are in the logits
// dtype (`dtype`) or in the accumulation type (double for float64 logits, float otherwise).
struct RowKernelArgs {
  const void* student;  // [rows, classes], row stride student_stride, unit column stride
  const void* teacher;  // [rows, classes], row stride teacher_stride, unit column stride
  int64_t student_stride;
  int64_t teacher_stride;
  int64_t rows;
  int64_t classes;
  c10::ScalarType dtype;
  Divergence divergence;
  double temperature;
  double alpha;
  double beta;
  int64_t ignore_index;
  const int64_t* target;  // [rows] or nullptr
  const void* weight;     // [rows] accumulation type: w_i, 0 on ignored rows
  const void* norm;       // [] accumulation type: the reduction's normaliser
  void* row_loss;         // [rows] accumulation type, out: unweighted row loss u_i (0 if ignored)
  void* grad_student;     // [rows, classes] logits dtype, contiguous, out; nullptr = not wanted
  void* grad_teacher;     // [rows, classes] logits dtype, contiguous, out; nullptr = not wanted
  int64_t* bad_row;       // [1] out: a row with no finite logit where a softmax needs one; -1
};
using RowKernelLauncher = void (*)(const RowKernelArgs&);

// The whole of _distill_loss_fused on one device around its row kernel: checks, buffers, row
// weights, the launch, the reduction. `value_checks` reads the data to raise on bad labels,
// weights and all -inf rows (always on CPU; on CUDA only with PYKD_DEBUG=1, since it syncs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_fused_impl(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& target, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
    std::array<bool, 3> grad_mask, RowKernelLauncher launch, bool value_checks);

}  // namespace pykd
