// Run-time settings of the CPU kernels: read once from the environment when the library loads,
// changed afterwards through pyengine.backends (never read per call).
//   PYENGINE_CPU_CAPABILITY=default|avx2|avx512   cap on the instruction set of the kernels
//   PYENGINE_LSTM_PATH=auto|fused|gemm            the float LSTM's recurrence path
//   PYENGINE_RECENT_BLOCKS=0|1                    the kernels' output allocator (recent_blocks.h)
//   PYENGINE_CPU_GEMM=auto|aten|onednn            the library of the float GEMMs (gemm.h)
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

// The library of the kernels' float GEMMs (csrc/cpu/gemm.h): auto = oneDNN on non-Intel x86
// processors, ATen (MKL) elsewhere.
enum class GemmLibrary : int { kAuto = 0, kAten = 1, kOnednn = 2 };
GemmLibrary gemm_library();
void set_gemm_library(GemmLibrary library);
const char* gemm_library_name(GemmLibrary library);
bool parse_gemm_library(const char* name, GemmLibrary* library);
// Whether the setting sends GEMMs to oneDNN (auto resolved by the processor's vendor).
bool gemm_uses_onednn();

// Whether this is an Intel processor: where MKL is fast and the kernels' size thresholds were
// first tuned (others, e.g. AMD, have their own where measured).
bool intel_processor();

}  // namespace cpu
}  // namespace pyengine
