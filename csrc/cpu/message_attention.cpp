// CFA on the CPU: LayerNorm, one packed q/k/v GEMM, attention over each video's T messages,
// and one GEMM that applies the output projection while accumulating the residual.
//
// The messages are a handful of rows (b*T), so the unfused PyTorch path is dominated by
// per-op dispatch, small allocations and BLAS packing of the weights rather than arithmetic:
// here the whole step is four calls from C++, the two projections of float32 messages run on
// register tiles that read each weight row once (skinny_linear; the output projection adds
// the bias and the residual as it stores), and the T x T attention of every (video, head)
// runs in one parallel loop reading q/k/v straight out of the packed projection.
//
// The backward keeps nothing from the forward (the op returns only its output): it recomputes
// LayerNorm and the q/k/v projection, then runs the attention's backward in one parallel loop
// and the four weight-sized GEMMs on register tiles of their own (few rows: BLAS spends these
// packing the big operand), a dozen calls in all instead of autograd replaying the unfused graph.
//
// bfloat16 runs the same float32 arithmetic: the messages and the vectors are widened (a few
// hundred rows), the projection weights are read as bf16 by the tiles and widened in
// registers, so the bf16 op moves half the weight bytes and copies no weight per call.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../xclip_ops.h"
#include "simd_kernels.h"

namespace xclip_ext {
namespace {

// Each query row's softmax over the video's T keys of head h, scaled scores in, probabilities
// out (probs has T entries).
template <typename T>
void softmax_over_frames(const T* q, const T* rows, int64_t row_stride, int64_t key_offset, int64_t num_frames,
                         int64_t dim, T scale, T* probs) {
  T m = -std::numeric_limits<T>::infinity();  // all -inf scores give NaN, as in the reference
  for (int64_t s = 0; s < num_frames; ++s) {
    const T* key = rows + s * row_stride + key_offset;
    T sum = 0;
    for (int64_t d = 0; d < dim; ++d) sum += q[d] * key[d];
    probs[s] = sum * scale;
    m = std::max(m, probs[s]);
  }
  T total = 0;
  for (int64_t s = 0; s < num_frames; ++s) {
    probs[s] = std::exp(probs[s] - m);
    total += probs[s];
  }
  const T inverse = T(1) / total;
  for (int64_t s = 0; s < num_frames; ++s) probs[s] *= inverse;
}

// mixed (F, W) = softmax(q k^T / sqrt(D)) v of every (video, head), reading q, k, v out of qkv (F, 3W).
template <typename T>
void attend_over_frames(const at::Tensor& qkv, at::Tensor& mixed, int64_t num_frames, int64_t num_heads) {
  const int64_t frames = qkv.size(0), width = qkv.size(1) / 3, dim = width / num_heads;
  const int64_t videos = frames / num_frames;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dim)));
  const T* base = qkv.data_ptr<T>();
  T* outp = mixed.data_ptr<T>();
  at::parallel_for(0, videos * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(num_frames);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t video = task / num_heads, h = task % num_heads;
      const T* rows = base + video * num_frames * 3 * width;
      for (int64_t t = 0; t < num_frames; ++t) {
        softmax_over_frames(rows + t * 3 * width + h * dim, rows, 3 * width, width + h * dim, num_frames, dim, scale,
                            probs.data());
        T* o = outp + (video * num_frames + t) * width + h * dim;
        std::fill(o, o + dim, T(0));
        for (int64_t s = 0; s < num_frames; ++s) {
          const T* value = rows + s * 3 * width + 2 * width + h * dim;
          const T p = probs[s];
          for (int64_t d = 0; d < dim; ++d) o[d] += p * value[d];
        }
      }
    }
  });
}

