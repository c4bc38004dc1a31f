// Interface between the CPU host code of distill_loss and its row kernel, which is compiled once
// per instruction set (see CMakeLists.txt) and chosen at run time (cpu/isa.h).
#pragma once

#include "cpu/isa.h"
#include "distill_loss_common.h"

namespace pykd::cpu {

using KernelArgs = RowKernelArgs;

PYKD_DECLARE_PER_ISA(void distill_loss_rows(const KernelArgs& args);)

// cpu/distill_loss.cpp: the row kernel of the active ISA. fused_linear_distill_loss passes it to
// its chunk loop too.
void launch_distill_loss_rows(const KernelArgs& args);

}  // namespace pykd::cpu
