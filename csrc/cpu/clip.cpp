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

#include "cpu/vec_math.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kChunk = int64_t(1) << 16;    // elements per work item
constexpr int64_t kSerialBelow = int64_t(1) << 18;  // fewer elements in all: one thread
// (a parallel region costs microseconds when idle, a scheduler slice on a loaded machine)

enum class Kind { Two, One, Inf, NegInf, Zero, Pow };

Kind kind_of(double p) {
  if (p == 2.0) return Kind::Two;
  if (p == 1.0) return Kind::One;
  if (std::isinf(p)) return p > 0 ? Kind::Inf : Kind::NegInf;
  if (p == 0.0) return Kind::Zero;
  return Kind::Pow;
}

struct Item {
  int64_t tensor;  // index into the list of flat views
  int64_t begin;   // element range [begin, end) of that tensor
  int64_t end;
};

// The flat memory of one tensor and its dtype.
struct Flat {
  void* data;
  int64_t numel;
  at::ScalarType dtype;
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

template <typename T>
inline double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
inline double to_double<double>(double x) {
  return x;
}
template <>
inline double to_double<float>(float x) {
  return static_cast<double>(x);
}

inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(a, b);
}
inline double nan_min(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::min(a, b);
}

// ---- reductions over one item ---------------------------------------------------------------

// Scalar reduction with eight independent accumulators (any dtype, any kind).
template <typename T>
double reduce_scalar(const T* x, int64_t n, Kind kind, double p) {
  double acc[8];
  const double init = kind == Kind::NegInf ? std::numeric_limits<double>::infinity() : 0.0;
  for (double& a : acc) a = init;
  auto step = [&](double& a, double v) {
    switch (kind) {
      case Kind::Two: a += v * v; break;
      case Kind::One: a += std::fabs(v); break;
      case Kind::Inf: a = nan_max(a, std::fabs(v)); break;
      case Kind::NegInf: a = nan_min(a, std::fabs(v)); break;
      case Kind::Zero: a += (v != 0.0) ? 1.0 : 0.0; break;
      case Kind::Pow: a += std::pow(std::fabs(v), p); break;
    }
  };
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) step(acc[k], to_double(x[j + k]));
  }
  for (; j < n; ++j) step(acc[j & 7], to_double(x[j]));
  double r = acc[0];
  for (int k = 1; k < 8; ++k) {
    if (kind == Kind::Inf) r = nan_max(r, acc[k]);
    else if (kind == Kind::NegInf) r = nan_min(r, acc[k]);
    else r += acc[k];
  }
  return r;
}

#if PYENGINE_HAS_AVX512
// sum x^2 or sum |x| of float32. Converting every element to float64 costs more than the memory
// stream here, so blocks of 1024 elements accumulate in float32 (64 lanes, 16 terms per lane per
// block: a relative error of a few 1e-8) and each block's lanes are added into float64
// accumulators.
template <bool kSquare>
double reduce_f32_sum(const float* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  auto term = [&](__m512 v) {
    if constexpr (kSquare) return v;
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
  };
  auto widen = [](__m512d acc, __m512 f) {  // acc + the 16 floats of f, in float64
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1));
    return _mm512_add_pd(acc, _mm512_cvtps_pd(hi));
  };
  __m512d d0 = _mm512_setzero_pd(), d1 = d0;
  int64_t j = 0;
  constexpr int64_t kBlock = 1024;
  while (j + 64 <= n) {  // blocks of 1024 (the last one: the remaining multiple of 64)
    const int64_t end = j + std::min(kBlock, (n - j) / 64 * 64);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = j; k < end; k += 64) {
      __m512 v0 = _mm512_loadu_ps(x + k), v1 = _mm512_loadu_ps(x + k + 16);
      __m512 v2 = _mm512_loadu_ps(x + k + 32), v3 = _mm512_loadu_ps(x + k + 48);
      if constexpr (kSquare) {
        a0 = _mm512_fmadd_ps(v0, v0, a0);
        a1 = _mm512_fmadd_ps(v1, v1, a1);
        a2 = _mm512_fmadd_ps(v2, v2, a2);
        a3 = _mm512_fmadd_ps(v3, v3, a3);
      } else {
        a0 = _mm512_add_ps(a0, term(v0));
        a1 = _mm512_add_ps(a1, term(v1));
        a2 = _mm512_add_ps(a2, term(v2));
        a3 = _mm512_add_ps(a3, term(v3));
      }
    }
    d0 = widen(widen(d0, a0), a1);
    d1 = widen(widen(d1, a2), a3);
    j = end;
  }
  double r = _mm512_reduce_add_pd(_mm512_add_pd(d0, d1));
  for (; j < n; ++j) {
    const double v = x[j];
    r += kSquare ? v * v : std::fabs(v);
  }
  return r;
}

