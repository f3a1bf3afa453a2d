// The kernel table of one instruction set: included once by each csrc/cpu/isa/<set>.cpp after it
// has set the compiler's target, PYENGINE_ISA (the namespace) and PYENGINE_ISA_LEVEL (0 baseline,
// 1 AVX2 + FMA + F16C, 2 AVX-512 F/BW/VL/DQ/VNNI).
#pragma once

#include "cpu/kernels.h"
#include "cpu/kernels/clip.h"
#include "cpu/kernels/cross_entropy.h"
#include "cpu/kernels/int8.h"
#include "cpu/kernels/lstm.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {

const CpuKernels& table() {
  static const CpuKernels kernels{static_cast<Isa>(PYENGINE_ISA_LEVEL), lstm_kernels(),
                                  cross_entropy_kernels(), clip_kernels(), int8_kernels()};
  return kernels;
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