// The gradient of attend_over_frames: from qkv (F, 3W) and d_mixed (F, W), writes every
// element of d_qkv (F, 3W), and the forward's mixed (F, W) again from the same probabilities
// (the output projection's weight gradient needs it). Each (video, head) recomputes its T x T
// probabilities and owns its columns of d_qkv and mixed, so the tasks write disjoint memory.
template <typename T>
void attend_over_frames_backward(const at::Tensor& qkv, const at::Tensor& d_mixed, at::Tensor& d_qkv,
                                 at::Tensor& mixed, int64_t num_frames, int64_t num_heads) {
  const int64_t frames = qkv.size(0), width = qkv.size(1) / 3, dim = width / num_heads;
  const int64_t videos = frames / num_frames, row = 3 * width;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dim)));
  const T* base = qkv.data_ptr<T>();
  const T* grad_base = d_mixed.data_ptr<T>();
  T* d_base = d_qkv.data_ptr<T>();
  T* mixed_base = mixed.data_ptr<T>();
  at::parallel_for(0, videos * num_heads, 1, [&](int64_t begin, int64_t end) {
    // probs[t][s] and then d_scores[t][s] (already multiplied by the scale), row-major.
    std::vector<T> probs(num_frames * num_frames), d_scores(num_frames * num_frames);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t video = task / num_heads, h = task % num_heads;
      const T* rows = base + video * num_frames * row;
      const T* grads = grad_base + video * num_frames * width + h * dim;  // d_mixed rows of this head
      T* d_rows = d_base + video * num_frames * row;
      const auto q_of = [&](int64_t t) { return rows + t * row + h * dim; };
      const auto k_of = [&](int64_t t) { return rows + t * row + width + h * dim; };
      const auto v_of = [&](int64_t t) { return rows + t * row + 2 * width + h * dim; };
      for (int64_t t = 0; t < num_frames; ++t) {
        T* p = probs.data() + t * num_frames;
        softmax_over_frames(q_of(t), rows, row, width + h * dim, num_frames, dim, scale, p);
        T* o = mixed_base + (video * num_frames + t) * width + h * dim;
        std::fill(o, o + dim, T(0));
        for (int64_t s = 0; s < num_frames; ++s) {
          const T* value = v_of(s);
          for (int64_t d = 0; d < dim; ++d) o[d] += p[s] * value[d];
        }
        // dP[t][s] = dO_t . v_s; the softmax backward subtracts sum_s P dP from every column.
        T* ds = d_scores.data() + t * num_frames;
        const T* g = grads + t * width;
        T weighted = 0;
        for (int64_t s = 0; s < num_frames; ++s) {
          const T* value = v_of(s);
          T dp = 0;
          for (int64_t d = 0; d < dim; ++d) dp += g[d] * value[d];
          ds[s] = dp;
          weighted += p[s] * dp;
        }
        for (int64_t s = 0; s < num_frames; ++s) ds[s] = p[s] * (ds[s] - weighted) * scale;
      }
      for (int64_t t = 0; t < num_frames; ++t) {
        // dq_t = sum_s dS[t][s] k_s; dk_t = sum_s dS[s][t] q_s; dv_t = sum_s P[s][t] dO_s.
        T* dq = d_rows + t * row + h * dim;
        T* dk = dq + width;
        T* dv = dq + 2 * width;
        std::fill(dq, dq + dim, T(0));
        std::fill(dk, dk + dim, T(0));
        std::fill(dv, dv + dim, T(0));
        for (int64_t s = 0; s < num_frames; ++s) {
          const T to_key = d_scores[t * num_frames + s], from_query = d_scores[s * num_frames + t];
          const T from_prob = probs[s * num_frames + t];
          const T *key = k_of(s), *query = q_of(s), *g = grads + s * width;
          for (int64_t d = 0; d < dim; ++d) {
            dq[d] += to_key * key[d];
            dk[d] += from_query * query[d];
            dv[d] += from_prob * g[d];
          }
        }
      }
    }
  });
}

// A bf16 tensor's elements as their bits, the form the tiles take them in.
const uint16_t* bf16_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

