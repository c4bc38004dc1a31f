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
// extension crashed the process on a CUDA 13 / torch 2.11 image (csrc/README.md).
std::string shape_str(c10::IntArrayRef sizes);
// A double as printf's %f with trailing zeros trimmed (0.5, 2.0, inf).
std::string num_str(double x);
// A dtype by its Python name (float32, int64).
std::string dtype_str(c10::ScalarType t);

struct LossConfig {
  Divergence divergence;
  Reduction reduction;
  double temperature;
  double alpha;
  double beta;
  int64_t ignore_index;
  int64_t soft_index;  // label of soft-only rows; ignore_index when there are none
  int64_t rows;        // N: product of the leading dims
  int64_t classes;     // V: size of the last dim
};

// The argument checks (docs/loss.md, "Bad input"): the one home of each rule, raising ValueError
// (shapes, options, devices) or TypeError (dtypes) in Python. pykd/_checks.py repeats them, with
// the same text, only for the fake kernels (under torch.compile and on the meta device these never
// run); `op` prefixes every message.
LossConfig check_loss_options(const char* op, c10::string_view divergence, double temperature,
                              double alpha, double beta, int64_t ignore_index,
                              c10::string_view reduction, bool has_target);
// weight / target: the leading shape `lead`, the right dtypes, on `like`'s device.
void check_row_inputs(const char* op, const at::Tensor& like, c10::IntArrayRef lead,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& target);
// x (named `what`) sits on the device of `like` (named `like_what`).
void check_same_device(const char* op, const char* what, const at::Tensor& x,
                       const at::Tensor& like, const char* like_what = "student");
// x (named `what`) has a logits dtype equal to `like`'s and sits on its device.
void check_logits_dtype(const char* op, const char* what, const at::Tensor& x,
                        const at::Tensor& like, const char* like_what = "student");
// student is (*, V) with V >= 1.
void check_logits_shape(const char* op, const at::Tensor& student);
// The per-row options: row_temperature / row_alpha (*) floating tensors on `like`'s device
// replacing the scalars, row_alpha only with a target; soft_index a label outside [0, V) other than
// ignore_index (rows carrying it have no label: the soft term alone). Sets cfg.soft_index.
void check_row_options(const char* op, LossConfig& cfg, const at::Tensor& like,
                       c10::IntArrayRef lead, const std::optional<at::Tensor>& row_temperature,
                       const std::optional<at::Tensor>& row_alpha,
                       std::optional<int64_t> soft_index, bool has_target);
// All of distill_loss's argument checks; fills rows (N) and classes (V).
LossConfig check_distill_args(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& target, c10::string_view divergence,
                              double temperature, double alpha, double beta, int64_t ignore_index,
                              c10::string_view reduction,
                              const std::optional<at::Tensor>& row_temperature,
                              const std::optional<at::Tensor>& row_alpha,
                              std::optional<int64_t> soft_index);

// Accumulation dtype: float64 for float64 logits, float32 otherwise.
c10::ScalarType accumulate_type(c10::ScalarType logits);

// What the kernels read per row, in the accumulation dtype on `like`'s device: the weights with 0
// on ignored rows, the reduction's normaliser, and the per-row temperature and alpha (undefined
// when the scalars serve). Labels outside [0, V) (other than ignore_index and soft_index) and
// negative weights make the affected values NaN, so on CUDA (no check without PYKD_DEBUG) the loss
// comes out NaN; so do out-of-range row options, in the kernel.
struct RowWeights {
  at::Tensor weight;  // [rows]
  at::Tensor norm;    // []
  at::Tensor valid;  // [rows] bool, rows whose target is not ignore_index; undefined without target
  at::Tensor temperature;  // [rows] or undefined
  at::Tensor alpha;        // [rows] or undefined
};
RowWeights prepare_rows(const LossConfig& cfg, const at::Tensor& like,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& row_temperature,
                        const std::optional<at::Tensor>& row_alpha);

// Raises on labels outside [0, V) that are neither ignore_index nor soft_index, on negative
// weights and on row options out of range. Reads the data, so on CUDA it syncs: called always on
// CPU, and on CUDA only with PYKD_DEBUG=1.
void check_row_values(const char* op, const LossConfig& cfg,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& target,
                      const std::optional<at::Tensor>& row_temperature,
                      const std::optional<at::Tensor>& row_alpha);
