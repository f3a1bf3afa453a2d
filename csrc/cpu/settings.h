// Run-time settings of the CPU kernels: read once from the environment when the library loads,
// changed afterwards through pyengine.backends (never read per call).
//   PYENGINE_CPU_CAPABILITY=default|avx2|avx512   cap on the instruction set of the kernels
//   PYENGINE_LSTM_PATH=auto|fused|gemm            the float LSTM's recurrence path
//   PYENGINE_RECENT_BLOCKS=0|1                    the kernels' output allocator (recent_blocks.h)
#pragma once

#include "cpu/kernels.h"

namespace pyengine {
namespace cpu {

// What the running CPU supports: the best kernel table this build can run here.
Isa best_isa();
// The instruction set whose kernels run; set_isa refuses one above best_isa().
Isa active_isa();
void set_isa(Isa isa);
const char* isa_name(Isa isa);
// The instruction set named `name` ("default", "avx2", "avx512"); false for another name.
bool parse_isa(const char* name, Isa* isa);

// auto: the fused small-batch path where it measured faster, else per-step ATen GEMMs.
enum class LstmPath : int { kAuto = 0, kFused = 1, kGemm = 2 };
LstmPath lstm_path();
void set_lstm_path(LstmPath path);
const char* lstm_path_name(LstmPath path);
bool parse_lstm_path(const char* name, LstmPath* path);

// Whether the kernels take their outputs from the recent-blocks allocator (else from ATen's).
bool recent_blocks();
void set_recent_blocks(bool enabled);

}  // namespace cpu
}  // namespace pyengine
