// Fused HSTU attention on the CPU, forward and backward, for the prefix-encoded dynamic mask.
//
// Semantics (those of kernels/hstu_attention/reference.py, tested equal to it): for query i of
// sample b and head h (key-value group g = h / (H / G)), the visible keys are the sample's keys
// [0, prefix[i]) plus, for a T token, its own key self_local[i]; with n = max(1, #visible),
//
//     out[i, h] = sum_{j visible} silu(alpha * <q[i, h], k[j, g]>) * v[j, g] / n.
//
// Jagged layout (values + offsets, no padding):
//     q [Tq, H, D]   rows q_offsets[b] .. q_offsets[b+1] are sample b's queries
//     k [Tk, G, D]   rows kv_offsets[b] .. kv_offsets[b+1] are sample b's keys
//     v [Tk, G, Dv]
//
// Schedule. One work item is one (sample, key-value group), so its query rows are the only
// writers of its dK / dV rows and the backward needs no atomics. Inside it, for each block of
// kQueryBlock queries and each head (all heads in one GEMM when G = 1), the block's key range [0, kmax) is the largest prefix (or self key)
// any of its queries sees: keys beyond it are never touched, so R and T query blocks skip most of
// the masked area and nothing is padded across samples. The products are BLAS GEMMs on strided
// views of q, k, v (no copies); the mask, SiLU, 1/n and, in the backward, the SiLU derivative are
// one vectorised pass over the block's scores. The backward recomputes the scores instead of
// saving them, so memory is O(inputs), not O(B x L^2).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// The Fortran BLAS entry of the BLAS libtorch_cpu is linked with (MKL on x86 wheels; it exports
// it). ATen's own cpublas::gemm is not exported to extensions.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int64_t kQueryBlock = 64;

struct Dims {
  int64_t H, G, D, Dv, r;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [rows, heads, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "hstu_cpu: float32 tensors only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "hstu_cpu: contiguous tensors only");
  Dims d{q.size(1), k.size(1), q.size(2), v.size(2), 0};
  TORCH_CHECK(d.H % d.G == 0, "num_heads must be divisible by num_kv_heads");
  TORCH_CHECK(k.size(2) == d.D && v.size(1) == d.G && v.size(0) == k.size(0), "k / v shapes do not match q");
  d.r = d.H / d.G;
  return d;
}

// The index tensors are read through raw pointers: refuse any that would read or write out of
// bounds, with the rule, instead of corrupting memory.
void check_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_offsets,
                  const at::Tensor& kv_offsets, const at::Tensor& q_prefix, const at::Tensor& q_self_local) {
  for (const at::Tensor* t : {&q_offsets, &kv_offsets, &q_prefix, &q_self_local})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1,
                "hstu_cpu: offsets, prefix and self_local must be contiguous 1-d int64 tensors");
  TORCH_CHECK(q_offsets.numel() >= 1 && q_offsets.numel() == kv_offsets.numel(),
              "hstu_cpu: q_offsets and kv_offsets must both have B + 1 entries");
  TORCH_CHECK(q_prefix.numel() == q.size(0) && q_self_local.numel() == q.size(0),
              "hstu_cpu: q_prefix and q_self_local need one entry per query row");
  const int64_t B = q_offsets.numel() - 1;
  const int64_t *qo = q_offsets.data_ptr<int64_t>(), *ko = kv_offsets.data_ptr<int64_t>();
  TORCH_CHECK(qo[0] == 0 && ko[0] == 0 && qo[B] == q.size(0) && ko[B] == k.size(0),
              "hstu_cpu: offsets must start at 0 and end at the row counts of q and k");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(qo[b] <= qo[b + 1] && ko[b] <= ko[b + 1], "hstu_cpu: offsets must be non-decreasing");
  const int64_t* pre = q_prefix.data_ptr<int64_t>();
  for (int64_t i = 0; i < q_prefix.numel(); ++i) TORCH_CHECK(pre[i] >= 0, "hstu_cpu: q_prefix must be >= 0");
}

// Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C through the column-major BLAS: a row-major
// matrix is its transpose in column-major, so C^T = op(B)^T op(A)^T with the same flags.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
  const float one = 1.f;
  if (K == 0) {  // BLAS leaves C * beta; keep that explicit for beta = 0 (C may hold garbage)
    if (beta == 0.f)
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  sgemm_(&trb, &tra, &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// Built with -ffast-math so the score loops vectorise through glibc's vector expf; the clamp keeps
// exp finite, which -ffast-math assumes (sigmoid(+-80) is 1 and 1.8e-35, as in float32 anyway).
inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-std::min(80.f, std::max(-80.f, z)))); }

// The queries of one block: where each sees, and the block's key range.
struct Block {
  // first query (global), matrix rows (queries x hr), prefix keys [0, kmax) read, heads per query:
  // with G = 1 the H heads of a query are adjacent rows of q ([Tq * H, D]), so all heads go through
  // one GEMM (hr = H); otherwise one head at a time (hr = 1, rows strided by H * D).
  int64_t q0, rows, kmax, hr;
  int64_t query(int64_t row) const { return q0 + row / hr; }
};

