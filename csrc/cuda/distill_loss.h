// What csrc/cuda/distill_loss.cu offers the rest of the extension: its row launcher, which
// fused_linear_distill_loss.cu passes to its chunk loop, and its launch plan
// (pykd._C.cuda_launch_plan, for tests and debugging). Plain C++: registration.cpp includes it too.
#pragma once

#include <cstdint>
#include <string>

#include "distill_loss_common.h"

namespace pykd::cuda {

// Runs distill_loss's row kernel on the current device and stream; never syncs with the host.
void launch_distill_loss_rows(const RowKernelArgs& a);

// The launch plan for rows of `classes` columns (see its definition).
std::string launch_plan(int64_t classes, const std::string& dtype, int64_t device, bool aligned);

}  // namespace pykd::cuda
