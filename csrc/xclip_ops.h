// The compiled ops of xclip_kernels: the device implementations, shared by the binding (which
// checks the arguments and registers each under its device's dispatch key), the CPU sources
// and the CUDA sources. Layouts are frame-batched: F = videos x frames leads every tensor.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace xclip_ext {

// Intra-frame attention (IFA). q, k, v: (F, N, H, D), last dim contiguous, other strides free;
// msg_k, msg_v: (F, H, D). Returns out (F, N, H, D) contiguous in q's dtype and lse (F, H, N),
// the natural-log log-sum-exp of each query row over its N keys plus the message key, in
// float32 (float64 for float64 inputs; float32 for bfloat16).
std::tuple<at::Tensor, at::Tensor> frame_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, double scale);
// IFA backward: dq, dk, dv (F, N, H, D) and d msg_k, d msg_v (F, H, D), contiguous, q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse,
    double scale);
// Cross-frame attention (CFA) of one block: messages + out_proj(MHA over each video's
// num_frames messages of LayerNorm(messages)); messages (F, W), F = b * num_frames.
at::Tensor message_attention_forward_cpu(
    const at::Tensor& messages, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias,
    int64_t num_frames, int64_t num_heads, double eps);
// CFA backward from the forward's inputs (recomputed, nothing saved): the gradients of
// messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
// contiguous, in the messages' dtype (float32, float64 or bfloat16).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
message_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& messages, const at::Tensor& ln_weight,
                               const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                               const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                               int64_t num_frames, int64_t num_heads, double eps);

// Whether the BLAS entry points the CPU kernels call (sgemm_/dgemm_ of torch's BLAS) resolved.
bool cpu_blas_available();

#ifdef XCLIP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> frame_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& msg_k, const at::Tensor& msg_v, const at::Tensor& out, const at::Tensor& lse,
    double scale);
at::Tensor message_attention_forward_cuda(
    const at::Tensor& messages, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias,
    int64_t num_frames, int64_t num_heads, double eps);
#endif

}  // namespace xclip_ext
