// The one binding file: op schemas (namespace xclip_ext), argument checks at the C++ boundary,
// and the CPU and CUDA implementations registered with the dispatcher. Python adds fake
// (meta) implementations and autograd in xclip_kernels/compiled.py.
#include <torch/extension.h>

#include "xclip_ops.h"

namespace xclip_ext {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_float(const char* name, const at::Tensor& t, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected a ", dim, "-d tensor, got ", t.dim(), "-d of shape ",
                    shape_of(t));
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(),
                    ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected device ", like.device(), ", got ",
                    t.device());
  TORCH_CHECK_VALUE(t.size(-1) == 0 || t.stride(-1) == 1, name,
                    ": expected the last dim contiguous (stride 1), got strides ", t.strides());
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", meaning, " = ", expected, ", got ",
                    shape_of(t));
}

std::tuple<at::Tensor, at::Tensor> frame_attention(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& msg_k,
                                                   const at::Tensor& msg_v, double scale) {
  check_frame_attention(q, k, v, msg_k, msg_v);
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale: expected a finite positive float, got ", scale);
#ifdef XCLIP_WITH_CUDA
  if (q.is_cuda()) return frame_attention_forward_cuda(q, k, v, msg_k, msg_v, scale);
#endif
  return frame_attention_forward_cpu(q, k, v, msg_k, msg_v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  check_frame_attention(q, k, v, msg_k, msg_v);
  check_float("grad_out", grad_out, q, 4);
  check_shape("grad_out", grad_out, q.sizes(), "(F, N, H, D) of q");
  check_float("out", out, q, 4);
  check_shape("out", out, q.sizes(), "(F, N, H, D) of q");
  // float32; float64 where the CPU kernels ran on float64 inputs.
  const auto lse_type = q.scalar_type() == at::kDouble && q.is_cpu() ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_type && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                        lse.size(1) == q.size(2) && lse.size(2) == q.size(1) && lse.is_contiguous(),
                    "lse: expected a contiguous ", lse_type, " tensor (F, H, N) = (", q.size(0), ", ", q.size(2),
                    ", ", q.size(1), "), got ", lse.scalar_type(), " ", shape_of(lse));
#ifdef XCLIP_WITH_CUDA
  if (q.is_cuda()) return frame_attention_backward_cuda(grad_out, q, k, v, msg_k, msg_v, out, lse, scale);
#endif
  return frame_attention_backward_cpu(grad_out, q, k, v, msg_k, msg_v, out, lse, scale);
}

at::Tensor message_attention(const at::Tensor& messages, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                             const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                             const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads,
                             double eps) {
  check_message_attention(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                          out_proj_bias, num_frames, num_heads);
  TORCH_CHECK_VALUE(eps > 0, "eps: expected a positive float, got ", eps);
#ifdef XCLIP_WITH_CUDA
  if (messages.is_cuda())
    return message_attention_forward_cuda(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                          out_proj_weight, out_proj_bias, num_frames, num_heads, eps);
#endif
  return message_attention_forward_cpu(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                       out_proj_weight, out_proj_bias, num_frames, num_heads, eps);
}

// CPU only: on CUDA the message path's backward recomputes through PyTorch (compiled.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
message_attention_backward(const at::Tensor& grad_out, const at::Tensor& messages, const at::Tensor& ln_weight,
                           const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                           const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                           const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads, double eps) {
  check_message_attention(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                          out_proj_bias, num_frames, num_heads);
  TORCH_CHECK_VALUE(eps > 0, "eps: expected a positive float, got ", eps);
  check_float("grad_out", grad_out, messages, 2);
  check_shape("grad_out", grad_out, messages.sizes(), "(F, W) of messages");
  return message_attention_backward_cpu(grad_out, messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                        out_proj_weight, num_frames, num_heads, eps);
}

}  // namespace

