// The CPU kernel bodies compiled for AVX-512 F/BW/VL/DQ with VNNI, on top of AVX2 + FMA + F16C:
// built by setup.py (x86-64 only) with ISA_FLAGS["avx512"], and chosen at run time by
// csrc/cpu/settings.cpp.
#define PYENGINE_ISA isa_avx512
#define PYENGINE_ISA_LEVEL 2
#include "cpu/isa/table.h"
