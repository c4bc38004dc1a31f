// fused_linear_distill_loss on CUDA: cuBLAS matmuls (through ATen) around distill_loss's row
// kernel (cuda/distill_loss.cu), in row chunks; the host loop, for every device, is
// csrc/fused_linear_distill_loss.cpp.
#include <torch/library.h>

#include "fused_linear_distill_loss.h"

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("_fused_linear_distill_loss", &pykd::fused_linear_distill_loss_fused);
}
