// IFA on the CPU: one task per (frame, head), run in parallel with at::parallel_for.
//
// float32 with a head dim that is a multiple of 16 (every X-CLIP variant) runs forward and
// backward on the register tiles of simd_kernels.cpp (AVX-512 or AVX2) where the build has them
// (x86-64). This file holds the general path for the rest (float64 for gradcheck, other head
// dims, and every shape of a build without the tiles) and the entry points.
//
// In the general path a frame-head is small (N <= 577 rows of D = 64), so each task works on dense N x N score
// tiles with the BLAS that torch itself uses (the sgemm_/dgemm_ entry points exported by
// libtorch_cpu, resolved once with dlsym), and keeps the glue passes (softmax, the message
// column, the softmax-backward correction) as short vectorised loops over contiguous rows.
// Query, key, value and gradient rows are gathered from their strides into task-local
// buffers (q/k/v views of one fused QKV tensor cost nothing more) and outputs are written
// straight into the (F, N, H, D) results through the BLAS leading dimension: no cat, no
// message query row, and the message key/value enter the softmax as one more column.
// Accumulation is in the input type: float for float32, double for float64 (gradcheck).
#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../xclip_ops.h"
#include "bf16_tiles.h"
#include "simd_kernels.h"

namespace xclip_ext {
namespace {

// Fortran BLAS: column-major. A row-major (r x c) matrix with row stride ld is the
// column-major (c x r) matrix with leading dimension ld.
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*, const int*);

template <typename T>
struct Blas;

template <>
struct Blas<float> {
  static sgemm_t fn() {
    static const auto f = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    return f;
  }
};

template <>
struct Blas<double> {
  static dgemm_t fn() {
    static const auto f = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
    return f;
  }
};

// Inside our parallel tasks every GEMM must run on the calling thread: MKL's own threads
// on top of at::parallel_for's oversubscribe the cores (seen as 50x slow outliers).
class SequentialBlas {
 public:
  SequentialBlas() {
    static const auto set_local = reinterpret_cast<int (*)(int)>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    set_local_ = set_local;
    if (set_local_ != nullptr) previous_ = set_local_(1);
  }
  ~SequentialBlas() {
    if (set_local_ != nullptr) set_local_(previous_);
  }