void raise_bad_row(const char* op, int64_t row);

// From the unweighted row losses u: the loss (shaped `lead` for reduction none) and, if asked and
// a weight was given, d loss / d weight in the weight's dtype (else an empty stand-in).
std::tuple<at::Tensor, at::Tensor> reduce_rows(const LossConfig& cfg, const at::Tensor& u,
                                               const RowWeights& rw, c10::IntArrayRef lead,
                                               const std::optional<at::Tensor>& weight,
                                               bool weight_grad);

// An empty stand-in for a gradient that was not asked for (custom ops cannot return None).
at::Tensor no_grad_output(const at::Tensor& like);
// A fresh gradient buffer shaped like `like`. On the CPU a large one gets its pages ready
// (distill_loss_common.cpp): populated now, or, where `rows_populate` is given and its rows are
// long, left to the row kernel, which then gets *rows_populate = true.
at::Tensor new_gradient(const at::Tensor& like, bool* rows_populate = nullptr);

// Whether PYKD_DEBUG=1 asks the CUDA path to check the data (a device sync) and raise.
bool debug_checks_enabled();
// Whether an op on `t`'s device reads the data to raise on bad labels, weights and rows with no
// finite logit: always on the CPU, on CUDA only with PYKD_DEBUG=1 (it costs a sync).
bool value_checks_for(const at::Tensor& t);

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
  int64_t soft_index;           // label of soft-only rows (ignore_index when none)
  const void* row_temperature;  // [rows] accumulation type, or nullptr: `temperature` serves
  const void* row_alpha;        // [rows] accumulation type, or nullptr: `alpha` serves
  const int64_t* target;        // [rows] or nullptr
  const void* weight;           // [rows] accumulation type: w_i, 0 on ignored rows
  const void* norm;             // [] accumulation type: the reduction's normaliser
  void* row_loss;      // [rows] accumulation type, out: unweighted row loss u_i (0 if ignored)
  void* grad_student;  // [rows, classes] logits dtype, contiguous, out; nullptr = not wanted
  void* grad_teacher;  // [rows, classes] logits dtype, contiguous, out; nullptr = not wanted
  int64_t* bad_row;    // [1] out: a row with no finite logit where a softmax needs one; -1
  // CPU: the gradients are fresh mappings whose pages the kernel populates row by row, just
  // before writing each row (new_gradient).
  bool populate_rows = false;
};
using RowKernelLauncher = void (*)(const RowKernelArgs&);
struct TopkKernelArgs;  // distill_loss_topk.h
using TopkKernelLauncher = void (*)(const TopkKernelArgs&);

// A device's row kernels. The host code of every op is written once for all devices and finds
// the kernels here; each device's files set them where they register the ops for that device
// (their TORCH_LIBRARY_IMPL block), so a build without CUDA simply has no CUDA entry.
struct DeviceKernels {
  RowKernelLauncher rows = nullptr;
  TopkKernelLauncher topk = nullptr;
};
DeviceKernels& device_kernels(c10::DeviceType type);
// The kernels for `t`'s device; raises if this build has none there.
const DeviceKernels& kernels_for(const at::Tensor& t);

// The kernel's view of rows [first, first + rows) of a call: s and t are [rows, V] logits with
// unit column stride, y the full [N] targets (or undefined), u the full [N] row losses, grad_s /
// grad_t [rows, V] outputs or nullptr, bad_row a [1] int64 on the logits' device.
RowKernelArgs row_kernel_args(const LossConfig& cfg, const at::Tensor& s, const at::Tensor& t,
                              const at::Tensor& y, const RowWeights& rw, const at::Tensor& u,
                              void* grad_s, void* grad_t, const at::Tensor& bad_row, int64_t first,
                              int64_t rows);

// _distill_loss_fused on any device around that device's row kernel: checks, buffers, row
// weights, the launch, the reduction. student, teacher: (*, V); weight: (*) or None; target: (*)
// int64 or None. Returns (loss: [] or (*), grad_student: (*, V) or [0], grad_teacher: (*, V) or
// [0], grad_weight: (*) or [0]); gradients are those of the loss itself (d loss = 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_fused(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& target, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index, std::array<bool, 3> grad_mask);

}  // namespace pykd