struct Mask {
  const int64_t *prefix, *self;
  int64_t lk;
  int64_t visible_prefix(int64_t i) const { return std::min<int64_t>(prefix[i], lk); }
  int64_t self_key(int64_t i) const {  // -1: none, or already inside the prefix (counted once)
    const int64_t s = self[i];
    return (s >= 0 && s >= visible_prefix(i) && s < lk) ? s : -1;
  }
  float inv_n(int64_t i) const {
    const int64_t n = visible_prefix(i) + (self_key(i) >= 0 ? 1 : 0);
    return 1.f / static_cast<float>(std::max<int64_t>(1, n));
  }
  Block block(int64_t q0, int64_t q1, int64_t hr) const {
    int64_t kmax = 0;
    for (int64_t i = q0; i < q1; ++i) kmax = std::max(kmax, visible_prefix(i));  // self keys: apart
    return {q0, (q1 - q0) * hr, kmax, hr};
  }
};

// scores [rows, kmax] of the prefix keys -> attention weights p = silu(alpha s) / n on each row's
// visible prefix, 0 beyond it. With dp (the gradient w.r.t. p), also dp -> the gradient w.r.t. s.
void weights(const Mask& mask, const Block& blk, float alpha, float* s, float* dp) {
  for (int64_t r = 0; r < blk.rows; ++r) {
    const int64_t i = blk.query(r), pre = mask.visible_prefix(i);
    const float inv_n = mask.inv_n(i);
    float* srow = s + r * blk.kmax;
    if (dp) {
      float* drow = dp + r * blk.kmax;
#pragma omp simd
      for (int64_t j = 0; j < pre; ++j) {
        const float z = alpha * srow[j], sg = sigmoid(z);
        srow[j] = z * sg * inv_n;
        drow[j] *= inv_n * sg * (1.f + z * (1.f - sg)) * alpha;
      }
      std::memset(drow + pre, 0, sizeof(float) * (blk.kmax - pre));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < pre; ++j) {
        const float z = alpha * srow[j];
        srow[j] = z * sigmoid(z) * inv_n;
      }
    }
    std::memset(srow + pre, 0, sizeof(float) * (blk.kmax - pre));
  }
}

inline float dot(const float* x, const float* y, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += x[d] * y[d];
  return acc;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// Row pointers of one head's query block and its key-value group in q, k, v and their gradients.
struct Views {
  const float *q, *k, *v, *go;  // q / go rows r at q + r * ldq (go + r * ldo); keys j at k + j * ldk ...
  float *out, *dq, *dk, *dv;
  int64_t ldq, ldk, ldv, ldo;
};

// The T tokens' own keys, apart from the prefix GEMMs: one dot product per query, so the masked
// T x T block (only its diagonal is visible) is never computed. Forward: out += p * v_self;
// backward (v.go set): dv_self += p * go, dq += ds * k_self, dk_self += ds * q.
void self_keys(const Mask& mask, const Block& blk, float alpha, const Dims& dm, const Views& w) {
  for (int64_t r = 0; r < blk.rows; ++r) {
    const int64_t i = blk.query(r), self = mask.self_key(i);
    if (self < 0) continue;
    const float* q_row = w.q + r * w.ldq;
    const float *k_row = w.k + self * w.ldk, *v_row = w.v + self * w.ldv;
    const float inv_n = mask.inv_n(i), z = alpha * dot(q_row, k_row, dm.D), sg = sigmoid(z);
    const float p = z * sg * inv_n;
    if (!w.go) {
      axpy(p, v_row, w.out + r * w.ldo, dm.Dv);
      continue;
    }
    const float* go_row = w.go + r * w.ldo;
    const float ds = dot(go_row, v_row, dm.Dv) * inv_n * sg * (1.f + z * (1.f - sg)) * alpha;
    axpy(p, go_row, w.dv + self * w.ldv, dm.Dv);
    axpy(ds, k_row, w.dq + r * w.ldq, dm.D);
    axpy(ds, q_row, w.dk + self * w.ldk, dm.D);
  }
}

// Calls fn(b, g, h, kv0, mask, block, s, dp) for every (sample, group) item in parallel and, inside
// it in order, every query block and head (or, with G = 1, all heads at once from h = 0).
template <typename Fn>
void for_each_block(const Dims& dm, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                    const at::Tensor& q_prefix, const at::Tensor& q_self_local, Fn fn) {
  const int64_t B = q_offsets.size(0) - 1;
  const int64_t *qo = q_offsets.data_ptr<int64_t>(), *ko = kv_offsets.data_ptr<int64_t>();
  const int64_t *pre = q_prefix.data_ptr<int64_t>(), *self = q_self_local.data_ptr<int64_t>();
  at::parallel_for(0, B * dm.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, dp;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / dm.G, g = item % dm.G;
      const Mask mask{pre, self, ko[b + 1] - ko[b]};
      const int64_t hr = dm.G == 1 ? dm.H : 1, h_step = hr == 1 ? 1 : dm.H;
      for (int64_t q0 = qo[b]; q0 < qo[b + 1]; q0 += kQueryBlock) {
        const Block blk = mask.block(q0, std::min(q0 + kQueryBlock, qo[b + 1]), hr);
        s.resize(static_cast<size_t>(blk.rows * blk.kmax));
        dp.resize(static_cast<size_t>(blk.rows * blk.kmax));
        for (int64_t h = g * dm.r; h < (g + 1) * dm.r; h += h_step) fn(b, g, h, ko[b], mask, blk, s.data(), dp.data());
      }
    }
  });
}

}  // namespace