 private:
  int (*set_local_)(int) = nullptr;
  int previous_ = 0;
};

// C (m x n, col-major, ldc) = alpha op(A) op(B) + beta C, with op given by 'N' or 'T'.
template <typename T>
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  Blas<T>::fn()(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

inline RowStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

inline HeadStrides head_strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

template <typename T>
void gather_rows(const T* base, RowStrides s, int64_t f, int64_t h, int64_t rows, int64_t dim, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = base + f * s.f + h * s.h + i * s.n;
    std::copy(src, src + dim, out + i * dim);
  }
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& msg_k,
                    const at::Tensor& msg_v, double scale_d, at::Tensor& out, at::Tensor& lse) {
  const int64_t frames = q.size(0), tokens = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t row_stride = heads * dim;  // of out: (F, N, H, D) contiguous
  const T scale = static_cast<T>(scale_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* mkp = msg_k.data_ptr<T>();
  const T* mvp = msg_v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();  // lse in the compute type: float32, or float64 for double inputs
  const RowStrides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v);
  const int64_t smk_f = msg_k.stride(0), smk_h = msg_k.stride(1), smv_f = msg_v.stride(0), smv_h = msg_v.stride(1);

  at::parallel_for(0, frames * heads, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> queries(tokens * dim), keys(tokens * dim), values(tokens * dim), probs(tokens * tokens);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t f = task / heads, h = task % heads;
      gather_rows(qp, sq, f, h, tokens, dim, queries.data());
      gather_rows(kp, sk, f, h, tokens, dim, keys.data());
      gather_rows(vp, sv, f, h, tokens, dim, values.data());
      const T* mk = mkp + f * smk_f + h * smk_h;
      const T* mv = mvp + f * smv_f + h * smv_h;
      T* o = op + f * tokens * row_stride + h * dim;
      // S (N x N, row-major) = scale Q K^T.
      gemm<T>('T', 'N', tokens, tokens, dim, scale, keys.data(), dim, queries.data(), dim, T(0), probs.data(), tokens);
      std::vector<T> inverse(tokens);
      for (int64_t i = 0; i < tokens; ++i) {
        T* s = probs.data() + i * tokens;
        const T s_msg = scale * dot(queries.data() + i * dim, mk, dim);
        T m = s_msg;
        for (int64_t j = 0; j < tokens; ++j) m = std::max(m, s[j]);
        T sum = 0;
        for (int64_t j = 0; j < tokens; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        const T p_msg = std::exp(s_msg - m);
        sum += p_msg;
        inverse[i] = T(1) / sum;
        T* row = o + i * row_stride;
        for (int64_t d = 0; d < dim; ++d) row[d] = p_msg * mv[d];  // the message column's share
        lp[(f * heads + h) * tokens + i] = m + std::log(sum);
      }
      // O += P V (unnormalised), written in place with the output's row stride; then 1 / l.
      gemm<T>('N', 'N', dim, tokens, tokens, T(1), values.data(), dim, probs.data(), tokens, T(1), o, row_stride);
      for (int64_t i = 0; i < tokens; ++i) {
        T* row = o + i * row_stride;
        for (int64_t d = 0; d < dim; ++d) row[d] *= inverse[i];
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out,
                     const at::Tensor& lse, double scale_d, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     at::Tensor& dmk, at::Tensor& dmv) {
  const int64_t frames = q.size(0), tokens = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t row_stride = heads * dim;
  const T scale = static_cast<T>(scale_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* mkp = msg_k.data_ptr<T>();
  const T* mvp = msg_v.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  T* dmkp = dmk.data_ptr<T>();
  T* dmvp = dmv.data_ptr<T>();
  const RowStrides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), sg = strides_of(grad_out),
                   so = strides_of(out);
  const int64_t smk_f = msg_k.stride(0), smk_h = msg_k.stride(1), smv_f = msg_v.stride(0), smv_h = msg_v.stride(1);

  at::parallel_for(0, frames * heads, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> queries(tokens * dim), keys(tokens * dim), values(tokens * dim), grads(tokens * dim);
    std::vector<T> probs(tokens * tokens), dprobs(tokens * tokens);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t f = task / heads, h = task % heads;
      gather_rows(qp, sq, f, h, tokens, dim, queries.data());
      gather_rows(kp, sk, f, h, tokens, dim, keys.data());
      gather_rows(vp, sv, f, h, tokens, dim, values.data());
      gather_rows(gp, sg, f, h, tokens, dim, grads.data());
      const T* mk = mkp + f * smk_f + h * smk_h;
      const T* mv = mvp + f * smv_f + h * smv_h;
      T* dmk_fh = dmkp + (f * heads + h) * dim;
      T* dmv_fh = dmvp + (f * heads + h) * dim;
      T* dq_fh = dqp + f * tokens * row_stride + h * dim;
      // P = exp(scale Q K^T - lse) and dP = dO V^T, both N x N row-major.
      gemm<T>('T', 'N', tokens, tokens, dim, scale, keys.data(), dim, queries.data(), dim, T(0), probs.data(), tokens);
      gemm<T>('T', 'N', tokens, tokens, dim, T(1), values.data(), dim, grads.data(), dim, T(0), dprobs.data(), tokens);
      for (int64_t i = 0; i < tokens; ++i) {
        const T* qi = queries.data() + i * dim;
        const T* gi = grads.data() + i * dim;
        const T* oi = op + f * so.f + h * so.h + i * so.n;
        const T row_lse = lp[(f * heads + h) * tokens + i];
        const T delta = dot(gi, oi, dim);  // sum_d dO O: the softmax-backward correction
        T* p = probs.data() + i * tokens;
        T* ds = dprobs.data() + i * tokens;  // dP becomes dS = P (dP - delta) in place
        for (int64_t j = 0; j < tokens; ++j) {
          p[j] = std::exp(p[j] - row_lse);
          ds[j] = p[j] * (ds[j] - delta);
        }
        const T p_msg = std::exp(scale * dot(qi, mk, dim) - row_lse);
        const T ds_msg = p_msg * (dot(gi, mv, dim) - delta);
        T* dqi = dq_fh + i * row_stride;
        for (int64_t d = 0; d < dim; ++d) {
          dqi[d] = scale * ds_msg * mk[d];
          dmv_fh[d] += p_msg * gi[d];
          dmk_fh[d] += scale * ds_msg * qi[d];
        }
      }
      // dV = P^T dO, dK = scale dS^T Q, dQ += scale dS K: written through the row stride.
      gemm<T>('N', 'T', dim, tokens, tokens, T(1), grads.data(), dim, probs.data(), tokens, T(0),
              dvp + f * tokens * row_stride + h * dim, row_stride);
      gemm<T>('N', 'T', dim, tokens, tokens, scale, queries.data(), dim, dprobs.data(), tokens, T(0),
              dkp + f * tokens * row_stride + h * dim, row_stride);
      gemm<T>('N', 'N', dim, tokens, tokens, scale, keys.data(), dim, dprobs.data(), tokens, T(1), dq_fh, row_stride);
    }
  });
}


FusedForward fused_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& msg_k,
                           const at::Tensor& msg_v, double scale, at::Tensor& out, at::Tensor& lse) {
  return FusedForward{q.size(0), q.size(1), q.size(2), q.size(3), static_cast<float>(scale),
                      q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), msg_k.data_ptr<float>(),
                      msg_v.data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), head_strides_of(msg_k),
                      head_strides_of(msg_v),
                      out.data_ptr<float>(), lse.data_ptr<float>(), q.size(2) * q.size(3)};
}

void check_cpu_dtype(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || q.scalar_type() == at::kBFloat16,
                    "q: the cpp backend computes in float32, float64 or bfloat16, got ", q.scalar_type());
}

