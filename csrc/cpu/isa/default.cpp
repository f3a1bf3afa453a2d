// The CPU kernel bodies compiled for the target's baseline: any x86-64, or any other machine.
// Built by setup.py with the flags of its ISA_FLAGS["default"] (none).
#define PYENGINE_ISA isa_default
#define PYENGINE_ISA_LEVEL 0
#include "cpu/isa/table.h"
