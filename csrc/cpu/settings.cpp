// The settings of csrc/cpu/settings.h. The instruction set: the best this build carries that the
// running CPU supports (cpuid and the OS's saved register state, through GCC's
// __builtin_cpu_supports), capped by PYENGINE_CPU_CAPABILITY.
#include "cpu/settings.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pyengine {
namespace cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

const CpuKernels* table_of(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx512) return &isa_avx512::table();
  if (isa == Isa::kAvx2) return &isa_avx2::table();
#endif
  return &isa_default::table();
}

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : nullptr;
}

Isa initial_isa() {
  Isa isa = best_isa(), asked;
  const char* setting = env("PYENGINE_CPU_CAPABILITY");
  if (setting != nullptr && parse_isa(setting, &asked) && asked < isa) isa = asked;
  return isa;
}

std::atomic<const CpuKernels*>& active_table() {
  static std::atomic<const CpuKernels*> table{table_of(initial_isa())};
  return table;
}

std::atomic<int>& lstm_path_setting() {
  static std::atomic<int> path{[] {
    LstmPath p = LstmPath::kAuto;
    const char* setting = env("PYENGINE_LSTM_PATH");
    if (setting != nullptr) parse_lstm_path(setting, &p);
    return static_cast<int>(p);
  }()};
  return path;
}

std::atomic<bool>& recent_blocks_setting() {
  static std::atomic<bool> enabled{[] {
    const char* setting = env("PYENGINE_RECENT_BLOCKS");
    return setting == nullptr || setting[0] != '0';
  }()};
  return enabled;
}

std::atomic<int>& gemm_library_setting() {
  static std::atomic<int> library{[] {
    GemmLibrary l = GemmLibrary::kAuto;
    const char* setting = env("PYENGINE_CPU_GEMM");
    if (setting != nullptr) parse_gemm_library(setting, &l);
    return static_cast<int>(l);
  }()};
  return library;
}

bool x86_processor() {
#if defined(__x86_64__) || defined(_M_X64)
  return true;
#else
  return false;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

bool parse_isa(const char* name, Isa* isa) {
  for (Isa candidate : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(name, isa_name(candidate)) == 0) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

const CpuKernels& kernels() { return *active_table().load(std::memory_order_relaxed); }

Isa active_isa() { return kernels().isa; }

void set_isa(Isa isa) {
  TORCH_CHECK(isa <= best_isa(), "pyengine: this CPU does not support the ", isa_name(isa),
              " kernels (best supported: ", isa_name(best_isa()), ")");
  active_table().store(table_of(isa), std::memory_order_relaxed);
}

const char* lstm_path_name(LstmPath path) {
  switch (path) {
    case LstmPath::kFused: return "fused";
    case LstmPath::kGemm: return "gemm";
    default: return "auto";
  }
}

bool parse_lstm_path(const char* name, LstmPath* path) {
  for (LstmPath candidate : {LstmPath::kAuto, LstmPath::kFused, LstmPath::kGemm}) {
    if (std::strcmp(name, lstm_path_name(candidate)) == 0) {
      *path = candidate;
      return true;
    }
  }
  return false;
}

LstmPath lstm_path() { return static_cast<LstmPath>(lstm_path_setting().load()); }

void set_lstm_path(LstmPath path) { lstm_path_setting().store(static_cast<int>(path)); }

bool recent_blocks() { return recent_blocks_setting().load(std::memory_order_relaxed); }

void set_recent_blocks(bool enabled) { recent_blocks_setting().store(enabled); }

const char* gemm_library_name(GemmLibrary library) {
  switch (library) {
    case GemmLibrary::kAten: return "aten";
    case GemmLibrary::kOnednn: return "onednn";
    default: return "auto";
  }
}

bool parse_gemm_library(const char* name, GemmLibrary* library) {
  for (GemmLibrary candidate : {GemmLibrary::kAuto, GemmLibrary::kAten, GemmLibrary::kOnednn}) {
    if (std::strcmp(name, gemm_library_name(candidate)) == 0) {
      *library = candidate;
      return true;
    }
  }
  return false;
}

GemmLibrary gemm_library() {
  return static_cast<GemmLibrary>(gemm_library_setting().load(std::memory_order_relaxed));
}

void set_gemm_library(GemmLibrary library) {
  gemm_library_setting().store(static_cast<int>(library));
}

bool intel_processor() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

bool gemm_uses_onednn() {
  switch (gemm_library()) {
    case GemmLibrary::kOnednn: return true;
    case GemmLibrary::kAten: return false;
    default: {
      static const bool other_x86_vendor = x86_processor() && !intel_processor();
      return other_x86_vendor;
    }
  }
}

}  // namespace cpu
}  // namespace pyengine