// bf16 tensors as their bits (bf16_tiles.h).
inline const uint16_t* bits_of(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
inline uint16_t* bits_of(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// bf16 in, bf16 out, lse float32: on the tiles for head dims they take; elsewhere (other head
// dims, builds without the tiles) widened to float32 copies, run on the float32 path and the
// output rounded once, which is as accurate and the rare case.
std::tuple<at::Tensor, at::Tensor> forward_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& msg_k, const at::Tensor& msg_v, double scale) {
  if (!bf16_tiles_support(q.size(3))) {
    auto [out, lse] = frame_attention_forward_cpu(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat),
                                                  msg_k.to(at::kFloat), msg_v.to(at::kFloat), scale);
    return {out.to(at::kBFloat16), lse};
  }
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  bf16_forward(Bf16Forward{q.size(0), q.size(1), q.size(2), q.size(3), static_cast<float>(scale), bits_of(q),
                           bits_of(k), bits_of(v), bits_of(msg_k), bits_of(msg_v), strides_of(q), strides_of(k),
                           strides_of(v), head_strides_of(msg_k), head_strides_of(msg_v), bits_of(out),
                           lse.data_ptr<float>(), q.size(2) * q.size(3)});
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_bf16(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse, double scale) {
  if (!bf16_tiles_support(q.size(3))) {
    auto grads = frame_attention_backward_cpu(grad_out.to(at::kFloat), q.to(at::kFloat), k.to(at::kFloat),
                                              v.to(at::kFloat), msg_k.to(at::kFloat), msg_v.to(at::kFloat),
                                              out.to(at::kFloat), lse, scale);
    return {std::get<0>(grads).to(at::kBFloat16), std::get<1>(grads).to(at::kBFloat16),
            std::get<2>(grads).to(at::kBFloat16), std::get<3>(grads).to(at::kBFloat16),
            std::get<4>(grads).to(at::kBFloat16)};
  }
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(q.sizes(), q.options());
  auto dv = at::empty(q.sizes(), q.options());
  auto dmk = at::empty(msg_k.sizes(), q.options());  // every element written, as dq
  auto dmv = at::empty(msg_v.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv, dmk.zero_(), dmv.zero_()};
  bf16_backward(Bf16Backward{q.size(0), q.size(1), q.size(2), q.size(3), static_cast<float>(scale), bits_of(q),
                             bits_of(k), bits_of(v), bits_of(msg_k), bits_of(msg_v), bits_of(out), bits_of(grad_out),
                             lse.data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), strides_of(out),
                             strides_of(grad_out), head_strides_of(msg_k), head_strides_of(msg_v), bits_of(dq),
                             bits_of(dk), bits_of(dv), bits_of(dmk), bits_of(dmv), q.size(2) * q.size(3)});
  return {dq, dk, dv, dmk, dmv};
}

}  // namespace

bool cpu_blas_available() { return Blas<float>::fn() != nullptr && Blas<double>::fn() != nullptr; }

std::tuple<at::Tensor, at::Tensor> frame_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& msg_k,
                                                               const at::Tensor& msg_v, double scale) {
  check_cpu_dtype(q);
  TORCH_CHECK(cpu_blas_available(), "frame_attention: no sgemm_/dgemm_ BLAS symbol in this torch build");
  if (q.scalar_type() == at::kBFloat16) return forward_bf16(q, k, v, msg_k, msg_v, scale);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options());
  if (q.numel() == 0) return {out, lse};
  if (q.scalar_type() == at::kFloat && fused_forward_supports(q.size(3))) {
    fused_forward(fused_problem(q, k, v, msg_k, msg_v, scale, out, lse));
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "frame_attention_forward_cpu",
                             [&] { forward_kernel<scalar_t>(q, k, v, msg_k, msg_v, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  check_cpu_dtype(q);
  TORCH_CHECK(cpu_blas_available(), "frame_attention_backward: no sgemm_/dgemm_ BLAS symbol in this torch build");
  if (q.scalar_type() == at::kBFloat16) return backward_bf16(grad_out, q, k, v, msg_k, msg_v, out, lse, scale);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(q.sizes(), q.options());
  auto dv = at::empty(q.sizes(), q.options());
  auto dmk = at::zeros(msg_k.sizes(), q.options());
  auto dmv = at::zeros(msg_v.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv, dmk, dmv};
  if (q.scalar_type() == at::kFloat && fused_forward_supports(q.size(3))) {
    // lse is contiguous (checked at the binding).
    fused_backward(FusedBackward{q.size(0), q.size(1), q.size(2), q.size(3), static_cast<float>(scale),
                                 q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), msg_k.data_ptr<float>(),
                                 msg_v.data_ptr<float>(), out.data_ptr<float>(), grad_out.data_ptr<float>(),
                                 lse.data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), strides_of(out),
                                 strides_of(grad_out), head_strides_of(msg_k), head_strides_of(msg_v),
                                 dq.data_ptr<float>(), dk.data_ptr<float>(),
                                 dv.data_ptr<float>(), dmk.data_ptr<float>(), dmv.data_ptr<float>(),
                                 q.size(2) * q.size(3)});
    return {dq, dk, dv, dmk, dmv};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "frame_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, msg_k, msg_v, out, lse, scale, dq, dk, dv, dmk, dmv);
  });
  return {dq, dk, dv, dmk, dmv};
}

}  // namespace xclip_ext
