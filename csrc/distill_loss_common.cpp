#include "distill_loss_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/env.h>
#include <torch/library.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pykd {

std::string shape_str(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

std::string num_str(double x) {
  // std::to_string is printf's %f; trailing zeros are trimmed so that 0.5 reads "0.5". pykd's
  // Python checks (pykd/_checks.py) format the same way, so a rule's message is the same text.
  std::string s = std::to_string(x);
  if (s.find('.') == std::string::npos) return s;  // inf, nan
  s.erase(s.find_last_not_of('0') + 1);
  if (s.back() == '.') s += '0';
  return s;
}

std::string dtype_str(c10::ScalarType t) {
  // torch's Python names (float32, int64), so a message reads the same as a Python one.
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kShort:
      return "int16";
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kBool:
      return "bool";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
    default: {
      std::string s = c10::toString(t);  // e.g. Float8_e4m3fn -> float8_e4m3fn
      if (!s.empty()) s[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(s[0])));
      return s;
    }
  }
}

namespace {

Divergence parse_divergence(const std::string& name, c10::string_view d) {
  if (d == "kl") return Divergence::KL;
  if (d == "reverse_kl") return Divergence::ReverseKL;
  if (d == "jsd") return Divergence::JSD;
  if (d == "mse") return Divergence::MSE;
  if (d == "cosine") return Divergence::Cosine;
  TORCH_CHECK_VALUE(false, name +
                               "divergence must be one of kl, reverse_kl, jsd, mse, cosine; got '" +
                               std::string(d) + "'");
}

Reduction parse_reduction(const std::string& name, c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "batchmean") return Reduction::BatchMean;
  if (r == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, name + "reduction must be one of mean, sum, batchmean, none; got '" +
                               std::string(r) + "'");
}

bool is_logits_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

LossConfig check_loss_options(const char* op, c10::string_view divergence, double temperature,
                              double alpha, double beta, int64_t ignore_index,
                              c10::string_view reduction, bool has_target) {
  const std::string name = std::string(op) + ": ";
  LossConfig cfg;
  cfg.divergence = parse_divergence(name, divergence);
  cfg.reduction = parse_reduction(name, reduction);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    name + "temperature must be finite and > 0, got " + num_str(temperature));
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1,
                    name + "alpha must be in [0, 1], got " + num_str(alpha));
  TORCH_CHECK_VALUE(beta > 0 && beta < 1,
                    name + "beta must be in the open interval (0, 1), got " + num_str(beta) +
                        " (at its ends jsd is 0: use divergence kl or reverse_kl)");
  TORCH_CHECK_VALUE(has_target || alpha == 1.0,
                    name + "alpha must be 1 when no target is given (there is no hard term to " +
                        "mix), got " + num_str(alpha));
  cfg.temperature = temperature;
  cfg.alpha = alpha;
  cfg.beta = beta;
  cfg.ignore_index = ignore_index;
  cfg.soft_index = ignore_index;
  return cfg;
}

void check_row_options(const char* op, LossConfig& cfg, const at::Tensor& like,
                       c10::IntArrayRef lead, const std::optional<at::Tensor>& row_temperature,
                       const std::optional<at::Tensor>& row_alpha,
                       std::optional<int64_t> soft_index, bool has_target) {
  const std::string name = std::string(op) + ": ";
  const std::pair<const char*, const std::optional<at::Tensor>*> given[] = {
      {"temperature", &row_temperature}, {"alpha", &row_alpha}};
  for (const auto& [what, x] : given) {
    if (!x->has_value()) continue;
    const auto& r = **x;
    TORCH_CHECK_VALUE(r.sizes() == lead, name + "per-row " + what + " shape " +
                                             shape_str(r.sizes()) + " must be the leading shape " +
                                             shape_str(lead));
    TORCH_CHECK_TYPE(
        at::isFloatingType(r.scalar_type()),
        name + "per-row " + what + " must be floating point, got " + dtype_str(r.scalar_type()));
    check_same_device(op, what, r, like);
  }
  TORCH_CHECK_VALUE(has_target || !row_alpha.has_value(),
                    name + "a per-row alpha needs a target (there is no hard term to mix)");
  if (soft_index.has_value()) {
    const int64_t s = *soft_index;
    TORCH_CHECK_VALUE(s != cfg.ignore_index, name + "soft_index must differ from ignore_index (" +
                                                 std::to_string(cfg.ignore_index) + ")");
    TORCH_CHECK_VALUE(s < 0 || s >= cfg.classes,
                      name + "soft_index " + std::to_string(s) + " is a class in [0, " +
                          std::to_string(cfg.classes) + "); use a label outside it");
    cfg.soft_index = s;
  }
}

