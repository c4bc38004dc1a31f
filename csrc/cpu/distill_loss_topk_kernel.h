// Interface between the CPU host code of distill_loss_topk and its row kernel, which is compiled
// once per instruction set (see CMakeLists.txt) and chosen at run time (cpu/isa.h).
#pragma once

#include "cpu/isa.h"
#include "distill_loss_topk.h"

namespace pykd::cpu {

PYKD_DECLARE_PER_ISA(void distill_loss_topk_rows(const TopkKernelArgs& args);)

}  // namespace pykd::cpu
