// fused_linear_distill_loss: the student's and teacher's linear heads and distill_loss, in row
// chunks, so no [N, V] tensor is ever made. The op has no kernel of its own: its host code (here,
// for every device) runs the heads with ATen's matmuls (MKL on CPU, cuBLAS on CUDA) and launches
// distill_loss's row kernel for the device (DeviceKernels), so this file registers it for both.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "distill_loss_common.h"

namespace pykd {

namespace {

constexpr const char* kOp = "fused_linear_distill_loss";

LossConfig check_fused_linear_args(
    const at::Tensor& hs, const at::Tensor& ws, const std::optional<at::Tensor>& bs,
    const at::Tensor& ht, const at::Tensor& wt, const std::optional<at::Tensor>& bt,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index) {
  const std::string name = std::string(kOp) + ": ";
  LossConfig cfg = check_loss_options(kOp, divergence, temperature, alpha, beta, ignore_index,
                                      reduction, target.has_value());
  // The weight gradient is a sum over rows, so per-row incoming gradients could not be applied.
  TORCH_CHECK_VALUE(cfg.reduction != Reduction::None,
                    name + "reduction 'none' is not supported; use 'sum' with per-row weights");
  TORCH_CHECK_VALUE(chunk_size >= 1,
                    name + "chunk_size must be >= 1, got " + std::to_string(chunk_size));
  check_logits_dtype(kOp, "student_hidden", hs, hs, "student_hidden");
  check_logits_dtype(kOp, "student_weight", ws, hs, "student_hidden");
  check_logits_dtype(kOp, "teacher_hidden", ht, hs, "student_hidden");
  check_logits_dtype(kOp, "teacher_weight", wt, hs, "student_hidden");
  TORCH_CHECK_VALUE(hs.dim() >= 1 && ht.dim() == hs.dim() &&
                        ht.sizes().slice(0, ht.dim() - 1) == hs.sizes().slice(0, hs.dim() - 1),
                    name +
                        "student_hidden (*, Hs) and teacher_hidden (*, Ht) must share the "
                        "leading dims, got " +
                        shape_str(hs.sizes()) + " and " + shape_str(ht.sizes()));
  const auto lead = hs.sizes().slice(0, hs.dim() - 1);
  TORCH_CHECK_VALUE(ws.dim() == 2 && ws.size(1) == hs.size(-1) && ws.size(0) >= 1,
                    name + "student_weight must be [V, Hs] with V >= 1 and Hs = " +
                        std::to_string(hs.size(-1)) + ", got " + shape_str(ws.sizes()));
  const int64_t V = ws.size(0);
  TORCH_CHECK_VALUE(wt.dim() == 2 && wt.size(0) == V && wt.size(1) == ht.size(-1),
                    name + "teacher_weight must be [V, Ht] = [" + std::to_string(V) + ", " +
                        std::to_string(ht.size(-1)) + "], got " + shape_str(wt.sizes()));
  for (const auto& [b, what] : {std::pair{&bs, "student_bias"}, std::pair{&bt, "teacher_bias"}}) {
    if (!b->has_value()) continue;
    check_logits_dtype(kOp, what, **b, hs, "student_hidden");
    TORCH_CHECK_VALUE((*b)->dim() == 1 && (*b)->size(0) == V, name + what + " must be [V] = [" +
                                                                  std::to_string(V) + "], got " +
                                                                  shape_str((*b)->sizes()));
  }
  check_row_inputs(kOp, hs, lead, weight, target);
  cfg.rows = c10::multiply_integers(lead);
  cfg.classes = V;
  check_row_options(kOp, cfg, hs, lead, row_temperature, row_alpha, soft_index, target.has_value());
  return cfg;
}

// out [c, V] = x [c, H] @ w[V, H]^T (+ bias), written into a preallocated chunk buffer.
void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

// _fused_linear_distill_loss on any device: student_hidden (*, Hs), student_weight [V, Hs],
// teacher_hidden (*, Ht), teacher_weight [V, Ht]. Returns (loss, grad_student_hidden,
// grad_student_weight, grad_student_bias, grad_weight), each gradient for d loss = 1 or an empty
// [0] tensor when grad_mask did not ask for it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_distill_loss_fused(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index, std::array<bool, 4> grad_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(student_hidden));
  const RowKernelLauncher launch = kernels_for(student_hidden).rows;
  const bool value_checks = value_checks_for(student_hidden);
  const LossConfig cfg = check_fused_linear_args(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
      weight, target, divergence, temperature, alpha, beta, ignore_index, reduction, chunk_size,
      row_temperature, row_alpha, soft_index);
  if (value_checks) check_row_values(kOp, cfg, weight, target, row_temperature, row_alpha);
  const int64_t N = cfg.rows, V = cfg.classes;
  const auto hs = student_hidden.reshape({N, student_hidden.size(-1)}).contiguous();
  const auto ht = teacher_hidden.reshape({N, teacher_hidden.size(-1)}).contiguous();
  const auto y = target.has_value() ? target->reshape({N}).contiguous() : at::Tensor();
  const RowWeights rw =
      prepare_rows(cfg, student_hidden, weight, target, row_temperature, row_alpha);
  const auto acc = student_hidden.options().dtype(accumulate_type(student_hidden.scalar_type()));
  auto u = at::empty({N}, acc);
  auto bad_row = at::full({1}, -1, student_hidden.options().dtype(at::kLong));

