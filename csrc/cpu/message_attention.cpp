// CFA on the CPU: LayerNorm, one packed q/k/v GEMM, attention over each video's T messages,
// and one GEMM that applies the output projection while accumulating the residual.
//
// The messages are a handful of rows (b*T), so the unfused PyTorch path is dominated by
// per-op dispatch, small allocations and BLAS packing of the weights rather than arithmetic:
// here the whole step is four calls from C++, the two projections of float32 messages run on
// register tiles that read each weight row once (skinny_linear; the output projection adds
// the bias and the residual as it stores), and the T x T attention of every (video, head)
// runs in one parallel loop reading q/k/v straight out of the packed projection.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../xclip_ops.h"
#include "simd_kernels.h"

namespace xclip_ext {
namespace {

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
        const T* q = rows + t * 3 * width + h * dim;
        T m = std::numeric_limits<T>::lowest();  // finite: the file builds with -ffast-math
        for (int64_t s = 0; s < num_frames; ++s) {
          const T* key = rows + s * 3 * width + width + h * dim;
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
        T* o = outp + (video * num_frames + t) * width + h * dim;
        std::fill(o, o + dim, T(0));
        for (int64_t s = 0; s < num_frames; ++s) {
          const T* value = rows + s * 3 * width + 2 * width + h * dim;
          const T p = probs[s] / total;
          for (int64_t d = 0; d < dim; ++d) o[d] += p * value[d];
        }
      }
    }
  });
}

}  // namespace

at::Tensor message_attention_forward_cpu(const at::Tensor& messages, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                                         const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                         const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads,
                                         double eps) {
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kFloat || messages.scalar_type() == at::kDouble,
                    "messages: the cpp backend computes in float32 or float64, got ", messages.scalar_type());
  const int64_t frames = messages.size(0), width = messages.size(1);
  const auto normed = at::layer_norm(messages, {width}, ln_weight, ln_bias, eps);
  auto mixed = at::empty_like(messages, at::MemoryFormat::Contiguous);
  if (messages.scalar_type() == at::kFloat && skinny_linear_supports(frames, width)) {
    // The tiles read plain row-major memory (no-ops for the contiguous tensors the op passes).
    const auto in_w = in_proj_weight.contiguous(), in_b = in_proj_bias.contiguous();
    const auto out_w = out_proj_weight.contiguous(), out_b = out_proj_bias.contiguous();
    const auto residual = messages.contiguous();
    auto qkv = at::empty({frames, 3 * width}, messages.options());
    skinny_linear({normed.data_ptr<float>(), frames, width, in_w.data_ptr<float>(), 3 * width, in_b.data_ptr<float>(),
                   nullptr, qkv.data_ptr<float>()});
    attend_over_frames<float>(qkv, mixed, num_frames, num_heads);
    auto out = at::empty_like(mixed);
    skinny_linear({mixed.data_ptr<float>(), frames, width, out_w.data_ptr<float>(), width, out_b.data_ptr<float>(),
                   residual.data_ptr<float>(), out.data_ptr<float>()});
    return out;
  }
  const auto qkv = at::addmm(in_proj_bias, normed, in_proj_weight.t());  // (F, 3W), contiguous
  AT_DISPATCH_FLOATING_TYPES(messages.scalar_type(), "message_attention_forward_cpu",
                             [&] { attend_over_frames<scalar_t>(qkv, mixed, num_frames, num_heads); });
  return at::addmm(messages + out_proj_bias, mixed, out_proj_weight.t());
}

}  // namespace xclip_ext
