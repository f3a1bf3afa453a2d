// Gradient clipping on the CPU: multi-tensor passes over a whole list of gradients.
//
// Every pass splits ALL tensors into work items of at most kChunk elements (a tensor of n elements
// gives ceil(n / kChunk) items, in order) and runs ONE at::parallel_for over the threads; each
// thread takes a contiguous run of items holding about the same number of elements. Item
// boundaries do not depend on the thread count and every item is reduced by one thread in a fixed
// order, then the item partials of each tensor are combined serially in item order: the norms are
// the same bits for any thread count.
//
//   grad_norms(tensors, p)     per-tensor norms (float64 if any tensor is float64, else float32),
//                              accumulated in float64 (float32 p=1/p=2 sums: blocks of 1024 in
//                              float32 lanes, added into float64): sum x^2 (p=2), sum |x| (p=1),
//                              max |x| (inf), min |x| (-inf), count of x != 0 (p=0), sum |x|^p.
//   scale_grads_(tensors, c)   x *= c, computed as torch's mul_ does (float math for float32,
//                              bfloat16 and float16, double for float64).
//   clamp_grads_(tensors, v)   x = clamp(x, -v, v), NaN kept (torch's clamp_min_ + clamp_max_).
//
// Tensors whose elements are non-overlapping and dense (contiguous, or any permutation of it)
// are read and written in place as flat memory. Others (strided slices) go through a contiguous
// copy (copied back by the mutating passes; an expanded tensor then fails in copy_ as it does in
// torch's own in-place ops).
// dtypes: float32, float64, bfloat16, float16. float32 and float64 have AVX-512 paths (float32
// sums also an AVX2 path); the rest run scalar loops with eight independent accumulators (the
// elementwise passes are auto-vectorised).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kChunk = int64_t(1) << 16;    // elements per work item
constexpr int64_t kSerialBelow = int64_t(1) << 18;  // fewer elements in all: one thread
// (a parallel region costs microseconds when idle, a scheduler slice on a loaded machine)

NormKind kind_of(double p) {
  if (p == 2.0) return NormKind::kTwo;
  if (p == 1.0) return NormKind::kOne;
  if (std::isinf(p)) return p > 0 ? NormKind::kInf : NormKind::kNegInf;
  if (p == 0.0) return NormKind::kZero;
  return NormKind::kPow;
}

struct Item {
  int64_t tensor;  // index into the list of flat views
  int64_t begin;   // element range [begin, end) of that tensor
  int64_t end;
};

// The flat memory of one tensor and its element type.
struct Flat {
  void* data;
  int64_t numel;
  FloatType type;
  int64_t element_size;

  void* at(int64_t index) const { return static_cast<char*>(data) + index * element_size; }
};

void check_dtype(const Tensor& t, int64_t i, const char* op) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, op,
              ": tensors[", i, "] has dtype ", d,
              "; supported: float32, float64, bfloat16, float16");
}

// Work items of all flats, in order.
std::vector<Item> make_items(const std::vector<Flat>& flats) {
  std::vector<Item> items;
  for (int64_t i = 0; i < (int64_t)flats.size(); ++i) {
    for (int64_t b = 0; b < flats[i].numel; b += kChunk) {
      items.push_back({i, b, std::min(flats[i].numel, b + kChunk)});
    }
  }
  return items;
}

// Runs fn(item_index) for every item, threads taking contiguous runs of about equal elements.
template <typename F>
void for_each_item(const std::vector<Item>& items, const F& fn) {
  const int64_t n = (int64_t)items.size();
  if (n == 0) return;
  std::vector<int64_t> start(n + 1, 0);  // element prefix sums
  for (int64_t i = 0; i < n; ++i) start[i + 1] = start[i] + (items[i].end - items[i].begin);
  const int64_t total = start[n];
  int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (total < kSerialBelow || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  // bounds[k]: first item of thread k (the first item starting at or after k*total/threads).
  std::vector<int64_t> bounds(threads + 1, n);
  for (int64_t k = 0; k < threads; ++k) {
    const int64_t target = total * k / threads;
    bounds[k] = std::lower_bound(start.begin(), start.begin() + n, target) - start.begin();
  }
  bounds[threads] = n;
  at::parallel_for(0, threads, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      for (int64_t i = bounds[k]; i < bounds[k + 1]; ++i) fn(i);
    }
  });
}

inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(a, b);
}
inline double nan_min(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::min(a, b);
}

// Combine item partials of one tensor; then the norm from the combined value.
double combine(double a, double b, NormKind kind) {
  if (kind == NormKind::kInf) return nan_max(a, b);
  if (kind == NormKind::kNegInf) return nan_min(a, b);
  return a + b;
}

double finish(double s, NormKind kind, double p) {
  switch (kind) {
    case NormKind::kTwo: return std::sqrt(s);
    case NormKind::kPow: return std::pow(s, 1.0 / p);
    default: return s;
  }
}

FloatType float_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kDouble: return FloatType::kFloat64;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: TORCH_CHECK(false, "pyengine clip: unsupported dtype ", dtype);
  }
}

void check_list(at::TensorList tensors, const char* op) {
  for (int64_t i = 0; i < (int64_t)tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), op, ": tensors[", i, "] is on ",
                tensors[i].device(), "; the CPU kernel takes CPU tensors");
    check_dtype(tensors[i], i, op);
  }
}

