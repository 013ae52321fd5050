// The one binding file: op schemas (namespace xclip_ext), argument checks at the C++ boundary,
// and the implementations registered with the dispatcher, each under its own device's key: the
// dispatcher picks the device once, and each registered wrapper is that device's checks plus
// its function. Python adds fake (meta) implementations and autograd in
// xclip_kernels/backends/_extension.py.
#include <torch/extension.h>
#include <torch/version.h>

#include <cmath>
#include <sstream>
#include <string>

#include "cpu/bf16_tiles.h"
#include "cpu/simd_kernels.h"
#include "xclip_ops.h"

namespace xclip_ext {
namespace {

// Every check names the tensor or argument, what was expected and what came, and throws
// c10::ValueError (a Python ValueError).

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
  // An empty tensor has no element to lay out: autograd hands the backward zero-size gradients
  // with stride 0 (an expanded scalar).
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(-1) == 1, name,
                    ": expected the last dim contiguous (stride 1), got strides ", t.strides());
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", meaning, " = ", expected, ", got ",
                    shape_of(t));
}

void check_frame_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& msg_k, const at::Tensor& msg_v, double scale) {
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
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale: expected a finite positive float, got ", scale);
}

// lse_type: what the device's forward returned (float32, or float64 for float64 inputs on the CPU).
void check_frame_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& msg_k, const at::Tensor& msg_v,
                                    const at::Tensor& out, const at::Tensor& lse, double scale,
                                    at::ScalarType lse_type) {
  check_frame_attention(q, k, v, msg_k, msg_v, scale);
  check_float("grad_out", grad_out, q, 4);
  check_shape("grad_out", grad_out, q.sizes(), "(F, N, H, D) of q");
  check_float("out", out, q, 4);
  check_shape("out", out, q.sizes(), "(F, N, H, D) of q");
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_type && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                        lse.size(1) == q.size(2) && lse.size(2) == q.size(1) && lse.is_contiguous(),
                    "lse: expected a contiguous ", lse_type, " tensor (F, H, N) = (", q.size(0), ", ", q.size(2),
                    ", ", q.size(1), "), got ", lse.scalar_type(), " ", shape_of(lse));
}

void check_message_attention(const at::Tensor& messages, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                             const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                             const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads, double eps) {
  check_float("messages", messages, messages, 2);
  TORCH_CHECK_VALUE(at::isFloatingType(messages.scalar_type()), "messages: expected a floating-point tensor, got ",
                    messages.scalar_type());
  const int64_t frames = messages.size(0), width = messages.size(1);
  TORCH_CHECK_VALUE(num_frames >= 1 && frames % num_frames == 0, "num_frames: expected a divisor of F = ",
                    frames, ", got ", num_frames);
  TORCH_CHECK_VALUE(num_heads >= 1 && width % num_heads == 0, "num_heads: expected a divisor of W = ", width,
                    ", got ", num_heads);
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
  TORCH_CHECK_VALUE(eps > 0, "eps: expected a positive float, got ", eps);
}

