// The exp-throughput probe of cpu/probe_kernel.h, compiled once per instruction set.
#include "cpu/probe_kernel.h"

#include <chrono>

#include "cpu/row_kernel.h"

namespace pykd::cpu::CPU_CAPABILITY {

double exp_rate(int64_t reps) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kValues = 1024;
  alignas(64) float x[kValues];
  // Arguments like a softmax's (logit - max) / T: in [-20, 0].
  for (int64_t i = 0; i < kValues; ++i) x[i] = -20.0f * static_cast<float>(i) / kValues;
  // Four independent sums, so the probe measures the exps' throughput, not one add chain.
  Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    for (int64_t j = 0; j + 4 * W <= kValues; j += 4 * W) {
      a0 = a0 + VMath<Vec>::exp(Vec::loadu(x + j));
      a1 = a1 + VMath<Vec>::exp(Vec::loadu(x + j + W));
      a2 = a2 + VMath<Vec>::exp(Vec::loadu(x + j + 2 * W));
      a3 = a3 + VMath<Vec>::exp(Vec::loadu(x + j + 3 * W));
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  // The sums are used (and so the exps cannot be dropped): a NaN would mean a broken exp.
  volatile float sink = lane_sum((a0 + a1) + (a2 + a3));
  if (sink != sink || seconds <= 0) return 0.0;
  return static_cast<double>(kValues) * static_cast<double>(reps) / seconds;
}

}  // namespace pykd::cpu::CPU_CAPABILITY
