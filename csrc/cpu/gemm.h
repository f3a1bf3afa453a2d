// The float GEMMs of the CPU kernels, through one door, so that every kernel gets the fastest
// library the process carries. torch's x86 wheels carry two: MKL, behind ATen's mm/addmm, and
// oneDNN's matmul. On AMD processors MKL takes slower code paths: measured on a 2-core AMD EPYC
// (AVX-512), oneDNN ran every float32 GEMM of the LSTM and loss kernels 2.0-2.4x faster than
// ATen/MKL, from the per-step 16x256 @ 256x1024 to 2048x256 @ 256x1024 (torch's own LSTM runs on
// oneDNN there). Which library runs is pyengine.backends.cpu.gemm (csrc/cpu/settings.h): "auto"
// takes oneDNN on non-Intel x86 processors and ATen on Intel ones (where both are Intel's own).
//
// oneDNN is reached through ATen's own wrapper, at::native::mkldnn_matmul, looked up in
// libtorch_cpu when first needed (no header ships it, and a torch without it must still load
// pyengine); a torch whose wrapper refuses float32, or none at all, leaves every GEMM on ATen.
// Calls oneDNN does not take plainly (another dtype, strided views, tiny sizes) go to ATen.
#pragma once

#include <ATen/ATen.h>

namespace pyengine {
namespace cpu {

// out = a @ b
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
// out = bias + a @ b, bias [n] broadcast over the rows
void gemm_bias_into(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
               const at::Tensor& b);
// c += a @ b
void gemm_accumulate(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b);
// a @ b, a new tensor
at::Tensor gemm_new(const at::Tensor& a, const at::Tensor& b);

// Whether oneDNN float32 GEMMs work in this process (looked up and checked once).
bool onednn_gemm_available();

}  // namespace cpu
}  // namespace pyengine