// out = x weight^T + bias (+ residual): the register tiles for float32 x of the shapes they
// handle, else one addmm. The weight has x's dtype or, with float32 x, is bf16: the tiles read
// it as stored; the addmm (a shape the tiles do not take, a build without them) gets a float32
// copy of it. All tensors contiguous; residual may be undefined.
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual) {
  const int64_t rows = x.size(0), inner = x.size(1), outputs = weight.size(0);
  if (x.scalar_type() == at::kFloat && skinny_linear_supports(rows, inner)) {
    auto out = at::empty({rows, outputs}, x.options());
    const float* res = residual.defined() ? residual.data_ptr<float>() : nullptr;
    if (weight.scalar_type() == at::kBFloat16)
      skinny_linear(SkinnyLinearBf16{x.data_ptr<float>(), rows, inner, bf16_bits(weight), outputs,
                                     bias.data_ptr<float>(), res, out.data_ptr<float>()});
    else
      skinny_linear(SkinnyLinear{x.data_ptr<float>(), rows, inner, weight.data_ptr<float>(), outputs,
                                 bias.data_ptr<float>(), res, out.data_ptr<float>()});
    return out;
  }
  return at::addmm(residual.defined() ? residual + bias : bias, x, weight.t().to(x.scalar_type()));
}

// The weight gradient a^T b of a linear layer, a (F, outputs) and b (F, inputs) contiguous, in
// the weight's dtype: a's, or bf16 with float32 a and b (the tiles round each float32 sum to
// bf16 as they store it; no float32 result the size of the weight).
at::Tensor weight_grad(const at::Tensor& a, const at::Tensor& b, at::ScalarType weight_dtype) {
  if (a.scalar_type() != at::kFloat || !skinny_linear_grad_supports(a.size(0), b.size(1)))
    return at::mm(a.t(), b).to(weight_dtype);
  if (weight_dtype == at::kBFloat16) {
    auto out = at::empty({a.size(1), b.size(1)}, a.options().dtype(at::kBFloat16));
    skinny_weight_grad(SkinnyWeightGradBf16{a.data_ptr<float>(), b.data_ptr<float>(), a.size(0), a.size(1), b.size(1),
                                            reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())});
    return out;
  }
  auto out = at::empty({a.size(1), b.size(1)}, a.options());
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 != 0) return at::mm_out(out, a.t(), b);  // not torch's allocator
  skinny_weight_grad(SkinnyWeightGrad{a.data_ptr<float>(), b.data_ptr<float>(), a.size(0), a.size(1), b.size(1),
                                      out.data_ptr<float>()});
  return out;
}

// The input gradient g weight of a linear layer, g (F, outputs) and weight (outputs, inputs)
// contiguous; the weight has g's dtype or, with float32 g, is bf16 (read as in project).
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& weight) {
  if (grad.scalar_type() != at::kFloat || !skinny_linear_grad_supports(grad.size(0), weight.size(1)))
    return at::mm(grad, weight.to(grad.scalar_type()));
  auto out = at::empty({grad.size(0), weight.size(1)}, grad.options());
  if (weight.scalar_type() == at::kBFloat16)
    skinny_input_grad(SkinnyInputGradBf16{grad.data_ptr<float>(), grad.size(0), grad.size(1), bf16_bits(weight),
                                          weight.size(1), out.data_ptr<float>()});
  else
    skinny_input_grad(SkinnyInputGrad{grad.data_ptr<float>(), grad.size(0), grad.size(1), weight.data_ptr<float>(),
                                      weight.size(1), out.data_ptr<float>()});
  return out;
}

}  // namespace

