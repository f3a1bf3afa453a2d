// The GEMM door of csrc/cpu/gemm.h.
#include "cpu/gemm.h"

#include <dlfcn.h>

#include "cpu/settings.h"

namespace pyengine {
namespace cpu {
namespace {

// result = beta * result + alpha * (mat1 @ mat2), ATen's oneDNN wrapper (ATen/native/mkldnn).
using OnednnMatmul = void (*)(const at::Tensor& mat1, const at::Tensor& mat2,
                              const at::Tensor& result, float beta, float alpha);
constexpr const char* kOnednnMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";
// A oneDNN call costs about 14 us before any arithmetic (measured on the AMD EPYC: 4x16x128
// took 14 us against ATen's 4 us); it pays from about a million multiply-adds on (16x128x512:
// even; 32x128x512: 1.27x; 8x256x1024: 1.84x). Smaller GEMMs stay on ATen.
constexpr int64_t kOnednnMinWork = int64_t{1} << 20;

OnednnMatmul lookup() {
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
  if (torch_cpu == nullptr) return nullptr;
  return reinterpret_cast<OnednnMatmul>(dlsym(torch_cpu, kOnednnMatmulSymbol));
}

// The wrapper, if it takes float32 here and agrees with ATen on a small case; else nullptr.
OnednnMatmul checked_onednn() {
  OnednnMatmul matmul = lookup();
  if (matmul == nullptr) return nullptr;
  try {
    const auto options = at::TensorOptions().dtype(at::kFloat);
    at::Tensor a = at::arange(24 * 20, options).remainder_(7).sub_(3).view({24, 20});
    at::Tensor b = at::arange(20 * 18, options).remainder_(5).sub_(2).view({20, 18});
    at::Tensor c = at::empty({24, 18}, options);
    matmul(a, b, c, 0.0f, 1.0f);
    if (!at::equal(c, at::mm(a, b))) return nullptr;  // small integers: exact in any order
  } catch (const std::exception&) {
    return nullptr;  // e.g. a torch whose wrapper is for bfloat16 / float16 only
  }
  return matmul;
}

OnednnMatmul onednn() {
  static const OnednnMatmul matmul = checked_onednn();
  return matmul;
}

// A 2-D float32 matrix oneDNN reads in place: row-major or column-major, dense.
bool plain(const at::Tensor& t) {
  if (t.dim() != 2 || t.scalar_type() != at::kFloat || t.is_conj() || t.is_neg()) return false;
  return t.is_contiguous() || (t.stride(0) == 1 && t.stride(1) == t.size(0));
}

bool use_onednn(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!gemm_uses_onednn()) return false;
  if (!plain(a) || !plain(b) || !out.is_contiguous() || out.dim() != 2 ||
      out.scalar_type() != at::kFloat || !a.device().is_cpu())
    return false;
  const int64_t work = a.size(0) * a.size(1) * b.size(1);
  return work >= kOnednnMinWork && onednn() != nullptr;
}

}  // namespace

bool onednn_gemm_available() { return onednn() != nullptr; }

void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (use_onednn(out, a, b)) {
    onednn()(a, b, out, 0.0f, 1.0f);
  } else {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  }
}

void gemm_bias_into(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
               const at::Tensor& b) {
  if (use_onednn(out, a, b)) {
    out.copy_(bias.expand_as(out));
    onednn()(a, b, out, 1.0f, 1.0f);
  } else {
    at::addmm_out(const_cast<at::Tensor&>(out), bias, a, b);
  }
}

void gemm_accumulate(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (use_onednn(c, a, b)) {
    onednn()(a, b, c, 1.0f, 1.0f);
  } else {
    const_cast<at::Tensor&>(c).addmm_(a, b);
  }
}

at::Tensor gemm_new(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b);
  return out;
}

}  // namespace cpu
}  // namespace pyengine