void check_row_inputs(const char* op, const at::Tensor& like, c10::IntArrayRef lead,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& target) {
  const std::string name = std::string(op) + ": ";
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK_VALUE(w.sizes() == lead, name + "weight shape " + shape_str(w.sizes()) +
                                             " must be the leading shape " + shape_str(lead));
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == like.scalar_type(),
                     name + "weight must be float32 or the logits dtype " +
                         dtype_str(like.scalar_type()) + ", got " + dtype_str(w.scalar_type()));
    check_same_device(op, "weight", w, like);
  }
  if (target.has_value()) {
    const auto& y = *target;
    TORCH_CHECK_VALUE(y.sizes() == lead, name + "target shape " + shape_str(y.sizes()) +
                                             " must be the leading shape " + shape_str(lead));
    TORCH_CHECK_TYPE(
        y.scalar_type() == at::kLong,
        name + "target must be int64 class indices, got " + dtype_str(y.scalar_type()));
    check_same_device(op, "target", y, like);
  }
}

void check_same_device(const char* op, const char* what, const at::Tensor& x,
                       const at::Tensor& like, const char* like_what) {
  TORCH_CHECK_VALUE(x.device() == like.device(), std::string(op) + ": " + what + " is on " +
                                                     x.device().str() + " but " + like_what +
                                                     " is on " + like.device().str());
}

void check_logits_dtype(const char* op, const char* what, const at::Tensor& x,
                        const at::Tensor& like, const char* like_what) {
  const std::string name = std::string(op) + ": ";
  TORCH_CHECK_TYPE(is_logits_dtype(x.scalar_type()),
                   name + what + " must be float32, float64, float16 or bfloat16, got " +
                       dtype_str(x.scalar_type()));
  TORCH_CHECK_TYPE(x.scalar_type() == like.scalar_type(),
                   name + what + " dtype " + dtype_str(x.scalar_type()) + " must match " +
                       like_what + " dtype " + dtype_str(like.scalar_type()));
  check_same_device(op, what, x, like, like_what);
}

LossConfig check_distill_args(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& target, c10::string_view divergence,
                              double temperature, double alpha, double beta, int64_t ignore_index,
                              c10::string_view reduction,
                              const std::optional<at::Tensor>& row_temperature,
                              const std::optional<at::Tensor>& row_alpha,
                              std::optional<int64_t> soft_index) {
  constexpr const char* op = "distill_loss";
  LossConfig cfg = check_loss_options(op, divergence, temperature, alpha, beta, ignore_index,
                                      reduction, target.has_value());
  check_logits_dtype(op, "student", student, student);
  check_logits_dtype(op, "teacher", teacher, student);
  check_logits_shape(op, student);
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(),
                    "distill_loss: teacher shape " + shape_str(teacher.sizes()) +
                        " must equal student shape " + shape_str(student.sizes()));
  cfg.classes = student.size(-1);
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  cfg.rows = c10::multiply_integers(lead);
  check_row_inputs(op, student, lead, weight, target);
  check_row_options(op, cfg, student, lead, row_temperature, row_alpha, soft_index,
                    target.has_value());
  return cfg;
}

void check_logits_shape(const char* op, const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) >= 1,
                    std::string(op) + ": student must be shaped (*, V) with V >= 1, got " +
                        shape_str(student.sizes()));
}

c10::ScalarType accumulate_type(c10::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {
// A [rows, classes] view with unit column stride (a copy only if the last dim is strided).
at::Tensor as_rows(const at::Tensor& x, int64_t rows, int64_t classes) {
  auto r = x.reshape({rows, classes});
  return (r.stride(1) == 1 || classes == 1) ? r : r.contiguous();
}
}  // namespace

namespace {
// A label that is neither ignore_index nor soft_index and names no class: its row's loss is NaN,
// and the CPU value checks raise on it.
bool bad_label(const LossConfig& cfg, int64_t label) {
  return label != cfg.ignore_index && label != cfg.soft_index &&
         (label < 0 || label >= cfg.classes);
}

// prepare_rows on the CPU: the weights, normaliser and validity in one loop over the rows
// instead of a dozen small ATen ops (each a few microseconds: as much as the kernel itself for a
// few thousand rows of a few classes). The same rules as the ATen form below.
template <typename A>
void cpu_row_weights(const LossConfig& cfg, const A* given, const int64_t* y, A* w, bool* valid,
                     double& weight_sum, int64_t& valid_rows) {
  constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();
  double total = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < cfg.rows; ++i) {
    A wi = given ? given[i] : A(1);
    if (wi < A(0)) wi = kNaN;  // a negative weight makes the row NaN
    if (y) {
      const int64_t label = y[i];
      valid[i] = label != cfg.ignore_index;
      if (!valid[i]) {
        wi = A(0);
      } else {
        ++count;
        if (bad_label(cfg, label)) wi = kNaN;
      }
    }
    w[i] = wi;
    total += static_cast<double>(wi);
  }
  weight_sum = total;
  valid_rows = y ? count : cfg.rows;
}
}  // namespace

