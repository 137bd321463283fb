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
// one vectorised pass over the block's scores. A training forward keeps each block's weights and
// their derivative factors (within the caller's byte budget) so the backward needs neither the
// score GEMM nor the sigmoids; above the budget the backward recomputes them and memory stays
// O(inputs), not O(B x L^2).
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

// exp(x) as 2^n 2^f (n = round(x log2 e), |f| <= 1/2, 2^f by its degree-6 Taylor polynomial:
// relative error ~1e-7, float32's own), inline and branch-free so the score loops vectorise with no
// call per vector (glibc's vector expf, reached through -ffast-math, spilled the loop's registers
// around every call: 15 % slower). The clamp keeps 2^n a normal float; sigmoid(+-87) is 1 and
// 1.6e-38 as in float32 anyway.
inline float exp_approx(float x) {
  x = std::min(87.f, std::max(-87.f, x));
  const float t = x * 1.44269504f;
  const float n = std::floor(t + 0.5f), f = (t - n) * 0.693147181f;
  float p = 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float z) { return 1.f / (1.f + exp_approx(-z)); }

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
};

// The queries of one block of one (sample, key-value group) item: where each sees, the block's
// key range, and where its saved weights go.
struct Block {
  // item, first key row of the sample, first query (global), matrix rows (queries x hr), prefix
  // keys [0, kmax) read, heads per matrix row: with G = 1 the H heads of a query are adjacent rows
  // of q ([Tq * H, D]), so all heads go through one GEMM (hr = H); otherwise one head at a time
  // (hr = 1, rows strided by H * D). saved: first float of its weights in the saved buffer.
  int64_t item, kv0, q0, rows, kmax, hr, saved;
  Mask mask;
  int64_t query(int64_t row) const { return q0 + row / hr; }
  int64_t area() const { return rows * kmax; }
};

// Every block of a call, in item order. A pure function of the layout, so the backward rebuilds
// exactly the forward's blocks and finds each block's saved weights at the same offset.
struct Plan {
  std::vector<Block> blocks;
  std::vector<int64_t> item_first;  // item i's blocks: [item_first[i], item_first[i + 1])
  int64_t saved_floats = 0;         // one weights buffer: sum over blocks and head steps of rows x kmax
};

Plan make_plan(const Dims& dm, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
               const at::Tensor& q_prefix, const at::Tensor& q_self_local) {
  const int64_t B = q_offsets.size(0) - 1;
  const int64_t *qo = q_offsets.data_ptr<int64_t>(), *ko = kv_offsets.data_ptr<int64_t>();
  const int64_t *pre = q_prefix.data_ptr<int64_t>(), *self = q_self_local.data_ptr<int64_t>();
  const int64_t hr = dm.G == 1 ? dm.H : 1, head_steps = dm.r / hr;
  Plan plan;
  for (int64_t item = 0; item < B * dm.G; ++item) {
    plan.item_first.push_back(static_cast<int64_t>(plan.blocks.size()));
    const int64_t b = item / dm.G;
    const Mask mask{pre, self, ko[b + 1] - ko[b]};
    for (int64_t q0 = qo[b]; q0 < qo[b + 1]; q0 += kQueryBlock) {
      const int64_t q1 = std::min(q0 + kQueryBlock, qo[b + 1]);
      int64_t kmax = 0;
      for (int64_t i = q0; i < q1; ++i) kmax = std::max(kmax, mask.visible_prefix(i));  // self keys: apart
      plan.blocks.push_back({item, ko[b], q0, (q1 - q0) * hr, kmax, hr, plan.saved_floats, mask});
      plan.saved_floats += head_steps * plan.blocks.back().area();
    }
  }
  plan.item_first.push_back(static_cast<int64_t>(plan.blocks.size()));
  return plan;
}

