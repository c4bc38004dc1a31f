// The instruction set whose CPU row kernels run: chosen once, at run time, among those this build
// compiled (CMakeLists.txt compiles each per-ISA kernel file once per CPU_CAPABILITY, into the
// namespaces pykd::cpu::DEFAULT, AVX2 and AVX512). Every op's CPU launcher picks its kernel here,
// so all of them, and build_info(), agree on one ISA.
#pragma once

namespace pykd::cpu {

enum class Isa { DEFAULT, AVX2, AVX512 };

// The best ISA that both this CPU and this build support; honours ATEN_CPU_CAPABILITY, like ATen.
Isa active_isa();
// Its name, as build_info() reports it.
const char* active_cpu_isa();

// Declares a kernel entry point in every ISA namespace, e.g.
// PYKD_DECLARE_PER_ISA(void distill_loss_rows(const KernelArgs& args);)
#define PYKD_DECLARE_PER_ISA(...) \
  namespace DEFAULT {             \
  __VA_ARGS__                     \
  }                               \
  namespace AVX2 {                \
  __VA_ARGS__                     \
  }                               \
  namespace AVX512 {              \
  __VA_ARGS__                     \
  }

template <typename F>
F pick_for_isa(F default_kernel, F avx2_kernel, F avx512_kernel) {
  switch (active_isa()) {
    case Isa::AVX512:
      return avx512_kernel;
    case Isa::AVX2:
      return avx2_kernel;
    case Isa::DEFAULT:
      break;
  }
  return default_kernel;
}

// The AVX2 and AVX512 kernels exist only in x86-64 builds (PYKD_HAVE_CPU_*, set for the _C target):
// elsewhere they are not named, and active_isa() never returns their ISA.
#ifdef PYKD_HAVE_CPU_AVX2
#define PYKD_CPU_AVX2_KERNEL(fn) &::pykd::cpu::AVX2::fn
#else
#define PYKD_CPU_AVX2_KERNEL(fn) nullptr
#endif
#ifdef PYKD_HAVE_CPU_AVX512
#define PYKD_CPU_AVX512_KERNEL(fn) &::pykd::cpu::AVX512::fn
#else
#define PYKD_CPU_AVX512_KERNEL(fn) nullptr
#endif

// The per-ISA kernel `fn` (declared with PYKD_DECLARE_PER_ISA) for the active ISA.
#define PYKD_CPU_KERNEL(fn)                                       \
  ::pykd::cpu::pick_for_isa<decltype(&::pykd::cpu::DEFAULT::fn)>( \
      &::pykd::cpu::DEFAULT::fn, PYKD_CPU_AVX2_KERNEL(fn), PYKD_CPU_AVX512_KERNEL(fn))

}  // namespace pykd::cpu
