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
                              const std::optional<at::Tensor>& target,
                              c10::string_view divergence, double temperature, double alpha,
                              double beta, int64_t ignore_index, c10::string_view reduction);

// Accumulation dtype: float64 for float64 logits, float32 otherwise.
c10::ScalarType accumulate_type(c10::ScalarType logits);

// A [rows, classes] view with unit column stride (a copy only if the last dim is strided).
at::Tensor as_rows(const at::Tensor& x, int64_t rows, int64_t classes);

// Per-row weights with 0 on ignored rows, and the reduction's normaliser; both in the
// accumulation dtype on the logits' device. Labels outside [0, V) and negative weights make the
// affected values NaN, so on CUDA (no check without PYKD_DEBUG) the loss comes out NaN.
struct RowWeights {
  at::Tensor weight;  // [rows]
  at::Tensor norm;    // []
  at::Tensor valid;   // [rows] bool, rows whose target is not ignore_index; undefined without target
};
RowWeights prepare_rows(const LossConfig& cfg, const at::Tensor& student,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& target);

// Raises on labels outside [0, V) that are not ignore_index and on negative weights. Reads the
// data, so on CUDA it syncs: called always on CPU, and on CUDA only with PYKD_DEBUG=1.
void check_row_values(const LossConfig& cfg, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& target);
void raise_bad_row(int64_t row);
bool debug_checks_enabled();

// From the unweighted row losses u: the loss (shaped `lead` for reduction none) and, if asked,
// d loss / d weight in the weight's dtype.
std::tuple<at::Tensor, at::Tensor> reduce_rows(const LossConfig& cfg, const at::Tensor& u,
                                               const RowWeights& rw, c10::IntArrayRef lead,
                                               const std::optional<at::Tensor>& weight,
                                               bool weight_grad);

// An empty stand-in for a gradient that was not asked for (custom ops cannot return None).
at::Tensor no_grad_output(const at::Tensor& like);

}  // namespace pykd