template <bool kSquare>
double reduce_f64_sum(const double* x, int64_t n) {
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512d d0 = _mm512_loadu_pd(x + j), d1 = _mm512_loadu_pd(x + j + 8);
    __m512d d2 = _mm512_loadu_pd(x + j + 16), d3 = _mm512_loadu_pd(x + j + 24);
    if constexpr (kSquare) {
      a0 = _mm512_fmadd_pd(d0, d0, a0);
      a1 = _mm512_fmadd_pd(d1, d1, a1);
      a2 = _mm512_fmadd_pd(d2, d2, a2);
      a3 = _mm512_fmadd_pd(d3, d3, a3);
    } else {
      a0 = _mm512_add_pd(a0, _mm512_abs_pd(d0));
      a1 = _mm512_add_pd(a1, _mm512_abs_pd(d1));
      a2 = _mm512_add_pd(a2, _mm512_abs_pd(d2));
      a3 = _mm512_add_pd(a3, _mm512_abs_pd(d3));
    }
  }
  double r = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
  for (; j < n; ++j) r += kSquare ? x[j] * x[j] : std::fabs(x[j]);
  return r;
}

// max |x| of float32 (exact in float32), NaN propagated through an unordered-compare mask.
double reduce_f32_max(const float* x, int64_t n) {
  __m512 m0 = _mm512_setzero_ps(), m1 = m0;
  __mmask16 nan = 0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
    nan |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(x0));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(x1));
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  double r = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  for (; j < n; ++j) r = nan_max(r, std::fabs((double)x[j]));
  return r;
}
#endif

#if PYENGINE_HAS_AVX2 && !PYENGINE_HAS_AVX512
// AVX2 machines: sum x^2 or sum |x| of float32 in float64 lanes, 16 floats per iteration.
template <bool kSquare>
double reduce_f32_sum_avx2(const float* x, int64_t n) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256d d0 = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
    __m256d d1 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4));
    __m256d d2 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 8));
    __m256d d3 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 12));
    if constexpr (kSquare) {
      a0 = _mm256_fmadd_pd(d0, d0, a0);
      a1 = _mm256_fmadd_pd(d1, d1, a1);
      a2 = _mm256_fmadd_pd(d2, d2, a2);
      a3 = _mm256_fmadd_pd(d3, d3, a3);
    } else {
      a0 = _mm256_add_pd(a0, _mm256_andnot_pd(sign, d0));
      a1 = _mm256_add_pd(a1, _mm256_andnot_pd(sign, d1));
      a2 = _mm256_add_pd(a2, _mm256_andnot_pd(sign, d2));
      a3 = _mm256_add_pd(a3, _mm256_andnot_pd(sign, d3));
    }
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  double r = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; j < n; ++j) {
    const double v = x[j];
    r += kSquare ? v * v : std::fabs(v);
  }
  return r;
}
#endif

template <typename T>
double reduce_item(const T* x, int64_t n, Kind kind, double p) {
#if PYENGINE_HAS_AVX2 && !PYENGINE_HAS_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (kind == Kind::Two) return reduce_f32_sum_avx2<true>(x, n);
    if (kind == Kind::One) return reduce_f32_sum_avx2<false>(x, n);
  }
#endif
#if PYENGINE_HAS_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (kind == Kind::Two) return reduce_f32_sum<true>(x, n);
    if (kind == Kind::One) return reduce_f32_sum<false>(x, n);
    if (kind == Kind::Inf) return reduce_f32_max(x, n);
  }
  if constexpr (std::is_same_v<T, double>) {
    if (kind == Kind::Two) return reduce_f64_sum<true>(x, n);
    if (kind == Kind::One) return reduce_f64_sum<false>(x, n);
  }
#endif
  return reduce_scalar(x, n, kind, p);
}

// Combine item partials of one tensor; then the norm from the combined value.
double combine(double a, double b, Kind kind) {
  if (kind == Kind::Inf) return nan_max(a, b);
  if (kind == Kind::NegInf) return nan_min(a, b);
  return a + b;
}

double finish(double s, Kind kind, double p) {
  switch (kind) {
    case Kind::Two: return std::sqrt(s);
    case Kind::Pow: return std::pow(s, 1.0 / p);
    default: return s;
  }
}

