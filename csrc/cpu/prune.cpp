// Structured-pruning kernels on the CPU.
//
//   unit_importance(weights, grads, dims, blocks, units, kind)
//     One score per prunable unit, reducing the unit's whole weight group in one pass over
//     every tensor of the group. Tensor i (1-D or 2-D) contributes along dims[i] (0: rows,
//     1: columns), whose size is blocks[i] * units; index j of that dim belongs to unit
//     j % units (blocks = 4 for the four gate row-blocks of an LSTM weight). Per element:
//     kind "l1": |w|, "l2": w^2 (sqrt taken at the end), "taylor": |w * g| (grads[i] beside
//     weights[i]). Accumulated in float64; the result is float32 (float64 when any weight is).
//     Deterministic for any thread count: every unit (dim 0) or column (dim 1) is reduced by
//     one thread in a fixed order, and tensors are added in list order.
//   nm_mask(scores, n, m)
//     Semi-structured N:M mask of a 2-D tensor: in every group of m consecutive elements of a
//     row, the n largest scores are kept (ties: the lower index; NaN ranks above every number,
//     as in torch.sort), the rest are 0. bool result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

enum class Kind { L1, L2, Taylor };

Kind parse_kind(const std::string& kind) {
  if (kind == "l1") return Kind::L1;
  if (kind == "l2") return Kind::L2;
  if (kind == "taylor") return Kind::Taylor;
  TORCH_CHECK(false, "unit_importance: kind must be 'l1', 'l2' or 'taylor', got '", kind, "'");
}

template <Kind K, typename T>
inline double term(T w, T g) {
  if constexpr (K == Kind::L1) return std::fabs(double(w));
  else if constexpr (K == Kind::L2) return double(w) * double(w);
  else return std::fabs(double(w) * double(g));
}

// Sum of terms over n contiguous elements, eight independent float64 accumulators.
template <Kind K, typename T>
double reduce_row(const T* w, const T* g, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += term<K, T>(w[j + k], g ? g[j + k] : T(0));
  }
  for (; j < n; ++j) acc[j & 7] += term<K, T>(w[j], g ? g[j] : T(0));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// out[u] += the group terms of tensor w (shape rows x cols, contiguous) along `dim`.
template <Kind K, typename T>
void accumulate(const T* w, const T* g, int64_t rows, int64_t cols, int64_t dim, int64_t units,
                double* out) {
  // Below kSerialBelow elements one thread does it all: a parallel region costs microseconds
  // when the machine is idle, but a scheduler slice (milliseconds) when the other cores are busy.
  constexpr int64_t kSerialBelow = int64_t(1) << 20;
  const int64_t kGrainElems = rows * cols < kSerialBelow ? rows * cols + 1 : int64_t(1) << 17;
  if (dim == 0) {
    const int64_t blocks = rows / units;
    const int64_t per_unit = std::max<int64_t>(1, blocks * cols);
    at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / per_unit),
                     [&](int64_t ub, int64_t ue) {
      for (int64_t u = ub; u < ue; ++u) {
        double s = 0;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t r = b * units + u;
          s += reduce_row<K, T>(w + r * cols, g ? g + r * cols : nullptr, cols);
        }
        out[u] += s;
      }
    });
  } else {
    // Columns: every thread owns a range of columns and walks all rows (vectorised over the
    // columns); column c belongs to unit c % units, folded serially after.
    std::vector<double> col(cols, 0.0);
    at::parallel_for(0, cols, std::max<int64_t>(64, kGrainElems / std::max<int64_t>(1, rows) + 1),
                     [&](int64_t cb, int64_t ce) {
      double* acc = col.data();
      for (int64_t r = 0; r < rows; ++r) {
        const T* wr = w + r * cols;
        const T* gr = g ? g + r * cols : nullptr;
        if (gr) {
          for (int64_t c = cb; c < ce; ++c) acc[c] += term<K, T>(wr[c], gr[c]);
        } else {
          for (int64_t c = cb; c < ce; ++c) acc[c] += term<K, T>(wr[c], T(0));
        }
      }
    });
    for (int64_t c = 0; c < cols; ++c) out[c % units] += col[c];
  }
}