// ---- ops --------------------------------------------------------------------------------------

Tensor grad_norms(at::TensorList tensors, double norm_type) {
  check_list(tensors, "grad_norms");
  const NormKind kind = kind_of(norm_type);
  const ClipKernels& clip = kernels().clip;
  const int64_t count = (int64_t)tensors.size();
  bool any_double = false;
  for (const auto& t : tensors) any_double = any_double || t.scalar_type() == at::kDouble;
  std::vector<Tensor> keep;  // contiguous copies of strided tensors, alive during the pass
  std::vector<Flat> flats;
  flats.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.numel() > 0 || !(kind == NormKind::kInf || kind == NormKind::kNegInf || norm_type < 0),
                "grad_norms: cannot compute the ", norm_type, " norm of tensors[", i,
                "], which is empty, because the operation does not have an identity");
    if (t.is_non_overlapping_and_dense()) {
      flats.push_back({t.data_ptr(), t.numel(), float_type(t.scalar_type()), t.element_size()});
    } else {
      keep.push_back(t.contiguous());
      flats.push_back({keep.back().data_ptr(), t.numel(), float_type(t.scalar_type()),
                       t.element_size()});
    }
  }
  const std::vector<Item> items = make_items(flats);
  std::vector<double> partial(items.size());
  for_each_item(items, [&](int64_t i) {
    const Item& it = items[i];
    const Flat& f = flats[it.tensor];
    partial[i] = clip.reduce(f.at(it.begin), it.end - it.begin, f.type, kind, norm_type);
  });
  std::vector<double> value(count, 0.0);
  std::vector<bool> seen(count, false);
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t t = items[i].tensor;
    value[t] = seen[t] ? combine(value[t], partial[i], kind) : partial[i];
    seen[t] = true;
  }
  Tensor out = at::empty({count}, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
  for (int64_t t = 0; t < count; ++t) {
    const double norm = finish(value[t], kind, norm_type);
    // float64 output: the norm of a tensor of lower precision is still rounded to float32, as
    // torch rounds it to the tensor's dtype before combining the norms.
    if (any_double) {
      out.data_ptr<double>()[t] = tensors[t].scalar_type() == at::kDouble
                                      ? norm
                                      : static_cast<double>(static_cast<float>(norm));
    }
    else out.data_ptr<float>()[t] = static_cast<float>(norm);
  }
  return out;
}

// Flat views of the tensors for an in-place pass. A tensor that is not non-overlapping and dense
// gets a contiguous copy (in `copies`, its original in `strided`) to be copied back afterwards.
std::vector<Flat> inplace_flats(at::TensorList tensors, std::vector<Tensor>& strided,
                                std::vector<Tensor>& copies) {
  std::vector<Flat> flats;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    if (t.is_non_overlapping_and_dense()) {
      flats.push_back({t.data_ptr(), t.numel(), float_type(t.scalar_type()), t.element_size()});
    } else {
      strided.push_back(t);
      copies.push_back(t.contiguous());
      flats.push_back({copies.back().data_ptr(), t.numel(), float_type(t.scalar_type()),
                       t.element_size()});
    }
  }
  return flats;
}

void copy_back(std::vector<Tensor>& strided, const std::vector<Tensor>& copies) {
  for (size_t i = 0; i < strided.size(); ++i) strided[i].copy_(copies[i]);
}

void scale_grads_(at::TensorList tensors, const Tensor& coef) {
  check_list(tensors, "scale_grads_");
  TORCH_CHECK(coef.numel() == 1, "scale_grads_: coef must have one element, got shape ",
              coef.sizes());
  TORCH_CHECK(coef.device().is_cpu(), "scale_grads_: coef must be on the CPU, got ",
              coef.device());
  const double c = coef.item<double>();
  std::vector<Tensor> strided, copies;
  const std::vector<Flat> flats = inplace_flats(tensors, strided, copies);
  const ClipKernels& clip = kernels().clip;
  const std::vector<Item> items = make_items(flats);
  for_each_item(items, [&](int64_t i) {
    const Item& it = items[i];
    const Flat& f = flats[it.tensor];
    clip.scale(f.at(it.begin), it.end - it.begin, f.type, c);
  });
  copy_back(strided, copies);
}

void clamp_grads_(at::TensorList tensors, double clip_value) {
  check_list(tensors, "clamp_grads_");
  if (std::isnan(clip_value)) {  // torch: clamp_min_(nan) makes every element NaN
    for (const auto& t : tensors) t.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  std::vector<Tensor> strided, copies;
  const std::vector<Flat> flats = inplace_flats(tensors, strided, copies);
  const ClipKernels& clip = kernels().clip;
  const std::vector<Item> items = make_items(flats);
  for_each_item(items, [&](int64_t i) {
    const Item& it = items[i];
    const Flat& f = flats[it.tensor];
    clip.clamp(f.at(it.begin), it.end - it.begin, f.type, clip_value);
  });
  copy_back(strided, copies);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("grad_norms", &grad_norms);
  m.impl("scale_grads_", &scale_grads_);
  m.impl("clamp_grads_", &clamp_grads_);
}

}  // namespace cpu
}  // namespace pyengine