// In place over a block's prefix scores s [rows, kmax]: s -> the attention weights
// p = silu(alpha s) / n on each row's visible prefix, 0 beyond it. With dp (the gradient w.r.t. p),
// also dp -> the gradient w.r.t. s (the backward without saved weights). With d (the forward that
// saves), d = dp/ds's factor inv_n * alpha * silu'(alpha s), 0 beyond the prefix, so the backward
// needs no scores: ds = dp * d.
void weights(const Block& blk, float alpha, float* s, float* dp, float* d) {
  for (int64_t r = 0; r < blk.rows; ++r) {
    const int64_t i = blk.query(r), pre = blk.mask.visible_prefix(i), tail = blk.kmax - pre;
    const float inv_n = blk.mask.inv_n(i);
    float* srow = s + r * blk.kmax;
    if (dp) {
      float* drow = dp + r * blk.kmax;
#pragma omp simd
      for (int64_t j = 0; j < pre; ++j) {
        const float z = alpha * srow[j], sg = sigmoid(z);
        srow[j] = z * sg * inv_n;
        drow[j] *= inv_n * sg * (1.f + z * (1.f - sg)) * alpha;
      }
      std::memset(drow + pre, 0, sizeof(float) * tail);
    } else if (d) {
      float* drow = d + r * blk.kmax;
#pragma omp simd
      for (int64_t j = 0; j < pre; ++j) {
        const float z = alpha * srow[j], sg = sigmoid(z);
        srow[j] = z * sg * inv_n;
        drow[j] = inv_n * sg * (1.f + z * (1.f - sg)) * alpha;
      }
      std::memset(drow + pre, 0, sizeof(float) * tail);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < pre; ++j) {
        const float z = alpha * srow[j];
        srow[j] = z * sigmoid(z) * inv_n;
      }
    }
    std::memset(srow + pre, 0, sizeof(float) * tail);
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
void self_keys(const Block& blk, float alpha, const Dims& dm, const Views& w) {
  const Mask& mask = blk.mask;
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

// Calls fn(block, h, s, dp, saved) for every (sample, group) item in parallel and, inside it in
// order, every query block and head (or, with G = 1, all heads at once from h = 0): s and dp are
// the thread's scratch of the block's size, saved the offset of this head's weights in the saved
// buffer.
template <typename Fn>
void for_each_block(const Dims& dm, const Plan& plan, Fn fn) {
  const int64_t items = static_cast<int64_t>(plan.item_first.size()) - 1;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, dp;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % dm.G;
      for (int64_t bi = plan.item_first[item]; bi < plan.item_first[item + 1]; ++bi) {
        const Block& blk = plan.blocks[bi];
        s.resize(static_cast<size_t>(blk.area()));
        dp.resize(static_cast<size_t>(blk.area()));
        const int64_t h_step = blk.hr == 1 ? 1 : dm.H;
        for (int64_t h = g * dm.r, step = 0; h < (g + 1) * dm.r; h += h_step, ++step)
          fn(blk, g, h, s.data(), dp.data(), blk.saved + step * blk.area());
      }
    }
  });
}

Views views(const Dims& dm, const Block& blk, int64_t g, int64_t h, const float* q, const float* k,
            const float* v, const float* go, float* out, float* dq, float* dk, float* dv) {
  const int64_t qoff = blk.q0 * dm.H + h, koff = blk.kv0 * dm.G + g;
  const int64_t hs = dm.H / blk.hr;  // row stride of q / out in heads
  auto at = [](auto* base, int64_t off) { return base ? base + off : nullptr; };
  return {q + qoff * dm.D, k + koff * dm.D, v + koff * dm.Dv, at(go, qoff * dm.Dv), at(out, qoff * dm.Dv),
          at(dq, qoff * dm.D), at(dk, koff * dm.D), at(dv, koff * dm.Dv),
          hs * dm.D, dm.G * dm.D, dm.G * dm.Dv, hs * dm.Dv};
}

void zero_rows(float* x, int64_t rows, int64_t ld, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) std::memset(x + r * ld, 0, sizeof(float) * width);
}

}  // namespace

