// Fused Group LayerNorm on the CPU, forward and backward (float32).
//
// Semantics (those of kernels/group_norm/reference.py, tested equal to it): for token row i of
// group g = group[i],
//
//     xhat[i] = (x[i] - mean(x[i])) * rstd[i],   rstd[i] = 1 / sqrt(var(x[i]) + eps)
//     y[i]    = xhat[i] * weight[g] + bias[g]
//
// Layout: x [N, D] (the jagged tokens of a batch, values only), group [N] int64, weight and
// bias [G, D]. One pass per row in each direction: the reference's layer norm, per-group gather
// and affine are four or more passes over [N, D] plus an accumulating index_put backward (serial
// on the CPU); the one-hot matmul variant replaces that scatter but still makes ~6 passes. The
// backward writes dx per row and sums dweight / dbias per thread into [threads, G, D] partials that
// are added at the end (G is small: one group per sequence and per scenario), so no atomics.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kRowGrain = 64;

void check_inputs(const at::Tensor& x, const at::Tensor& group, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && group.dim() == 1, "group_norm_cpu: x [N, D], group [N], weight [G, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "group_norm_cpu: float32 tensors only");
  TORCH_CHECK(group.scalar_type() == at::kLong, "group_norm_cpu: group must be int64");
  TORCH_CHECK(x.is_contiguous() && group.is_contiguous() && weight.is_contiguous(), "group_norm_cpu: contiguous tensors only");
  TORCH_CHECK(group.size(0) == x.size(0), "group_norm_cpu: group has ", group.size(0), " rows, x has ", x.size(0));
  TORCH_CHECK(weight.size(1) == x.size(1), "group_norm_cpu: weight has ", weight.size(1), " features, x has ", x.size(1));
  // group ids index weight rows through raw pointers: refuse any out of range instead of reading
  // out of bounds
  const int64_t* g = group.data_ptr<int64_t>();
  const int64_t G = weight.size(0);
  for (int64_t i = 0; i < group.size(0); ++i) {
    TORCH_CHECK(g[i] >= 0 && g[i] < G, "group_norm_cpu: group[", i, "] = ", g[i], " is outside [0, ", G, ")");
  }
}

}  // namespace

// Returns y [N, D], mean [N], rstd [N] (the last two for the backward).
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& group, const at::Tensor& weight,
                                const at::Tensor& bias, double eps) {
  check_inputs(x, group, weight);
  TORCH_CHECK(bias.sizes() == weight.sizes() && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "group_norm_cpu: bias must be float32 [G, D] like weight");
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x), mean = at::empty({N}, x.options()), rstd = at::empty({N}, x.options());
  const float *X = x.data_ptr<float>(), *W = weight.data_ptr<float>(), *B = bias.data_ptr<float>();
  const int64_t* Gr = group.data_ptr<int64_t>();
  float *Y = y.data_ptr<float>(), *M = mean.data_ptr<float>(), *R = rstd.data_ptr<float>();
  const float inv_d = 1.0f / static_cast<float>(D);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict__ xr = X + i * D;
      float m = 0.0f;
      for (int64_t d = 0; d < D; ++d) m += xr[d];
      m *= inv_d;
      float var = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float c = xr[d] - m;
        var += c * c;
      }
      const float rs = 1.0f / std::sqrt(var * inv_d + static_cast<float>(eps));
      const float* __restrict__ w = W + Gr[i] * D;
      const float* __restrict__ b = B + Gr[i] * D;
      float* __restrict__ yr = Y + i * D;
      for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] - m) * rs * w[d] + b[d];
      M[i] = m;
      R[i] = rs;
    }
  });
  return {y, mean, rstd};
}

// Returns dx [N, D] (undefined unless need_dx), dweight [G, D], dbias [G, D].
std::vector<at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& group,
                                 const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                                 bool need_dx) {
  check_inputs(x, group, weight);
  const at::Tensor dy = dy_in.contiguous();
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == at::kFloat, "group_norm_cpu: dy must be float32 like x");
  const int64_t N = x.size(0), D = x.size(1), G = weight.size(0);
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, 2, G, D}, x.options());  // [thread, (dweight, dbias), G, D]
  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  const float *X = x.data_ptr<float>(), *DY = dy.data_ptr<float>(), *W = weight.data_ptr<float>();
  const float *M = mean.data_ptr<float>(), *R = rstd.data_ptr<float>();
  const int64_t* Gr = group.data_ptr<int64_t>();
  float* P = partial.data_ptr<float>();
  float* DX = need_dx ? dx.data_ptr<float>() : nullptr;
  const float inv_d = 1.0f / static_cast<float>(D);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    float* dw_all = P + at::get_thread_num() * 2 * G * D;
    float* db_all = dw_all + G * D;
    // dy * weight of the row, kept for the dx pass: recomputing it there could round differently
    // (fused multiply-adds), which rstd amplifies when a row's variance is tiny
    std::vector<float> dxh_row(D);
    float* __restrict__ dxh = dxh_row.data();
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict__ xr = X + i * D;
      const float* __restrict__ g = DY + i * D;
      const float* __restrict__ w = W + Gr[i] * D;
      float* __restrict__ dw = dw_all + Gr[i] * D;
      float* __restrict__ db = db_all + Gr[i] * D;
      const float m = M[i], rs = R[i];
      float sum_dxh = 0.0f, sum_dxh_xh = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float xh = (xr[d] - m) * rs;
        const float t = g[d] * w[d];
        dxh[d] = t;
        sum_dxh += t;
        sum_dxh_xh += t * xh;
      }
      for (int64_t d = 0; d < D; ++d) {
        dw[d] += g[d] * ((xr[d] - m) * rs);
        db[d] += g[d];
      }
      if (DX == nullptr) continue;
      const float a = sum_dxh * inv_d, c = sum_dxh_xh * inv_d;
      float* __restrict__ dxr = DX + i * D;
      for (int64_t d = 0; d < D; ++d) dxr[d] = rs * ((dxh[d] - a) - (xr[d] - m) * rs * c);
    }
  });
  at::Tensor sums = partial.sum(0);  // [2, G, D]
  return {dx, sums[0], sums[1]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Group LayerNorm forward (float32): y, mean, rstd");
  m.def("backward", &backward, "Group LayerNorm backward (float32): dx, dweight, dbias");
}