// What the dispatcher calls for CPU tensors.
namespace on_cpu {

std::tuple<at::Tensor, at::Tensor> frame_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& msg_k, const at::Tensor& msg_v, double scale) {
  check_frame_attention(q, k, v, msg_k, msg_v, scale);
  return frame_attention_forward_cpu(q, k, v, msg_k, msg_v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  // The CPU kernels keep lse in their compute type: float64 for float64 inputs.
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_frame_attention_backward(grad_out, q, k, v, msg_k, msg_v, out, lse, scale, lse_type);
  return frame_attention_backward_cpu(grad_out, q, k, v, msg_k, msg_v, out, lse, scale);
}

at::Tensor message_attention(const at::Tensor& messages, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                             const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
                             const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias, int64_t num_frames,
                             int64_t num_heads, double eps) {
  check_message_attention(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                          out_proj_bias, num_frames, num_heads, eps);
  return message_attention_forward_cpu(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                       out_proj_weight, out_proj_bias, num_frames, num_heads, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
message_attention_backward(const at::Tensor& grad_out, const at::Tensor& messages, const at::Tensor& ln_weight,
                           const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                           const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                           const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads, double eps) {
  check_message_attention(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                          out_proj_bias, num_frames, num_heads, eps);
  check_float("grad_out", grad_out, messages, 2);
  check_shape("grad_out", grad_out, messages.sizes(), "(F, W) of messages");
  return message_attention_backward_cpu(grad_out, messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                        out_proj_weight, num_frames, num_heads, eps);
}

}  // namespace on_cpu

#ifdef XCLIP_WITH_CUDA
// What the dispatcher calls for CUDA tensors. The message path's backward has no CUDA kernel
// here: xclip_kernels/backends/_extension.py registers the PyTorch formula of
// xclip_kernels/autograd.py as its CUDA kernel.
namespace on_cuda {

// The CUDA kernels are built for float32, float16 and bfloat16 (csrc/cuda/common.cuh); float64
// stops here with a ValueError instead of reaching the dispatch switch. The other tensors'
// dtypes were checked against this one.
void check_cuda_dtype(const char* name, const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                    ": expected float32, float16 or bfloat16 on CUDA (the CUDA kernels are built for these), got ",
                    type);
}

std::tuple<at::Tensor, at::Tensor> frame_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& msg_k, const at::Tensor& msg_v, double scale) {
  check_frame_attention(q, k, v, msg_k, msg_v, scale);
  check_cuda_dtype("q", q);
  return frame_attention_forward_cuda(q, k, v, msg_k, msg_v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  // The CUDA kernels keep lse in float32 for every input dtype.
  check_frame_attention_backward(grad_out, q, k, v, msg_k, msg_v, out, lse, scale, at::kFloat);
  check_cuda_dtype("q", q);
  return frame_attention_backward_cuda(grad_out, q, k, v, msg_k, msg_v, out, lse, scale);
}

at::Tensor message_attention(const at::Tensor& messages, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                             const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
                             const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias, int64_t num_frames,
                             int64_t num_heads, double eps) {
  check_message_attention(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                          out_proj_bias, num_frames, num_heads, eps);
  TORCH_CHECK_VALUE(num_frames <= 64, "num_frames: the CUDA message kernel holds at most 64 frames per video, got ",
                    num_frames);
  check_cuda_dtype("messages", messages);
  return message_attention_forward_cuda(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                        out_proj_weight, out_proj_bias, num_frames, num_heads, eps);
}

}  // namespace on_cuda
#endif  // XCLIP_WITH_CUDA

// What the tiles may use: "auto" the widest vectors the CPU has (bf16 on the convert path),
// "avx512_bf16" that plus the native bf16 forward where the CPU has avx512_bf16 (opt-in: see
// cpu/bf16_tiles.h), "avx2" AVX2 alone.
void set_cpu_isa(const std::string& name) {
  if (name != "auto" && name != "avx512_bf16" && name != "avx2")
    throw pybind11::value_error("set_cpu_isa: name: expected \"auto\" (the widest the CPU has), \"avx512_bf16\" or "
                                "\"avx2\", got \"" + name + "\"");
  limit_tiles_to_avx2(name == "avx2");
  allow_native_bf16(name == "avx512_bf16");
}

constexpr bool built_with_cuda() {
#ifdef XCLIP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

constexpr bool built_with_cpu_tiles() {
#ifdef XCLIP_CPU_TILES
  return true;
#else
  return false;
#endif
}

// How bfloat16 IFA runs now where the head dim is a multiple of 32 (bf16_tiles.h).
const char* bf16_path() {
  if (!built_with_cpu_tiles()) return "float32 BLAS";
  return bf16_native() ? "native" : "convert";
}

#define XCLIP_STRINGIFY_VALUE(x) #x
#define XCLIP_STRINGIFY(x) XCLIP_STRINGIFY_VALUE(x)
// From the version macros (every torch 2 release has them), without the local tag (+cpu, +cu130).
constexpr const char kTorchVersion[] =
    XCLIP_STRINGIFY(TORCH_VERSION_MAJOR) "." XCLIP_STRINGIFY(TORCH_VERSION_MINOR) "." XCLIP_STRINGIFY(
        TORCH_VERSION_PATCH);

}  // namespace
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
  m.impl("frame_attention", &xclip_ext::on_cpu::frame_attention);
  m.impl("frame_attention_backward", &xclip_ext::on_cpu::frame_attention_backward);
  m.impl("message_attention", &xclip_ext::on_cpu::message_attention);
  m.impl("message_attention_backward", &xclip_ext::on_cpu::message_attention_backward);
}

#ifdef XCLIP_WITH_CUDA
TORCH_LIBRARY_IMPL(xclip_ext, CUDA, m) {
  m.impl("frame_attention", &xclip_ext::on_cuda::frame_attention);
  m.impl("frame_attention_backward", &xclip_ext::on_cuda::frame_attention_backward);
  m.impl("message_attention", &xclip_ext::on_cuda::message_attention);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "xclip_kernels compiled ops (registered as torch.ops.xclip_ext.*)";
  module.def("has_blas", &xclip_ext::cpu_blas_available,
             "Whether torch's BLAS exports the sgemm_/dgemm_ entry points the CPU kernels call.");
  module.def("has_cuda", &xclip_ext::built_with_cuda, "Whether the CUDA kernels are compiled in.");
  module.def("has_cpu_tiles", &xclip_ext::built_with_cpu_tiles,
             "Whether the x86-64 register-tile kernels (AVX2 and AVX-512) are compiled in; without them every "
             "CPU shape takes the BLAS path.");
  module.def("torch_version", []() { return std::string(xclip_ext::kTorchVersion); },
             "The torch version this extension was compiled against (major.minor.patch).");
  module.def("set_cpu_isa", &xclip_ext::set_cpu_isa, py::arg("name"),
             "The instruction set the CPU tile kernels may use: \"auto\" (the widest the CPU has; bfloat16 "
             "on the convert path), \"avx512_bf16\" (that, and the native bfloat16 forward where the CPU has "
             "avx512_bf16) or \"avx2\". Thread-safe; a no-op where has_cpu_tiles() is false.");
  module.def("cpu_has_native_bf16", &xclip_ext::cpu_has_native_bf16,
             "Whether this build and CPU have the native bfloat16 forward (avx512_bf16), whatever set_cpu_isa says.");
  module.def("bf16_path", []() { return std::string(xclip_ext::bf16_path()); },
             "How bfloat16 IFA runs now (head dims that are multiples of 32): \"native\" (vdpbf16ps), "
             "\"convert\" (float32 tiles on widened copies), or \"float32 BLAS\" without the tiles.");
  module.def("cpu_isa", []() { return std::string(xclip_ext::tile_isa()); },
             "What the CPU tile kernels run on now: \"avx512\", \"avx2\", or \"none\" without them.");
}
