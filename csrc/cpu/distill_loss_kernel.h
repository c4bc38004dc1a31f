// Interface between the CPU host code of distill_loss and its row kernel, which is compiled once
// per instruction set (see CMakeLists.txt) and chosen at run time.
#pragma once

#include "distill_loss_common.h"
#include "distill_loss_topk.h"

namespace pykd::cpu {

using KernelArgs = RowKernelArgs;

#define PYKD_DECLARE_ISA(isa)                              \
  namespace isa {                                          \
  void distill_loss_rows(const KernelArgs& args);          \
  void distill_loss_topk_rows(const TopkKernelArgs& args); \
  }
PYKD_DECLARE_ISA(DEFAULT)
PYKD_DECLARE_ISA(AVX2)
PYKD_DECLARE_ISA(AVX512)
#undef PYKD_DECLARE_ISA

}  // namespace pykd::cpu

namespace pykd::cpu {
// The instruction set whose kernel runs on this CPU (honours ATEN_CPU_CAPABILITY, like ATen).
const char* active_cpu_isa();
}  // namespace pykd::cpu