Tensor unit_importance(at::TensorList weights, at::TensorList grads, at::IntArrayRef dims,
                       at::IntArrayRef blocks, int64_t units, std::string kind_name) {
  const Kind kind = parse_kind(kind_name);
  const int64_t n = weights.size();
  TORCH_CHECK(n > 0, "unit_importance: weights must not be empty");
  TORCH_CHECK((int64_t)dims.size() == n && (int64_t)blocks.size() == n,
              "unit_importance: dims and blocks need one entry per weight (", n, "), got ",
              dims.size(), " and ", blocks.size());
  TORCH_CHECK(units >= 0, "unit_importance: units must be >= 0, got ", units);
  if (kind == Kind::Taylor) {
    TORCH_CHECK((int64_t)grads.size() == n, "unit_importance: kind 'taylor' needs one grad per "
                "weight (", n, "), got ", grads.size());
  } else {
    TORCH_CHECK(grads.empty(), "unit_importance: grads are only used by kind 'taylor'");
  }
  bool any_double = false;
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& w = weights[i];
    TORCH_CHECK(w.device().is_cpu(), "unit_importance: weights[", i, "] is not on the CPU");
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
                "unit_importance: weights[", i, "] has dtype ", w.scalar_type(),
                "; supported: float32, float64");
    TORCH_CHECK(w.dim() == 1 || w.dim() == 2, "unit_importance: weights[", i,
                "] must be 1-D or 2-D, got ", w.dim(), "-D");
    TORCH_CHECK(dims[i] >= 0 && dims[i] < w.dim(), "unit_importance: dims[", i, "] = ", dims[i],
                " is out of range for a ", w.dim(), "-D tensor");
    TORCH_CHECK(blocks[i] >= 1 && w.size(dims[i]) == blocks[i] * units,
                "unit_importance: weights[", i, "] has size ", w.size(dims[i]), " along dim ",
                dims[i], ", expected blocks[", i, "] * units = ", blocks[i], " * ", units);
    if (kind == Kind::Taylor) {
      TORCH_CHECK(grads[i].sizes() == w.sizes() && grads[i].scalar_type() == w.scalar_type() &&
                      grads[i].device() == w.device(),
                  "unit_importance: grads[", i, "] must match weights[", i,
                  "] in shape, dtype and device");
    }
    any_double = any_double || w.scalar_type() == at::kDouble;
  }
  if (units == 0) {  // an empty group: no scores (and no unit to divide a dimension by)
    return at::empty({0}, weights[0].options().dtype(any_double ? at::kDouble : at::kFloat));
  }
  std::vector<double> acc(units, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor w = weights[i].contiguous();
    const Tensor g = kind == Kind::Taylor ? grads[i].contiguous() : Tensor();
    const int64_t rows = w.size(0);
    const int64_t cols = w.dim() == 2 ? w.size(1) : 1;
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "unit_importance", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
      switch (kind) {
        case Kind::L1: accumulate<Kind::L1>(wp, gp, rows, cols, dims[i], units, acc.data()); break;
        case Kind::L2: accumulate<Kind::L2>(wp, gp, rows, cols, dims[i], units, acc.data()); break;
        case Kind::Taylor:
          accumulate<Kind::Taylor>(wp, gp, rows, cols, dims[i], units, acc.data());
          break;
      }
    });
  }
  Tensor out = at::empty({units}, weights[0].options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t u = 0; u < units; ++u) o[u] = kind == Kind::L2 ? std::sqrt(acc[u]) : acc[u];
  return any_double ? out : out.to(at::kFloat);
}

Tensor nm_mask(const Tensor& scores_in, int64_t n, int64_t m) {
  TORCH_CHECK(scores_in.device().is_cpu(), "nm_mask: scores is not on the CPU");
  TORCH_CHECK(scores_in.scalar_type() == at::kFloat || scores_in.scalar_type() == at::kDouble,
              "nm_mask: scores has dtype ", scores_in.scalar_type(), "; supported: float32, "
              "float64");
  TORCH_CHECK(scores_in.dim() == 2, "nm_mask: scores must be 2-D, got ", scores_in.dim(), "-D");
  TORCH_CHECK(m >= 1 && m <= 64 && n >= 0 && n <= m, "nm_mask: need 0 <= n <= m <= 64, got n=",
              n, " m=", m);
  TORCH_CHECK(scores_in.size(1) % m == 0, "nm_mask: the last dim (", scores_in.size(1),
              ") must be a multiple of m = ", m);
  const Tensor scores = scores_in.contiguous();
  Tensor mask = at::zeros(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t groups = scores.numel() / m;
  bool* mp = mask.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "nm_mask", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    at::parallel_for(0, groups, 4096 / m + 1, [&](int64_t gb, int64_t ge) {
      for (int64_t gi = gb; gi < ge; ++gi) {
        const scalar_t* sg = s + gi * m;
        bool* out = mp + gi * m;
        // element j is kept when fewer than n elements beat it (greater, or equal and earlier);
        // NaN ranks above every number, as in torch.sort, so a group keeps exactly n
        for (int64_t j = 0; j < m; ++j) {
          const bool nan_j = std::isnan(sg[j]);
          int64_t beaten_by = 0;
          for (int64_t k = 0; k < m; ++k) {
            const bool nan_k = std::isnan(sg[k]);
            const bool greater = nan_k ? !nan_j : (!nan_j && sg[k] > sg[j]);
            const bool equal = nan_k ? nan_j : sg[k] == sg[j];
            beaten_by += greater || (equal && k < j);
          }
          out[j] = beaten_by < n;
        }
      }
    });
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("unit_importance", &unit_importance);
  m.impl("nm_mask", &nm_mask);
}

}  // namespace cpu
}  // namespace pyengine