RowWeights prepare_rows(const LossConfig& cfg, const at::Tensor& student,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& row_temperature,
                        const std::optional<at::Tensor>& row_alpha) {
  const auto opts = student.options().dtype(accumulate_type(student.scalar_type()));
  auto per_row = [&](const std::optional<at::Tensor>& x) {
    return x.has_value() ? x->detach().reshape({cfg.rows}).to(opts).contiguous() : at::Tensor();
  };
  if (student.is_cpu()) {
    const at::Tensor given = weight.has_value()
                                 ? weight->detach().reshape({cfg.rows}).to(opts).contiguous()
                                 : at::Tensor();
    const at::Tensor y =
        target.has_value() ? target->reshape({cfg.rows}).contiguous() : at::Tensor();
    at::Tensor w = at::empty({cfg.rows}, opts);
    at::Tensor valid = y.defined() ? at::empty({cfg.rows}, opts.dtype(at::kBool)) : at::Tensor();
    double weight_sum = 0;
    int64_t valid_rows = 0;
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pykd_row_weights", [&] {
      cpu_row_weights<scalar_t>(
          cfg, given.defined() ? given.const_data_ptr<scalar_t>() : nullptr,
          y.defined() ? y.const_data_ptr<int64_t>() : nullptr, w.data_ptr<scalar_t>(),
          valid.defined() ? valid.data_ptr<bool>() : nullptr, weight_sum, valid_rows);
    });
    const double norm = cfg.reduction == Reduction::Mean        ? weight_sum
                        : cfg.reduction == Reduction::BatchMean ? static_cast<double>(valid_rows)
                                                                : 1.0;
    return {w, at::scalar_tensor(norm, opts), valid, per_row(row_temperature), per_row(row_alpha)};
  }
  at::Tensor w = weight.has_value() ? weight->detach().reshape({cfg.rows}).to(opts)
                                    : at::ones({cfg.rows}, opts);
  w = at::where(w < 0, at::full({}, NAN, opts), w);
  at::Tensor valid_rows, valid;
  if (target.has_value()) {
    const auto y = target->reshape({cfg.rows});
    valid = y != cfg.ignore_index;
    const auto out_of_range = valid & (y != cfg.soft_index) & ((y < 0) | (y >= cfg.classes));
    w = at::where(out_of_range, at::full({}, NAN, opts), at::where(valid, w, at::zeros({}, opts)));
    valid_rows = valid.sum().to(opts.dtype());
  } else {
    valid_rows = at::full({}, static_cast<double>(cfg.rows), opts);
  }
  at::Tensor norm;
  switch (cfg.reduction) {
    case Reduction::Mean:
      norm = w.sum();
      break;
    case Reduction::BatchMean:
      norm = valid_rows;
      break;
    default:
      norm = at::ones({}, opts);
  }
  return {w.contiguous(), norm, valid, per_row(row_temperature), per_row(row_alpha)};
}

namespace {
template <typename T>
int64_t first_negative(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<double>(x[i]) < 0) return i;
  }
  return -1;
}
}  // namespace

