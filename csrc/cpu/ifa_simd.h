// The float32 IFA forward on register tiles (ifa_tiles.inc), built for AVX2 and for AVX-512
// and chosen at run time. Plain pointers and strides, so the tile code needs no ATen.
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

}  // namespace xclip_ext
