// Tensors whose memory comes back hot: a CPU allocator that keeps freed blocks by size and hands
// out the most recently freed one first.
//
// A training step allocates the same tensors every step (saved activations, weight and input
// gradients). From malloc they land in whatever chunk is free, often one not touched for
// megabytes of traffic, and a GEMM writing its output there stalls on every cache line it has to
// fetch first: on the 2-core reference machine a [512,256] weight-gradient GEMM took 2x its
// isolated time inside the step for that reason alone. The block freed last is the one most
// likely still in cache. bench/bench_recent_blocks.py measures what it buys with the kernels as
// they are now: page faults (45 against about 1,800 a demo-size LM step) but no step time
// beyond the noise (0.95-1.04x).
//
// The tensors are ordinary CPU tensors: resizable (through this allocator), serialisable,
// freeable from any thread. At most kRecentBlocksMaxBytes of free blocks are kept.
// pyengine.backends.cpu.recent_blocks = False (initially PYENGINE_RECENT_BLOCKS=0) hands out
// ATen's own CPU tensors instead: for memory checkers, which see reused blocks as one
// allocation, and for bench_recent_blocks.py.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace pyengine {
namespace cpu {

constexpr size_t kRecentBlocksMaxBytes = size_t(64) << 20;

// An uninitialised contiguous CPU tensor of `sizes` and `dtype` from the recent-blocks allocator.
at::Tensor recent_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// recent_empty filled with zeros.
inline at::Tensor recent_zeros(at::IntArrayRef sizes, at::ScalarType dtype) {
  return recent_empty(sizes, dtype).zero_();
}

}  // namespace cpu
}  // namespace pyengine
