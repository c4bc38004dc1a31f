// Every pykd op schema, one line each, and the pybind11 module (build information and a machine
// probe for the benchmark only: tensors never cross pybind11, they go through torch.library so
// autograd and torch.compile see the ops).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/probe_kernel.h"

#ifdef PYKD_WITH_CUDA
#include "cuda/distill_loss.h"
#endif

TORCH_LIBRARY(pykd, m) {
  // Every loss op takes its temperature and alpha as scalars or per row (row_temperature,
  // row_alpha: the leading shape), and soft_index, the label of rows that have none (their loss
  // is the soft term alone).
  // The fused distillation loss of docs/loss.md; asks _distill_loss_fused for the grads
  // autograd will need, so they are made in the same pass as the loss.
  m.def(
      "distill_loss(Tensor student, Tensor teacher, Tensor? weight=None, Tensor? target=None, *, "
      "str divergence=\"kl\", float temperature=1.0, float alpha=1.0, float beta=0.5, "
      "int ignore_index=-100, str reduction=\"mean\", Tensor? row_temperature=None, "
      "Tensor? row_alpha=None, int? soft_index=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Loss and the gradients grad_mask asks for (student, teacher, weight), for d loss = 1.
  m.def(
      "_distill_loss_fused(Tensor student, Tensor teacher, Tensor? weight, Tensor? target, "
      "str divergence, float temperature, float alpha, float beta, int ignore_index, "
      "str reduction, Tensor? row_temperature, Tensor? row_alpha, int? soft_index, "
      "bool[3] grad_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Student and teacher linear heads + distill_loss in row chunks: no [N, V] tensor is made.
  // The teacher is frozen (no gradient); reduction 'none' is not supported.
  m.def(
      "fused_linear_distill_loss(Tensor student_hidden, Tensor student_weight, "
      "Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, "
      "Tensor? weight=None, Tensor? target=None, *, str divergence=\"kl\", "
      "float temperature=1.0, float alpha=1.0, float beta=0.5, int ignore_index=-100, "
      "str reduction=\"mean\", int chunk_size=1024, Tensor? row_temperature=None, "
      "Tensor? row_alpha=None, int? soft_index=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its loss and the gradients grad_mask asks for (student_hidden, student_weight, student_bias,
  // weight), for d loss = 1.
  m.def(
      "_fused_linear_distill_loss(Tensor student_hidden, Tensor student_weight, "
      "Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, "
      "Tensor? weight, Tensor? target, str divergence, float temperature, float alpha, "
      "float beta, int ignore_index, str reduction, int chunk_size, Tensor? row_temperature, "
      "Tensor? row_alpha, int? soft_index, bool[4] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Student logits against a teacher's top-k (index, logit) pairs: the teacher's softmax over its
  // k entries at T, zero mass elsewhere or, given teacher_log_rest (kl only), the teacher's rest
  // mass in one bucket off the top-k; kl or jsd; the teacher gets no gradient.
  m.def(
      "distill_loss_topk(Tensor student, Tensor teacher_indices, Tensor teacher_logits, "
      "Tensor? weight=None, Tensor? target=None, *, str divergence=\"kl\", "
      "float temperature=1.0, float alpha=1.0, float beta=0.5, int ignore_index=-100, "
      "str reduction=\"mean\", Tensor? row_temperature=None, Tensor? row_alpha=None, "
      "int? soft_index=None, Tensor? teacher_log_rest=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its loss and the gradients grad_mask asks for (student, weight), for d loss = 1.
  m.def(
      "_distill_loss_topk_fused(Tensor student, Tensor teacher_indices, Tensor teacher_logits, "
      "Tensor? weight, Tensor? target, str divergence, float temperature, float alpha, "
      "float beta, int ignore_index, str reduction, Tensor? row_temperature, Tensor? row_alpha, "
      "int? soft_index, Tensor? teacher_log_rest, bool[2] grad_mask) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // grad *= scale in place (scale [] or grad's leading shape); no memory is touched if scale == 1.
  m.def("_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()", {at::Tag::pt2_compliant_tag});
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykd compiled ops; importing this module registers torch.ops.pykd.*";
  m.def(
      "build_info",
      [] {
        pybind11::dict d;
        d["version"] = PYKD_VERSION;
        d["torch_version"] = PYKD_TORCH_VERSION;
        d["cpu_isas"] = PYKD_CPU_ISAS;
        d["cpu_kernel"] = pykd::cpu::active_cpu_isa();
#ifdef PYKD_WITH_OPENMP
        d["cpu_threads"] = "openmp";  // at::parallel_for splits rows over torch's threads
#else
        d["cpu_threads"] = "single";
#endif
#ifdef PYKD_WITH_CUDA
        d["cuda"] = true;
#else
        d["cuda"] = false;
#endif
        d["cuda_archs"] = PYKD_CUDA_ARCHS;
        return d;
      },
      "Versions and kernels this extension was built with.");
  m.def(
      "cpu_exp_rate",
      [](int64_t reps) {
        pybind11::gil_scoped_release release;
        return PYKD_CPU_KERNEL(exp_rate)(reps);
      },
      pybind11::arg("reps") = 20000,
      "Float exps per second on one thread with the CPU kernels' vectorised exp (the active "
      "ISA's), from L1: the compute side of pykd bench's floor.");
#ifdef PYKD_WITH_CUDA
  m.def("cuda_launch_plan", &pykd::cuda::launch_plan, pybind11::arg("classes"),
        pybind11::arg("dtype"), pybind11::arg("device") = 0, pybind11::arg("aligned") = true,
        "How distill_loss launches rows of `classes` columns of `dtype` ('bfloat16', ...) on "
        "`device`: 'single' or 'cluster<N>', 'cached' or 'uncached', 'packed' or 'scalar' loads. "
        "Honours PYKD_CUDA_PLAN=single.");
#endif
}
