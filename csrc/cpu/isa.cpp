// The run-time choice of CPU instruction set (cpu/isa.h).
#include "cpu/isa.h"

#include <ATen/Version.h>

#include <string>

namespace pykd::cpu {

Isa active_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
#ifdef PYKD_HAVE_CPU_AVX512
    if (cap == "AVX512") return Isa::AVX512;
#endif
#ifdef PYKD_HAVE_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") return Isa::AVX2;
#endif
    return Isa::DEFAULT;
  }();
  return isa;
}

const char* active_cpu_isa() {
  switch (active_isa()) {
    case Isa::AVX512:
      return "AVX512";
    case Isa::AVX2:
      return "AVX2";
    case Isa::DEFAULT:
      break;
  }
  return "DEFAULT";
}

}  // namespace pykd::cpu
