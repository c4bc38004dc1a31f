// Machine probes for the benchmark's floor (`pykd bench`): how fast this CPU runs the work the
// row kernels cannot avoid. Compiled per instruction set like the kernels (cpu/isa.h).
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pykd::cpu {

// Float exps per second on one thread with the row kernels' vectorised exp, over a buffer that
// stays in L1 (no memory traffic): `reps` passes over 1,024 values.
PYKD_DECLARE_PER_ISA(double exp_rate(int64_t reps);)

}  // namespace pykd::cpu