// ---- elementwise passes over one item --------------------------------------------------------

template <typename T>
void scale_item(T* x, int64_t n, double coef) {
  if constexpr (std::is_same_v<T, double>) {
    int64_t j = 0;
#if PYENGINE_HAS_AVX512
    const __m512d c = _mm512_set1_pd(coef);
    for (; j + 16 <= n; j += 16) {
      _mm512_storeu_pd(x + j, _mm512_mul_pd(_mm512_loadu_pd(x + j), c));
      _mm512_storeu_pd(x + j + 8, _mm512_mul_pd(_mm512_loadu_pd(x + j + 8), c));
    }
#endif
    for (; j < n; ++j) x[j] *= coef;
  } else {
    const float c = static_cast<float>(coef);
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
#if PYENGINE_HAS_AVX512
      const __m512 cv = _mm512_set1_ps(c);
      for (; j + 32 <= n; j += 32) {
        _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), cv));
        _mm512_storeu_ps(x + j + 16, _mm512_mul_ps(_mm512_loadu_ps(x + j + 16), cv));
      }
#endif
    }
    for (; j < n; ++j) x[j] = static_cast<T>(static_cast<float>(x[j]) * c);
  }
}

template <typename T, typename A>
inline A clamp_one(A v, A lo, A hi) {
  return std::isnan(v) ? v : std::min(std::max(v, lo), hi);
}

template <typename T>
void clamp_item(T* x, int64_t n, double clip) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < n; ++j) x[j] = clamp_one<T, double>(x[j], -clip, clip);
  } else {
    const float hi = static_cast<float>(clip), lo = -hi;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
#if PYENGINE_HAS_AVX512
      // max/min return their second operand when either is NaN: a NaN x passes through.
      const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
      for (; j + 16 <= n; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        _mm512_storeu_ps(x + j, _mm512_min_ps(hiv, _mm512_max_ps(lov, v)));
      }
#endif
    }
    for (; j < n; ++j) x[j] = static_cast<T>(clamp_one<T, float>(static_cast<float>(x[j]), lo, hi));
  }
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
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
  const Kind kind = kind_of(norm_type);
  const int64_t count = (int64_t)tensors.size();
  bool any_double = false;
  for (const auto& t : tensors) any_double = any_double || t.scalar_type() == at::kDouble;
  std::vector<Tensor> keep;  // contiguous copies of strided tensors, alive during the pass
  std::vector<Flat> flats;
  flats.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.numel() > 0 || !(kind == Kind::Inf || kind == Kind::NegInf || norm_type < 0),
                "grad_norms: cannot compute the ", norm_type, " norm of tensors[", i,
                "], which is empty, because the operation does not have an identity");
    if (t.is_non_overlapping_and_dense()) {
      flats.push_back({t.data_ptr(), t.numel(), t.scalar_type()});
    } else {
      keep.push_back(t.contiguous());
      flats.push_back({keep.back().data_ptr(), t.numel(), t.scalar_type()});
    }
  }
  const std::vector<Item> items = make_items(flats);
  std::vector<double> partial(items.size());
  for_each_item(items, [&](int64_t i) {
    const Item& it = items[i];
    const Flat& f = flats[it.tensor];
    dispatch_dtype(f.dtype, [&](auto tag) {
      using T = decltype(tag);
      partial[i] = reduce_item(static_cast<const T*>(f.data) + it.begin, it.end - it.begin, kind,
                               norm_type);
    });
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
      flats.push_back({t.data_ptr(), t.numel(), t.scalar_type()});
    } else {
      strided.push_back(t);
      copies.push_back(t.contiguous());
      flats.push_back({copies.back().data_ptr(), t.numel(), t.scalar_type()});
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
  const std::vector<Item> items = make_items(flats);
  for_each_item(items, [&](int64_t i) {
    const Item& it = items[i];
    const Flat& f = flats[it.tensor];
    dispatch_dtype(f.dtype, [&](auto tag) {
      using T = decltype(tag);
      scale_item(static_cast<T*>(f.data) + it.begin, it.end - it.begin, c);
    });
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
  const std::vector<Item> items = make_items(flats);
  for_each_item(items, [&](int64_t i) {
    const Item& it = items[i];
    const Flat& f = flats[it.tensor];
    dispatch_dtype(f.dtype, [&](auto tag) {
      using T = decltype(tag);
      clamp_item(static_cast<T*>(f.data) + it.begin, it.end - it.begin, clip_value);
    });
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