void check_frame_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& msg_k, const at::Tensor& msg_v) {
  check_float("q", q, q, 4);
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()), "q: expected a floating-point tensor, got ",
                    q.scalar_type());
  check_float("k", k, q, 4);
  check_shape("k", k, q.sizes(), "(F, N, H, D) of q");
  check_float("v", v, q, 4);
  check_shape("v", v, q.sizes(), "(F, N, H, D) of q");
  check_float("msg_k", msg_k, q, 3);
  check_shape("msg_k", msg_k, {q.size(0), q.size(2), q.size(3)}, "(F, H, D) of q");
  check_float("msg_v", msg_v, q, 3);
  check_shape("msg_v", msg_v, {q.size(0), q.size(2), q.size(3)}, "(F, H, D) of q");
}

void check_message_attention(const at::Tensor& messages, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                             const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                             const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads) {
  check_float("messages", messages, messages, 2);
  TORCH_CHECK_VALUE(at::isFloatingType(messages.scalar_type()), "messages: expected a floating-point tensor, got ",
                    messages.scalar_type());
  const int64_t frames = messages.size(0), width = messages.size(1);
  TORCH_CHECK_VALUE(num_frames >= 1 && frames % num_frames == 0, "num_frames: expected a divisor of F = ",
                    frames, ", got ", num_frames);
  TORCH_CHECK_VALUE(num_heads >= 1 && width % num_heads == 0, "num_heads: expected a divisor of W = ", width,
                    ", got ", num_heads);
  TORCH_CHECK_VALUE(!messages.is_cuda() || num_frames <= 64,
                    "num_frames: the CUDA message kernel holds at most 64 frames per video, got ", num_frames);
  check_float("ln_weight", ln_weight, messages, 1);
  check_shape("ln_weight", ln_weight, {width}, "(W,)");
  check_float("ln_bias", ln_bias, messages, 1);
  check_shape("ln_bias", ln_bias, {width}, "(W,)");
  check_float("in_proj_weight", in_proj_weight, messages, 2);
  check_shape("in_proj_weight", in_proj_weight, {3 * width, width}, "(3W, W)");
  check_float("in_proj_bias", in_proj_bias, messages, 1);
  check_shape("in_proj_bias", in_proj_bias, {3 * width}, "(3W,)");
  check_float("out_proj_weight", out_proj_weight, messages, 2);
  check_shape("out_proj_weight", out_proj_weight, {width, width}, "(W, W)");
  check_float("out_proj_bias", out_proj_bias, messages, 1);
  check_shape("out_proj_bias", out_proj_bias, {width}, "(W,)");
}

}  // namespace xclip_ext

TORCH_LIBRARY(xclip_ext, m) {
  m.def("frame_attention(Tensor q, Tensor k, Tensor v, Tensor msg_k, Tensor msg_v, float scale) -> (Tensor, Tensor)");
  m.def(
      "frame_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor msg_k, Tensor msg_v, "
      "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "message_attention(Tensor messages, Tensor ln_weight, Tensor ln_bias, Tensor in_proj_weight, "
      "Tensor in_proj_bias, Tensor out_proj_weight, Tensor out_proj_bias, int num_frames, int num_heads, "
      "float eps) -> Tensor");
  m.def(
      "message_attention_backward(Tensor grad_out, Tensor messages, Tensor ln_weight, Tensor ln_bias, "
      "Tensor in_proj_weight, Tensor in_proj_bias, Tensor out_proj_weight, Tensor out_proj_bias, int num_frames, "
      "int num_heads, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xclip_ext, CPU, m) {
  m.impl("frame_attention", &xclip_ext::frame_attention);
  m.impl("frame_attention_backward", &xclip_ext::frame_attention_backward);
  m.impl("message_attention", &xclip_ext::message_attention);
  m.impl("message_attention_backward", &xclip_ext::message_attention_backward);
}

#ifdef XCLIP_WITH_CUDA
TORCH_LIBRARY_IMPL(xclip_ext, CUDA, m) {
  m.impl("frame_attention", &xclip_ext::frame_attention);
  m.impl("frame_attention_backward", &xclip_ext::frame_attention_backward);
  m.impl("message_attention", &xclip_ext::message_attention);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "xclip_kernels compiled ops (registered as torch.ops.xclip_ext.*)";
  module.def("has_blas", &xclip_ext::cpu_blas_available);
  module.def("has_cuda", []() {
#ifdef XCLIP_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
