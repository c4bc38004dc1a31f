// fused_linear_distill_loss on the CPU: ATen's matmuls (MKL) around distill_loss's row kernel, in
// row chunks; the host loop, for every device, is csrc/fused_linear_distill_loss.cpp.
#include "fused_linear_distill_loss.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("_fused_linear_distill_loss", &pykd::fused_linear_distill_loss_fused);
}
