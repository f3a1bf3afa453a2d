// The recent-blocks allocator of recent_blocks.h.
#include "cpu/recent_blocks.h"

#include "cpu/settings.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace pyengine {
namespace cpu {
namespace {

constexpr size_t kAlignment = 64;
// Each block starts with a header holding its size class; the data follows, still 64-aligned.
constexpr size_t kHeader = kAlignment;

// Sizes are rounded up to 64 bytes, and above 64 KiB to 4 KiB, so that tensors of nearly the
// same size (the last batch of an epoch, packed sequences) share blocks.
size_t size_class(size_t bytes) {
  const size_t granule = bytes > (size_t(64) << 10) ? size_t(4096) : kAlignment;
  return std::max(kAlignment, (bytes + granule - 1) / granule * granule);
}

class RecentBlockAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const size_t size = size_class(bytes);
    void* block = take(size);
    if (block == nullptr) {
      block = std::aligned_alloc(kAlignment, size + kHeader);
      TORCH_CHECK(block != nullptr, "pyengine: out of memory allocating ", bytes, " bytes");
      *static_cast<size_t*>(block) = size;
    }
    void* data = static_cast<char*>(block) + kHeader;
    return {data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Pool {
    std::mutex mutex;
    std::unordered_map<size_t, std::vector<void*>> free_blocks;  // size class -> blocks, LIFO
    size_t held = 0;
  };

  static Pool& pool() {
    static Pool* p = [] {
      // A fork while another thread holds the lock (a tensor being freed) would leave the
      // child's copy locked for good: hold it across fork, and give the child a fresh one.
      pthread_atfork([] { pool().mutex.lock(); }, [] { pool().mutex.unlock(); },
                     [] { new (&pool().mutex) std::mutex(); });
      return new Pool();  // never destroyed: tensors may be freed at exit
    }();
    return *p;
  }

  static void* take(size_t size) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_blocks.find(size);
    if (it == p.free_blocks.end() || it->second.empty()) return nullptr;
    void* block = it->second.back();
    it->second.pop_back();
    p.held -= size;
    return block;
  }

  static void release(void* block) {
    const size_t size = *static_cast<size_t*>(block);
    Pool& p = pool();
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      if (p.held + size <= kRecentBlocksMaxBytes) {
        p.free_blocks[size].push_back(block);
        p.held += size;
        return;
      }
    }
    std::free(block);
  }
};

// glibc serves requests above its mmap threshold (128 KiB at start) with fresh mappings, and
// raises the threshold to the size of any such block the program frees. A program whose large
// tensors all live in this allocator never frees one, so the threshold stays low and every
// other temporary above it (an optimizer's, 1 MB each at the demo size) is mapped and faulted in
// afresh each time: 256 page faults an Adam step. One large block freed at start gives glibc
// the threshold it would otherwise have reached. (Thresholds set by the user through mallopt or
// MALLOC_MMAP_THRESHOLD_ are fixed, and this changes nothing then.)
void raise_malloc_mmap_threshold() {
  constexpr size_t kLargeBlock = size_t(8) << 20;
  void* block = std::malloc(kLargeBlock);
  if (block != nullptr) {
    static_cast<volatile char*>(block)[0] = 0;  // a real allocation, not optimised away
    std::free(block);
  }
}

RecentBlockAllocator& allocator() {
  static RecentBlockAllocator* a = [] {
    raise_malloc_mmap_threshold();
    return new RecentBlockAllocator();
  }();
  return *a;
}

}  // namespace

at::Tensor recent_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  if (!recent_blocks()) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

}  // namespace cpu
}  // namespace pyengine