  const bool want_bias = grad_mask[2] && student_bias.has_value();
  const bool want_logit_grad = grad_mask[0] || grad_mask[1] || want_bias;
  auto grad_h = grad_mask[0] ? at::empty_like(hs) : no_grad_output(student_hidden);
  // The weight gradient accumulates chunk by chunk in its own dtype (each chunk's product is
  // formed in float32 by the BLAS); the bias gradient, a cheap [V], in float32.
  auto grad_w_head = grad_mask[1] ? at::zeros_like(student_weight, at::MemoryFormat::Contiguous)
                                  : no_grad_output(student_weight);
  auto grad_b = want_bias ? at::zeros({V}, acc) : at::Tensor();

  // One set of chunk buffers, reused: the peak is 3 x chunk x V logits, whatever N is.
  const int64_t C = std::max<int64_t>(1, std::min(chunk_size, N));
  auto logits_s = at::empty({C, V}, hs.options());
  auto logits_t = at::empty({C, V}, ht.options());
  auto logits_g = want_logit_grad ? at::empty({C, V}, hs.options()) : at::Tensor();
  for (int64_t first = 0; first < N; first += C) {
    const int64_t c = std::min(C, N - first);
    const auto hs_c = hs.narrow(0, first, c);
    auto ls = logits_s.narrow(0, 0, c);
    auto lt = logits_t.narrow(0, 0, c);
    linear_into(ls, hs_c, student_weight, student_bias);
    linear_into(lt, ht.narrow(0, first, c), teacher_weight, teacher_bias);
    auto g = want_logit_grad ? logits_g.narrow(0, 0, c) : at::Tensor();
    launch(row_kernel_args(cfg, ls, lt, y, rw, u, g.defined() ? g.data_ptr() : nullptr, nullptr,
                           bad_row, first, c));
    if (value_checks) {  // the kernel names the row within the chunk
      const int64_t bad = bad_row.item<int64_t>();
      raise_bad_row(kOp, bad < 0 ? bad : first + bad);
    }
    if (!want_logit_grad) continue;
    if (grad_mask[0]) {
      auto gh = grad_h.narrow(0, first, c);
      at::mm_out(gh, g, student_weight);
    }
    if (grad_mask[1]) grad_w_head.addmm_(g.t(), hs_c);
    if (want_bias) grad_b.add_(g.sum(0, /*keepdim=*/false, acc.dtype().toScalarType()));
  }
  const auto lead = student_hidden.sizes().slice(0, student_hidden.dim() - 1);
  auto [loss, grad_w] = reduce_rows(cfg, u, rw, lead, weight, grad_mask[3]);
  if (grad_mask[0]) grad_h = grad_h.reshape(student_hidden.sizes());
  grad_b = want_bias ? grad_b.to(student_bias->scalar_type())
                     : no_grad_output(student_bias.has_value() ? *student_bias : student_hidden);
  return {loss, grad_h, grad_w_head, grad_b, grad_w};
}

// The public op: like distill_loss, a composite that asks the fused op for exactly the gradients
// autograd will need (the teacher is frozen: its head and hidden states get none).
at::Tensor fused_linear_distill_loss(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& target,
    c10::string_view divergence, double temperature, double alpha, double beta,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index) {
  const bool gm = c10::GradMode::is_enabled();
  const std::array<bool, 4> mask{gm && student_hidden.requires_grad(),
                                 gm && student_weight.requires_grad(),
                                 gm && student_bias.has_value() && student_bias->requires_grad(),
                                 gm && weight.has_value() && weight->requires_grad()};
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pykd::_fused_linear_distill_loss", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
              double, double, double, int64_t, c10::string_view, int64_t,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              std::optional<int64_t>, std::array<bool, 4>)>();
  return std::get<0>(op.call(student_hidden, student_weight, student_bias, teacher_hidden,
                             teacher_weight, teacher_bias, weight, target, divergence, temperature,
                             alpha, beta, ignore_index, reduction, chunk_size, row_temperature,
                             row_alpha, soft_index, mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CompositeImplicitAutograd, m) {
  m.impl("fused_linear_distill_loss", &fused_linear_distill_loss);
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("_fused_linear_distill_loss", &fused_linear_distill_loss_fused);
}

#ifdef PYKD_WITH_CUDA
TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("_fused_linear_distill_loss", &fused_linear_distill_loss_fused);
}
#endif

}  // namespace pykd