at::Tensor hstu_cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                            const at::Tensor& q_prefix, const at::Tensor& q_self_local, double alpha) {
  const Dims dm = dims_of(q, k, v);
  check_layout(q, k, q_offsets, kv_offsets, q_prefix, q_self_local);
  auto out = at::zeros({q.size(0), dm.H, dm.Dv}, q.options());
  const float a = static_cast<float>(alpha);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_each_block(dm, q_offsets, kv_offsets, q_prefix, q_self_local,
                 [&](int64_t, int64_t g, int64_t h, int64_t kv0, const Mask& mask, const Block& blk, float* s, float*) {
    const int64_t qoff = blk.q0 * dm.H + h, koff = kv0 * dm.G + g;
    const int64_t hs = dm.H / blk.hr;  // row stride of q / out in heads
    const Views w{qp + qoff * dm.D, kp + koff * dm.D, vp + koff * dm.Dv, nullptr, op + qoff * dm.Dv,
                  nullptr, nullptr, nullptr, hs * dm.D, dm.G * dm.D, dm.G * dm.Dv, hs * dm.Dv};
    if (blk.kmax > 0) {  // else the rows stay 0 but for their self keys
      gemm(false, true, blk.rows, blk.kmax, dm.D, w.q, w.ldq, w.k, w.ldk, 0.f, s, blk.kmax);
      weights(mask, blk, a, s, nullptr);
      gemm(false, false, blk.rows, dm.Dv, blk.kmax, s, blk.kmax, w.v, w.ldv, 0.f, w.out, w.ldo);
    }
    self_keys(mask, blk, a, dm, w);
  });
  return out;
}

std::vector<at::Tensor> hstu_cpu_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& q_offsets,
                                          const at::Tensor& kv_offsets, const at::Tensor& q_prefix,
                                          const at::Tensor& q_self_local, double alpha) {
  const Dims dm = dims_of(q, k, v);
  check_layout(q, k, q_offsets, kv_offsets, q_prefix, q_self_local);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({q.size(0), dm.H, dm.Dv}), "grad_out: shape of the output");
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat, "grad_out: contiguous float32");
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const float a = static_cast<float>(alpha);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* gp = grad_out.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  for_each_block(dm, q_offsets, kv_offsets, q_prefix, q_self_local,
                 [&](int64_t, int64_t g, int64_t h, int64_t kv0, const Mask& mask, const Block& blk, float* s,
                     float* dp) {
    const int64_t qoff = blk.q0 * dm.H + h, koff = kv0 * dm.G + g;
    const Views w{qp + qoff * dm.D, kp + koff * dm.D, vp + koff * dm.Dv, gp + qoff * dm.Dv, nullptr,
                  dqp + qoff * dm.D, dkp + koff * dm.D, dvp + koff * dm.Dv,
                  dm.H / blk.hr * dm.D, dm.G * dm.D, dm.G * dm.Dv, dm.H / blk.hr * dm.Dv};
    if (blk.kmax > 0) {
      gemm(false, true, blk.rows, blk.kmax, dm.D, w.q, w.ldq, w.k, w.ldk, 0.f, s, blk.kmax);      // scores
      gemm(false, true, blk.rows, blk.kmax, dm.Dv, w.go, w.ldo, w.v, w.ldv, 0.f, dp, blk.kmax);   // d weights
      weights(mask, blk, a, s, dp);                                                                // p, d scores
      gemm(true, false, blk.kmax, dm.Dv, blk.rows, s, blk.kmax, w.go, w.ldo, 1.f, w.dv, w.ldv);
      gemm(false, false, blk.rows, dm.D, blk.kmax, dp, blk.kmax, w.k, w.ldk, 0.f, w.dq, w.ldq);
      gemm(true, false, blk.kmax, dm.D, blk.rows, dp, blk.kmax, w.q, w.ldq, 1.f, w.dk, w.ldk);
    }
    self_keys(mask, blk, a, dm, w);  // after the dq GEMM, which overwrites the rows
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &hstu_cpu_forward, "fused HSTU attention forward (CPU, float32)");
  m.def("backward", &hstu_cpu_backward, "fused HSTU attention backward (CPU, float32)");
}