void check_row_values(const char* op, const LossConfig& cfg,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& target,
                      const std::optional<at::Tensor>& row_temperature,
                      const std::optional<at::Tensor>& row_alpha) {
  if (target.has_value()) {
    const auto y = target->reshape({cfg.rows});
    int64_t row = -1;
    if (y.is_cpu()) {  // a plain loop: the ATen form costs five small ops on every call
      const auto yc = y.contiguous();
      const int64_t* p = yc.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < cfg.rows && row < 0; ++i) {
        if (bad_label(cfg, p[i])) row = i;
      }
    } else {
      const auto bad =
          (y != cfg.ignore_index) & (y != cfg.soft_index) & ((y < 0) | (y >= cfg.classes));
      if (bad.any().item<bool>()) row = bad.nonzero()[0][0].item<int64_t>();
    }
    if (row >= 0) {
      TORCH_CHECK(false, std::string(op) + ": target[" + std::to_string(row) +
                             "] = " + std::to_string(y[row].item<int64_t>()) + " is outside [0, " +
                             std::to_string(cfg.classes) + ") and is not ignore_index (" +
                             std::to_string(cfg.ignore_index) + ")");
    }
  }
  if (weight.has_value()) {
    const auto w = weight->detach().reshape({cfg.rows});
    int64_t row = -1;
    if (w.is_cpu()) {
      const auto wc = w.contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, wc.scalar_type(), "pykd_check_w",
          [&] { row = first_negative(wc.const_data_ptr<scalar_t>(), cfg.rows); });
    } else {
      const auto bad = w < 0;
      if (bad.any().item<bool>()) row = bad.nonzero()[0][0].item<int64_t>();
    }
    if (row >= 0) {
      TORCH_CHECK(false, std::string(op) + ": weight[" + std::to_string(row) +
                             "] = " + num_str(w[row].item<double>()) + " is negative");
    }
  }
  if (row_temperature.has_value()) {
    const auto t = row_temperature->detach().reshape({cfg.rows}).to(at::kDouble);
    const auto bad = ~(t.isfinite() & (t > 0));
    if (bad.any().item<bool>()) {
      const int64_t row = bad.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, std::string(op) + ": temperature[" + std::to_string(row) + "] = " +
                                   num_str(t[row].item<double>()) + " must be finite and > 0");
    }
  }
  if (row_alpha.has_value()) {
    const auto a = row_alpha->detach().reshape({cfg.rows}).to(at::kDouble);
    const auto bad = ~((a >= 0) & (a <= 1));
    if (bad.any().item<bool>()) {
      const int64_t row = bad.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, std::string(op) + ": alpha[" + std::to_string(row) +
                                   "] = " + num_str(a[row].item<double>()) + " must be in [0, 1]");
    }
  }
}

void raise_bad_row(const char* op, int64_t row) {
  TORCH_CHECK(row < 0, std::string(op) + ": row " + std::to_string(row) +
                           " has no finite logit (all -inf) where a softmax needs one");
}

std::tuple<at::Tensor, at::Tensor> reduce_rows(const LossConfig& cfg, const at::Tensor& u,
                                               const RowWeights& rw, c10::IntArrayRef lead,
                                               const std::optional<at::Tensor>& weight,
                                               bool weight_grad) {
  // Ignored rows have w = 0 and u = 0 (the kernel never computes them), so they add nothing.
  const bool want_grad_w = weight_grad && weight.has_value();
  if (u.is_cpu() && cfg.reduction != Reduction::None && !want_grad_w) {
    // One loop instead of five small ATen ops (see cpu_row_weights); float64 accumulation.
    double loss = 0;
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "pykd_reduce_rows", [&] {
      const scalar_t* wp = rw.weight.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      double total = 0;
      for (int64_t i = 0; i < cfg.rows; ++i) total += static_cast<double>(wp[i] * up[i]);
      const double norm = static_cast<double>(rw.norm.item<scalar_t>());
      // A batch whose normaliser is 0 (no valid row, or all weights 0) has loss 0, not NaN.
      loss = norm == 0 ? 0.0 : total / norm;
    });
    return {at::scalar_tensor(loss, u.options()), no_grad_output(weight.has_value() ? *weight : u)};
  }
  const auto zero = at::zeros({}, u.options());
  const auto weighted = rw.weight * u;
  at::Tensor loss;
  if (cfg.reduction == Reduction::None) {
    loss = weighted.reshape(lead);
  } else {
    // A batch whose normaliser is 0 (no valid row, or all weights 0) has loss 0, not NaN.
    loss = at::where(rw.norm == 0, zero, weighted.sum() / rw.norm);
  }
  at::Tensor grad_w;
  if (want_grad_w) {
    at::Tensor g;
    switch (cfg.reduction) {
      case Reduction::Mean:
        g = (u - loss) / rw.norm;
        break;
      case Reduction::BatchMean:
        g = u / rw.norm;
        break;
      default:
        g = u;
    }
    if (rw.valid.defined()) g = at::where(rw.valid, g, zero);
    grad_w = at::where(rw.norm == 0, zero, g).reshape(lead).to(weight->scalar_type());
  } else {
    grad_w = no_grad_output(weight.has_value() ? *weight : u);
  }
  return {loss, grad_w};
}

