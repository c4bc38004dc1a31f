// Interface between the CPU host code of distill_loss and its row kernel, which is compiled once
// per instruction set (see CMakeLists.txt) and chosen at run time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "pykd/distill_math.h"

namespace pykd::cpu {

// Raw views of one call. Pointers typed void are in the logits dtype (`dtype`) or in the
// accumulation type (double for float64 logits, float otherwise), as noted.
struct KernelArgs {
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
  int64_t* bad_row;       // out: a row with no finite logit where a softmax needs one, else -1
};

#define PYKD_DECLARE_ISA(isa) \
  namespace isa {             \
  void distill_loss_rows(const KernelArgs& args); \
  }
PYKD_DECLARE_ISA(DEFAULT)
PYKD_DECLARE_ISA(AVX2)
PYKD_DECLARE_ISA(AVX512)
#undef PYKD_DECLARE_ISA

}  // namespace pykd::cpu

namespace pykd::cpu {
// The row kernel for this CPU (honours ATEN_CPU_CAPABILITY, like ATen) and the name of its set.
using RowsKernel = void (*)(const KernelArgs&);
RowsKernel select_rows_kernel();
const char* active_cpu_isa();
}  // namespace pykd::cpu
