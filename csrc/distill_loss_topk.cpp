#include "distill_loss_topk.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <string>

namespace pykd {

namespace {

constexpr const char* kOp = "distill_loss_topk";

LossConfig check_topk_args(const at::Tensor& student, const at::Tensor& index,
                           const at::Tensor& logit, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& target, c10::string_view divergence,
                           double temperature, double alpha, double beta, int64_t ignore_index,
                           c10::string_view reduction,
                           const std::optional<at::Tensor>& row_temperature,
                           const std::optional<at::Tensor>& row_alpha,
                           std::optional<int64_t> soft_index,
                           const std::optional<at::Tensor>& log_rest) {
  const std::string name = std::string(kOp) + ": ";
  LossConfig cfg = check_loss_options(kOp, divergence, temperature, alpha, beta, ignore_index,
                                      reduction, target.has_value());
  // Off the top-k the teacher has no mass: reverse KL would be infinite, and mse/cosine compare
  // values the cache does not hold.
  TORCH_CHECK_VALUE(cfg.divergence == Divergence::KL || cfg.divergence == Divergence::JSD,
                    name + "divergence must be kl or jsd with a top-k teacher, got '" +
                        std::string(divergence) +
                        "' (reverse KL is infinite off the teacher's top-k)");
  check_logits_dtype(kOp, "student", student, student);
  check_logits_shape(kOp, student);
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  TORCH_CHECK_VALUE(index.dim() == student.dim() &&
                        index.sizes().slice(0, index.dim() - 1) == lead && index.size(-1) >= 1,
                    name +
                        "teacher_indices must be (*, k) with k >= 1 and the student's leading "
                        "dims, got " +
                        shape_str(index.sizes()) + " for student " + shape_str(student.sizes()));
  TORCH_CHECK_VALUE(logit.sizes() == index.sizes(),
                    name + "teacher_logits shape " + shape_str(logit.sizes()) +
                        " must equal teacher_indices shape " + shape_str(index.sizes()));
  TORCH_CHECK_TYPE(
      index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
      name + "teacher_indices must be int64 or int32, got " + dtype_str(index.scalar_type()));
  TORCH_CHECK_TYPE(
      at::isFloatingType(logit.scalar_type()),
      name + "teacher_logits must be floating point, got " + dtype_str(logit.scalar_type()));
  check_same_device(kOp, "teacher_indices", index, student);
  check_same_device(kOp, "teacher_logits", logit, student);
  check_row_inputs(kOp, student, lead, weight, target);
  if (log_rest.has_value()) {
    // The rest bucket is defined for kl; jsd's mixture over a bucket is not implemented.
    TORCH_CHECK_VALUE(
        cfg.divergence == Divergence::KL,
        name + "teacher_log_rest needs divergence kl, got '" + std::string(divergence) + "'");
    TORCH_CHECK_VALUE(log_rest->sizes() == lead,
                      name + "teacher_log_rest must have the student's leading shape " +
                          shape_str(lead) + ", got " + shape_str(log_rest->sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(log_rest->scalar_type()),
                     name + "teacher_log_rest must be floating point, got " +
                         dtype_str(log_rest->scalar_type()));
    check_same_device(kOp, "teacher_log_rest", *log_rest, student);
  }
  cfg.rows = c10::multiply_integers(lead);
  cfg.classes = student.size(-1);
  check_row_options(kOp, cfg, student, lead, row_temperature, row_alpha, soft_index,
                    target.has_value());
  return cfg;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_topk_fused(
    const at::Tensor& student, const at::Tensor& topk_index, const at::Tensor& topk_logit,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index, const std::optional<at::Tensor>& teacher_log_rest,
    std::array<bool, 2> grad_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(student));
  const TopkKernelLauncher launch = kernels_for(student).topk;
  const bool value_checks = value_checks_for(student);
  const LossConfig cfg = check_topk_args(
      student, topk_index, topk_logit, weight, target, divergence, temperature, alpha, beta,
      ignore_index, reduction, row_temperature, row_alpha, soft_index, teacher_log_rest);
  const int64_t k = topk_index.size(-1);
  // [N, k] is small next to [N, V]: normalise its dtypes once here.
  const auto idx = topk_index.reshape({cfg.rows, k}).to(at::kLong).contiguous();
  const auto acc = student.options().dtype(accumulate_type(student.scalar_type()));
  const auto tlog = topk_logit.reshape({cfg.rows, k}).to(acc.dtype()).contiguous();
  const auto rest = teacher_log_rest.has_value()
                        ? teacher_log_rest->reshape({cfg.rows}).to(acc.dtype()).contiguous()
                        : at::Tensor();
  if (value_checks) {
    check_row_values(kOp, cfg, weight, target, row_temperature, row_alpha);
    const auto bad = (idx < 0) | (idx >= cfg.classes);
    if (bad.any().item<bool>()) {
      const auto where = bad.nonzero()[0];
      const int64_t r = where[0].item<int64_t>(), j = where[1].item<int64_t>();
      TORCH_CHECK(false, std::string(kOp) + ": teacher_indices[" + std::to_string(r) + ", " +
                             std::to_string(j) +
                             "] = " + std::to_string(idx[r][j].item<int64_t>()) +
                             " is outside [0, " + std::to_string(cfg.classes) + ")");
    }
    if (rest.defined()) {
      const auto bad_rest = (rest > 0) | rest.isnan();
      if (bad_rest.any().item<bool>()) {
        const int64_t r = bad_rest.nonzero()[0][0].item<int64_t>();
        TORCH_CHECK(false, std::string(kOp) + ": teacher_log_rest row " + std::to_string(r) +
                               " is not a log-probability (NaN or > 0)");
      }
    }
    if (k > 1) {
      const auto sorted = std::get<0>(idx.sort(-1));
      const auto dup = (sorted.narrow(1, 1, k - 1) == sorted.narrow(1, 0, k - 1)).any(1);
      if (dup.any().item<bool>()) {
        const int64_t r = dup.nonzero()[0][0].item<int64_t>();
        TORCH_CHECK(false, std::string(kOp) + ": teacher_indices row " + std::to_string(r) +
                               " repeats an index; the k indices of a row must be distinct");
      }
    }
  }
  auto s = student.reshape({cfg.rows, cfg.classes});
  if (s.stride(1) != 1) s = s.contiguous();
  const auto y = target.has_value() ? target->reshape({cfg.rows}).contiguous() : at::Tensor();
  const RowWeights rw = prepare_rows(cfg, student, weight, target, row_temperature, row_alpha);
  auto u = at::empty({cfg.rows}, acc);
  auto grad_s = grad_mask[0] ? new_gradient(student) : no_grad_output(student);
  auto bad_row = at::full({1}, -1, student.options().dtype(at::kLong));

  TopkKernelArgs a;
  a.student = s.const_data_ptr();
  a.student_stride = s.stride(0);
  a.rows = cfg.rows;
  a.classes = cfg.classes;
  a.k = k;
  a.dtype = student.scalar_type();
  a.divergence = cfg.divergence;
  a.temperature = cfg.temperature;
  a.alpha = cfg.alpha;
  a.beta = cfg.beta;
  a.ignore_index = cfg.ignore_index;
  a.soft_index = cfg.soft_index;
  a.row_temperature = rw.temperature.defined() ? rw.temperature.const_data_ptr() : nullptr;
  a.row_alpha = rw.alpha.defined() ? rw.alpha.const_data_ptr() : nullptr;
  a.topk_index = idx.const_data_ptr<int64_t>();
  a.topk_logit = tlog.const_data_ptr();
  a.log_rest = rest.defined() ? rest.const_data_ptr() : nullptr;
  a.target = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  a.weight = rw.weight.const_data_ptr();
  a.norm = rw.norm.const_data_ptr();
  a.row_loss = u.data_ptr();
  a.grad_student = grad_mask[0] ? grad_s.data_ptr() : nullptr;
  a.bad_row = bad_row.data_ptr<int64_t>();
  if (cfg.rows > 0) launch(a);
  if (value_checks) raise_bad_row(kOp, bad_row.item<int64_t>());

  const auto lead = student.sizes().slice(0, student.dim() - 1);
  auto [loss, grad_w] = reduce_rows(cfg, u, rw, lead, weight, grad_mask[1]);
  return {loss, grad_s, grad_w};
}

namespace {

at::Tensor distill_loss_topk(const at::Tensor& student, const at::Tensor& topk_index,
                             const at::Tensor& topk_logit, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& target, c10::string_view divergence,
                             double temperature, double alpha, double beta, int64_t ignore_index,
                             c10::string_view reduction,
                             const std::optional<at::Tensor>& row_temperature,
                             const std::optional<at::Tensor>& row_alpha,
                             std::optional<int64_t> soft_index,
                             const std::optional<at::Tensor>& teacher_log_rest) {
  const bool gm = c10::GradMode::is_enabled();
  const std::array<bool, 2> mask{gm && student.requires_grad(),
                                 gm && weight.has_value() && weight->requires_grad()};
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pykd::_distill_loss_topk_fused", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
              double, double, double, int64_t, c10::string_view, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, std::optional<int64_t>,
              const std::optional<at::Tensor>&, std::array<bool, 2>)>();
  return std::get<0>(op.call(student, topk_index, topk_logit, weight, target, divergence,
                             temperature, alpha, beta, ignore_index, reduction, row_temperature,
                             row_alpha, soft_index, teacher_log_rest, mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CompositeImplicitAutograd, m) {
  m.impl("distill_loss_topk", &distill_loss_topk);
}

}  // namespace pykd