bool debug_checks_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("PYKD_DEBUG");
    return v != nullptr && std::string(v) != "0" && std::string(v) != "";
  }();
  return on;
}

bool value_checks_for(const at::Tensor& t) { return t.is_cpu() || debug_checks_enabled(); }

DeviceKernels& device_kernels(c10::DeviceType type) {
  static DeviceKernels cpu, cuda, none;
  if (type == c10::DeviceType::CPU) return cpu;
  return type == c10::DeviceType::CUDA ? cuda : none;
}

const DeviceKernels& kernels_for(const at::Tensor& t) {
  const DeviceKernels& k = device_kernels(t.device().type());
  // A plain message: streaming values into TORCH_CHECK is unsafe on some toolchains.
  TORCH_CHECK(k.rows != nullptr && k.topk != nullptr,
              "pykd: this build has no kernels for the tensors' device (built without CUDA?)");
  return k;
}

at::Tensor no_grad_output(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A fresh [N, V] gradient on the CPU is mostly page faults on first touch: glibc maps every
// block above 32 MB anew, and at N=2048, V=32000 (256 MB) faulting it in costs about as much as
// the loss. Two remedies (docs/perf-notes.md):
// - huge pages (MADV_HUGEPAGE on the 2 MB-aligned interior) cut the faults 512-fold, but with
//   the kernel's default defrag setting a huge-page fault compacts memory synchronously when no
//   free 2 MB page is at hand, and then a call takes 2-5x longer, at random. As torch does for
//   its own allocations, we ask for them only under THP_MEM_ALLOC_ENABLE=1;
// - otherwise the pages are populated (MADV_POPULATE_WRITE, Linux 5.14+): the same zeroing
//   without one trap per 4 KB page. Rows of 64 KB and more are populated by the row kernel just
//   before it writes each one, so the zeroed lines are still in cache when the row overwrites
//   them; shorter rows up front, split over the intra-op threads in 2 MB pieces.
//   2048 x 32000 fp32: 123-125 ms faulting, 113-119 up front, 98-105 row by row.
// Either is advice: where the kernel refuses it, the pages fault in on first touch as before.
namespace {
constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
constexpr size_t kFreshMapping = size_t(32) << 20;  // glibc's largest mmap threshold

constexpr size_t kRowPopulate = size_t(64) << 10;

// Whether the row kernel is to populate the pages of `t` (only where `rows_wanted`).
bool prepare_pages(const at::Tensor& t, bool rows_wanted) {
#ifdef __linux__
  if (!t.is_cpu() || t.nbytes() < kFreshMapping) return false;
  static const bool huge = c10::utils::check_env("THP_MEM_ALLOC_ENABLE") == true;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  if (huge) {
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = end & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    return false;
  }
#ifdef MADV_POPULATE_WRITE
  if (rows_wanted && t.dim() > 0 && size_t(t.size(-1)) * t.element_size() >= kRowPopulate) {
    return true;
  }
  constexpr uintptr_t kPage = 4096;
  const uintptr_t first = (begin + kPage - 1) & ~(kPage - 1);
  const int64_t pages = int64_t(((end & ~(kPage - 1)) - first) / kPage);
  // 2 MB per task at least: each madvise is one system call.
  at::parallel_for(0, pages, int64_t(kHugePage / kPage), [&](int64_t lo, int64_t hi) {
    madvise(reinterpret_cast<void*>(first + lo * kPage), size_t(hi - lo) * kPage,
            MADV_POPULATE_WRITE);
  });
#endif
#endif
  return false;
}

}  // namespace

at::Tensor new_gradient(const at::Tensor& like, bool* rows_populate) {
  auto g = at::empty(like.sizes(), like.options());
  const bool rows = prepare_pages(g, rows_populate != nullptr);
  if (rows_populate) *rows_populate = rows;
  return g;
}

RowKernelArgs row_kernel_args(const LossConfig& cfg, const at::Tensor& s, const at::Tensor& t,
                              const at::Tensor& y, const RowWeights& rw, const at::Tensor& u,
                              void* grad_s, void* grad_t, const at::Tensor& bad_row, int64_t first,
                              int64_t rows) {
  RowKernelArgs a;
  a.student = s.const_data_ptr();
  a.teacher = t.const_data_ptr();
  a.student_stride = s.stride(0);
  a.teacher_stride = t.stride(0);
  a.rows = rows;
  a.classes = cfg.classes;
  a.dtype = s.scalar_type();
  a.divergence = cfg.divergence;
  a.temperature = cfg.temperature;
  a.alpha = cfg.alpha;
  a.beta = cfg.beta;
  a.ignore_index = cfg.ignore_index;
  a.soft_index = cfg.soft_index;
  a.row_temperature =
      rw.temperature.defined() ? rw.temperature.narrow(0, first, rows).const_data_ptr() : nullptr;
  a.row_alpha = rw.alpha.defined() ? rw.alpha.narrow(0, first, rows).const_data_ptr() : nullptr;
  a.target = y.defined() ? y.const_data_ptr<int64_t>() + first : nullptr;
  a.weight = rw.weight.narrow(0, first, rows).const_data_ptr();
  a.norm = rw.norm.const_data_ptr();
  a.row_loss = u.narrow(0, first, rows).data_ptr();
  a.grad_student = grad_s;
  a.grad_teacher = grad_t;
  a.bad_row = bad_row.data_ptr<int64_t>();
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_fused(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& target, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& row_temperature, const std::optional<at::Tensor>& row_alpha,
    std::optional<int64_t> soft_index, std::array<bool, 3> grad_mask) {
  const at::OptionalDeviceGuard guard(at::device_of(student));
  const RowKernelLauncher launch = kernels_for(student).rows;
  const bool value_checks = value_checks_for(student);
  const LossConfig cfg =
      check_distill_args(student, teacher, weight, target, divergence, temperature, alpha, beta,
                         ignore_index, reduction, row_temperature, row_alpha, soft_index);
  if (value_checks) {
    check_row_values("distill_loss", cfg, weight, target, row_temperature, row_alpha);
  }
  const auto s = as_rows(student, cfg.rows, cfg.classes);
  const auto t = as_rows(teacher, cfg.rows, cfg.classes);
  const auto y = target.has_value() ? target->reshape({cfg.rows}).contiguous() : at::Tensor();
  const RowWeights rw = prepare_rows(cfg, student, weight, target, row_temperature, row_alpha);
  const auto acc = student.options().dtype(accumulate_type(student.scalar_type()));
  auto u = at::empty({cfg.rows}, acc);
  // Both gradients are [rows, classes] of one dtype: the same page plan for each.
  bool populate_s = false, populate_t = false;
  auto grad_s = grad_mask[0] ? new_gradient(student, &populate_s) : no_grad_output(student);
  auto grad_t = grad_mask[1] ? new_gradient(teacher, &populate_t) : no_grad_output(teacher);
  auto bad_row = at::full({1}, -1, student.options().dtype(at::kLong));

  RowKernelArgs a =
      row_kernel_args(cfg, s, t, y, rw, u, grad_mask[0] ? grad_s.data_ptr() : nullptr,
                      grad_mask[1] ? grad_t.data_ptr() : nullptr, bad_row, 0, cfg.rows);
  a.populate_rows = populate_s || populate_t;
  if (cfg.rows > 0) launch(a);
  if (value_checks) raise_bad_row("distill_loss", bad_row.item<int64_t>());
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  auto [loss, grad_w] = reduce_rows(cfg, u, rw, lead, weight, grad_mask[2]);
  return {loss, grad_s, grad_t, grad_w};
}

namespace {

// The public op. It is CompositeImplicitAutograd so that it can see which inputs need a gradient
// and ask the fused kernel for exactly those, computed in the same pass as the loss.
at::Tensor distill_loss(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& target, c10::string_view divergence,
                        double temperature, double alpha, double beta, int64_t ignore_index,
                        c10::string_view reduction,
                        const std::optional<at::Tensor>& row_temperature,
                        const std::optional<at::Tensor>& row_alpha,
                        std::optional<int64_t> soft_index) {
  // Arguments are checked once, by _distill_loss_fused (and before that in Python).
  const bool grad_mode = c10::GradMode::is_enabled();
  const std::array<bool, 3> mask{grad_mode && student.requires_grad(),
                                 grad_mode && teacher.requires_grad(),
                                 grad_mode && weight.has_value() && weight->requires_grad()};
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pykd::_distill_loss_fused", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, c10::string_view, double, double, double, int64_t,
              c10::string_view, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              std::optional<int64_t>, std::array<bool, 3>)>();
  return std::get<0>(op.call(student, teacher, weight, target, divergence, temperature, alpha, beta,
                             ignore_index, reduction, row_temperature, row_alpha, soft_index,
                             mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(pykd, CompositeImplicitAutograd, m) { m.impl("distill_loss", &distill_loss); }

}  // namespace pykd
