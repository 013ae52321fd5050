// float32 kernels on register tiles, built for AVX2 and for AVX-512 and chosen at run time:
// the IFA forward (ifa_tiles.inc) and a linear layer for few rows (linear_tiles.inc). Plain pointers and strides, so the tile code needs no ATen.
#pragma once

#include <cstdint>

namespace xclip_ext {

struct RowStrides {
  int64_t f, n, h;  // elements between frames, tokens and heads; the head dim is contiguous
};

struct HeadStrides {
  int64_t f, h;  // elements between frames and heads of a (F, H, D) message key or value
};

// One IFA forward: q, k, v (F, N, H, D) with any row strides, msg_k, msg_v (F, H, D);
// out (F, N, H, D) contiguous and lse (F, H, N) float32, natural log.
struct FusedForward {
  int64_t frames, tokens, heads, dim;
  float scale;
  const float *q, *k, *v, *msg_k, *msg_v;
  RowStrides q_strides, k_strides, v_strides;
  HeadStrides msg_k_strides, msg_v_strides;
  float* out;
  float* lse;
  int64_t out_row_stride;  // heads * dim
};

inline int64_t padded_tokens(int64_t tokens, int64_t panel) { return (tokens + panel - 1) / panel * panel; }

// Whether the tiles handle this head dim (a multiple of 16; others take the BLAS path).
bool fused_forward_supports(int64_t dim);

// Runs the whole problem in parallel over frame-heads on the widest instruction set the CPU
// has (XCLIP_KERNELS_CPU_ISA=avx2 forces the AVX2 tiles, for tests and comparisons).
void fused_forward(const FusedForward& problem);

// The IFA backward: the forward's inputs, its output and lse, and grad_out (any row strides);
// dq, dk, dv (F, N, H, D) and dmsg_k, dmsg_v (F, H, D) contiguous, all written.
struct FusedBackward {
  int64_t frames, tokens, heads, dim;
  float scale;
  const float *q, *k, *v, *msg_k, *msg_v, *out, *grad_out, *lse;
  RowStrides q_strides, k_strides, v_strides, out_strides, grad_out_strides;
  HeadStrides msg_k_strides, msg_v_strides;
  float *dq, *dk, *dv, *dmsg_k, *dmsg_v;
  int64_t grad_row_stride;  // heads * dim
};

void fused_backward(const FusedBackward& problem);

// out = x weight^T + bias (+ residual), all float32 and contiguous: x (rows, inner), weight
// (outputs, inner), bias (outputs) or null, residual and out (rows, outputs); residual may be
// null, and out must not alias x or weight.
struct SkinnyLinear {
  const float* x;
  int64_t rows, inner;
  const float* weight;
  int64_t outputs;
  const float* bias;
  const float* residual;
  float* out;

  SkinnyLinear rows_from(int64_t m) const {
    return {x + m * inner, rows - m, inner, weight, outputs, bias, residual == nullptr ? nullptr : residual + m * outputs,
            out + m * outputs};
  }
};

// Whether skinny_linear is the better choice than BLAS for this shape.
bool skinny_linear_supports(int64_t rows, int64_t inner);

// Runs the whole problem in parallel over weight rows.
void skinny_linear(const SkinnyLinear& problem);

// The backward of a linear layer on few rows, float32, contiguous.
// Weight gradient: out (a_cols, b_cols) = a^T b for a (rows, a_cols) and b (rows, b_cols); out
// 64-byte aligned (it is written with streaming stores).
struct SkinnyWeightGrad {
  const float* a;
  const float* b;
  int64_t rows, a_cols, b_cols;
  float* out;
};

// Input gradient: out (rows, outputs) = x weight for x (rows, inner) and weight (inner, outputs).
struct SkinnyInputGrad {
  const float* x;
  int64_t rows, inner;
  const float* weight;
  int64_t outputs;
  float* out;
};

// Whether the two kernels below are the better choice than BLAS: `rows` few, `columns` (the
// columns of b, the outputs of the input gradient) whole vectors.
bool skinny_linear_grad_supports(int64_t rows, int64_t columns);

// Both run in parallel over rows (weight gradient) or columns (input gradient) of out.
void skinny_weight_grad(const SkinnyWeightGrad& problem);
void skinny_input_grad(const SkinnyInputGrad& problem);

}  // namespace xclip_ext