at::Tensor message_attention_forward_cpu(const at::Tensor& messages, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                                         const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                         const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads,
                                         double eps) {
  if (messages.scalar_type() == at::kBFloat16) {
    // Computed in float32, the output rounded once. The messages (a few hundred rows), the
    // LayerNorm parameters and the biases (vectors) are widened here; the two projection
    // weights stay bf16 and the tiles widen them in registers (project), so no weight-sized
    // copy is made per call (but where the tiles are not built or do not take the shape).
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    return message_attention_forward_cpu(f(messages), f(ln_weight), f(ln_bias), in_proj_weight, f(in_proj_bias),
                                         out_proj_weight, f(out_proj_bias), num_frames, num_heads, eps)
        .to(at::kBFloat16);
  }
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kFloat || messages.scalar_type() == at::kDouble,
                    "messages: the cpp backend computes in float32, float64 or bfloat16, got ", messages.scalar_type());
  const int64_t width = messages.size(1);
  // The tiles read plain row-major memory (no-ops for the contiguous tensors the op passes).
  const auto residual = messages.contiguous();
  const auto normed = at::layer_norm(residual, {width}, ln_weight, ln_bias, eps);
  const auto qkv = project(normed, in_proj_weight.contiguous(), in_proj_bias.contiguous(), at::Tensor());
  auto mixed = at::empty_like(residual);
  AT_DISPATCH_FLOATING_TYPES(messages.scalar_type(), "message_attention_forward_cpu",
                             [&] { attend_over_frames<scalar_t>(qkv, mixed, num_frames, num_heads); });
  return project(mixed, out_proj_weight.contiguous(), out_proj_bias.contiguous(), residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
message_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& messages, const at::Tensor& ln_weight,
                               const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                               const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                               int64_t num_frames, int64_t num_heads, double eps) {
  if (messages.scalar_type() == at::kBFloat16) {
    // As the forward: float32 inside (accumulation included), the weights read as bf16 by the
    // projection and input-gradient tiles, each gradient rounded once (the weight gradients
    // by their tiles as they are stored: the .to below leaves those as they are).
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const auto b = [](const at::Tensor& t) { return t.to(at::kBFloat16); };
    const auto grads = message_attention_backward_cpu(f(grad_out), f(messages), f(ln_weight), f(ln_bias),
                                                      in_proj_weight, f(in_proj_bias), out_proj_weight,
                                                      num_frames, num_heads, eps);
    return {b(std::get<0>(grads)), b(std::get<1>(grads)), b(std::get<2>(grads)), b(std::get<3>(grads)),
            b(std::get<4>(grads)), b(std::get<5>(grads)), b(std::get<6>(grads))};
  }
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kFloat || messages.scalar_type() == at::kDouble,
                    "messages: the cpp backend computes in float32, float64 or bfloat16, got ", messages.scalar_type());
  const int64_t width = messages.size(1);
  const auto input = messages.contiguous(), grad = grad_out.contiguous();
  const auto in_w = in_proj_weight.contiguous(), out_w = out_proj_weight.contiguous();
  const auto [normed, mean, rstd] = at::native_layer_norm(input, {width}, ln_weight, ln_bias, eps);
  const auto qkv = project(normed, in_w, in_proj_bias.contiguous(), at::Tensor());
  auto mixed = at::empty_like(input);
  auto d_qkv = at::empty_like(qkv);
  const auto d_mixed = input_grad(grad, out_w);  // (F, W)
  AT_DISPATCH_FLOATING_TYPES(messages.scalar_type(), "message_attention_backward_cpu", [&] {
    attend_over_frames_backward<scalar_t>(qkv, d_mixed, d_qkv, mixed, num_frames, num_heads);
  });
  auto d_out_proj_weight = weight_grad(grad, mixed, out_w.scalar_type());
  auto d_out_proj_bias = grad.sum(0);
  auto d_in_proj_weight = weight_grad(d_qkv, normed, in_w.scalar_type());
  auto d_in_proj_bias = d_qkv.sum(0);
  const auto d_normed = input_grad(d_qkv, in_w);
  auto [d_messages, d_ln_weight, d_ln_bias] = at::native_layer_norm_backward(
      d_normed, input, {width}, mean, rstd, ln_weight, ln_bias, {true, true, true});
  d_messages.add_(grad);  // the residual
  return {d_messages, d_ln_weight, d_ln_bias, d_in_proj_weight, d_in_proj_bias, d_out_proj_weight, d_out_proj_bias};
}

}  // namespace xclip_ext