// Returns {out, saved}. saved: the weights p and the factors d of every block ([2, floats]) when
// save_weights and they fit in max_saved_bytes, for a backward without the score GEMM and the
// sigmoids; else empty, and the backward recomputes them (the same arithmetic: equal gradients).
std::vector<at::Tensor> hstu_cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                                         const at::Tensor& q_prefix, const at::Tensor& q_self_local, double alpha,
                                         bool save_weights, int64_t max_saved_bytes) {
  const Dims dm = dims_of(q, k, v);
  check_layout(q, k, q_offsets, kv_offsets, q_prefix, q_self_local);
  const Plan plan = make_plan(dm, q_offsets, kv_offsets, q_prefix, q_self_local);
  const bool save = save_weights && plan.saved_floats * 2 * static_cast<int64_t>(sizeof(float)) <= max_saved_bytes;
  auto saved = at::empty({save ? 2 : 0, save ? plan.saved_floats : 0}, q.options());
  auto out = at::empty({q.size(0), dm.H, dm.Dv}, q.options());  // every row is written (GEMM or zero_rows)
  const float a = static_cast<float>(alpha);
  float *p_saved = save ? saved.data_ptr<float>() : nullptr, *d_saved = save ? p_saved + plan.saved_floats : nullptr;
  for_each_block(dm, plan, [&](const Block& blk, int64_t g, int64_t h, float* s, float*, int64_t off) {
    const Views w = views(dm, blk, g, h, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), nullptr,
                          out.data_ptr<float>(), nullptr, nullptr, nullptr);
    if (blk.kmax > 0) {
      float* p = save ? p_saved + off : s;
      gemm(false, true, blk.rows, blk.kmax, dm.D, w.q, w.ldq, w.k, w.ldk, 0.f, p, blk.kmax);
      weights(blk, a, p, nullptr, save ? d_saved + off : nullptr);
      gemm(false, false, blk.rows, dm.Dv, blk.kmax, p, blk.kmax, w.v, w.ldv, 0.f, w.out, w.ldo);
    } else {  // the rows stay 0 but for their self keys
      zero_rows(w.out, blk.rows, w.ldo, dm.Dv);
    }
    self_keys(blk, a, dm, w);
  });
  return {out, saved};
}

std::vector<at::Tensor> hstu_cpu_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& q_offsets,
                                          const at::Tensor& kv_offsets, const at::Tensor& q_prefix,
                                          const at::Tensor& q_self_local, double alpha, const at::Tensor& saved) {
  const Dims dm = dims_of(q, k, v);
  check_layout(q, k, q_offsets, kv_offsets, q_prefix, q_self_local);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({q.size(0), dm.H, dm.Dv}), "grad_out: shape of the output");
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat, "grad_out: contiguous float32");
  const Plan plan = make_plan(dm, q_offsets, kv_offsets, q_prefix, q_self_local);
  const bool use_saved = saved.numel() > 0;
  TORCH_CHECK(!use_saved || (saved.dim() == 2 && saved.size(0) == 2 && saved.size(1) == plan.saved_floats &&
                             saved.is_contiguous() && saved.scalar_type() == at::kFloat),
              "hstu_cpu: saved weights do not match this layout (forward and backward layouts differ)");
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);  // dq rows: GEMM or zero_rows
  const float a = static_cast<float>(alpha);
  const float* p_saved = use_saved ? saved.data_ptr<float>() : nullptr;
  const float* d_saved = use_saved ? p_saved + plan.saved_floats : nullptr;
  for_each_block(dm, plan, [&](const Block& blk, int64_t g, int64_t h, float* s, float* dp, int64_t off) {
    const Views w = views(dm, blk, g, h, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                          grad_out.data_ptr<float>(), nullptr, dq.data_ptr<float>(), dk.data_ptr<float>(),
                          dv.data_ptr<float>());
    if (blk.kmax > 0) {
      gemm(false, true, blk.rows, blk.kmax, dm.Dv, w.go, w.ldo, w.v, w.ldv, 0.f, dp, blk.kmax);  // d weights
      const float* p = s;
      if (use_saved) {  // d scores = d weights x the saved factors
        p = p_saved + off;
        const float* d = d_saved + off;
#pragma omp simd
        for (int64_t j = 0; j < blk.area(); ++j) dp[j] *= d[j];
      } else {  // recompute the scores, then p and d scores
        gemm(false, true, blk.rows, blk.kmax, dm.D, w.q, w.ldq, w.k, w.ldk, 0.f, s, blk.kmax);
        weights(blk, a, s, dp, nullptr);
      }
      gemm(true, false, blk.kmax, dm.Dv, blk.rows, p, blk.kmax, w.go, w.ldo, 1.f, w.dv, w.ldv);
      gemm(false, false, blk.rows, dm.D, blk.kmax, dp, blk.kmax, w.k, w.ldk, 0.f, w.dq, w.ldq);
      gemm(true, false, blk.kmax, dm.D, blk.rows, dp, blk.kmax, w.q, w.ldq, 1.f, w.dk, w.ldk);
    } else {
      zero_rows(w.dq, blk.rows, w.ldq, dm.D);
    }
    self_keys(blk, a, dm, w);  // after the dq GEMM, which overwrites the rows
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &hstu_cpu_forward, "fused HSTU attention forward (CPU, float32): {out, saved weights}");
  m.def("backward", &hstu_cpu_backward, "fused HSTU attention backward (CPU, float32)");
}
