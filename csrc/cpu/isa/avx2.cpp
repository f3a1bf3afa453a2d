// The CPU kernel bodies compiled for AVX2 + FMA + F16C: built by setup.py (x86-64 only) with
// ISA_FLAGS["avx2"], and chosen at run time by csrc/cpu/settings.cpp.
#define PYENGINE_ISA isa_avx2
#define PYENGINE_ISA_LEVEL 1
#include "cpu/isa/table.h"
