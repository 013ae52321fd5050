// float32 kernels on register tiles, built for AVX2 and for AVX-512 and chosen at run time:
// the IFA forward (ifa_tiles.inc) and a linear layer for few rows (linear_tiles.inc; its
// weight may also be bf16, widened in registers). Plain pointers and strides, so the tile code needs no ATen.
//
// The tiles are x86-64 code (simd_kernels.cpp), compiled only where the build defines
// XCLIP_CPU_TILES. Elsewhere (another architecture, or a build asked for the portable
// configuration) every *_supports below answers false, so the callers take their BLAS path
// for every shape and never reach the run functions.
#pragma once

#include <cstdint>
#include <stdexcept>

#if defined(XCLIP_CPU_TILES) && !defined(__x86_64__)
#error "XCLIP_CPU_TILES: the register-tile kernels are x86-64 code; build without them on this target"
#endif

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

// out = x weight^T + bias (+ residual), all float32 and contiguous: x (rows, inner), weight
// (outputs, inner), bias (outputs) or null, residual and out (rows, outputs); residual may be
// null, and out must not alias x or weight. Weight is float32, or bfloat16 as its bits
// (uint16_t: SkinnyLinearBf16), read as it is stored and widened in registers, so a bf16
// model's weight is never copied to float32; everything else stays float32 either way.
template <typename Weight>
struct SkinnyLinearOf {
  using WeightType = Weight;
  const float* x;
  int64_t rows, inner;
  const Weight* weight;
  int64_t outputs;
  const float* bias;
  const float* residual;
  float* out;

  SkinnyLinearOf rows_from(int64_t m) const {
    return {x + m * inner, rows - m, inner, weight, outputs, bias, residual == nullptr ? nullptr : residual + m * outputs,
            out + m * outputs};
  }
};
using SkinnyLinear = SkinnyLinearOf<float>;
using SkinnyLinearBf16 = SkinnyLinearOf<uint16_t>;

// The backward of a linear layer on few rows, float32, contiguous.
// Weight gradient: out (a_cols, b_cols) = a^T b for a (rows, a_cols) and b (rows, b_cols);
// out float32, 64-byte aligned (it is written with streaming stores), or bf16 bits
// (SkinnyWeightGradBf16: the gradient of a bf16 weight, each float32 sum rounded once as it
// is stored, instead of a float32 result the size of the weight rounded by a second pass).
template <typename Out>
struct SkinnyWeightGradOf {
  const float* a;
  const float* b;
  int64_t rows, a_cols, b_cols;
  Out* out;
};
using SkinnyWeightGrad = SkinnyWeightGradOf<float>;
using SkinnyWeightGradBf16 = SkinnyWeightGradOf<uint16_t>;

// Input gradient: out (rows, outputs) = x weight for x (rows, inner) and weight (inner,
// outputs); the weight float32 or bf16 bits (SkinnyInputGradBf16), as in SkinnyLinearOf.
template <typename Weight>
struct SkinnyInputGradOf {
  using WeightType = Weight;
  const float* x;
  int64_t rows, inner;
  const Weight* weight;
  int64_t outputs;
  float* out;
};
using SkinnyInputGrad = SkinnyInputGradOf<float>;
using SkinnyInputGradBf16 = SkinnyInputGradOf<uint16_t>;

#ifdef XCLIP_CPU_TILES

// Whether the tiles handle this head dim (a multiple of 16; others take the BLAS path).
bool fused_forward_supports(int64_t dim);

// Both run the whole problem in parallel over frame-heads on the instruction set tile_isa() names.
void fused_forward(const FusedForward& problem);
void fused_backward(const FusedBackward& problem);

// Whether skinny_linear is the better choice than BLAS for this shape.
bool skinny_linear_supports(int64_t rows, int64_t inner);

// Runs the whole problem in parallel over weight rows (same shapes supported for either weight).
void skinny_linear(const SkinnyLinear& problem);
void skinny_linear(const SkinnyLinearBf16& problem);

// Whether the two kernels below are the better choice than BLAS: `rows` few, `columns` (the
// columns of b, the outputs of the input gradient) whole vectors.
bool skinny_linear_grad_supports(int64_t rows, int64_t columns);

// Both run in parallel over rows (weight gradient) or columns (input gradient) of out.
void skinny_weight_grad(const SkinnyWeightGrad& problem);
void skinny_weight_grad(const SkinnyWeightGradBf16& problem);
void skinny_input_grad(const SkinnyInputGrad& problem);
void skinny_input_grad(const SkinnyInputGradBf16& problem);

// The widest instruction set the tiles may use: the CPU's widest (the default), or AVX2 even
// where the CPU has AVX-512 (to compare the two, or to match another machine). Thread-safe;
// calls already running keep the instruction set they started on.
void limit_tiles_to_avx2(bool limit);

// What the tiles run on now: "avx512" or "avx2".
const char* tile_isa();

#else

inline bool fused_forward_supports(int64_t) { return false; }
inline bool skinny_linear_supports(int64_t, int64_t) { return false; }
inline bool skinny_linear_grad_supports(int64_t, int64_t) { return false; }

// Unreachable behind the answers above; they throw rather than compute nothing if a caller
// ever forgets to ask.
[[noreturn]] inline void no_tiles_in_this_build() {
  throw std::logic_error("xclip_kernels was built without the CPU tile kernels (XCLIP_CPU_TILES)");
}
inline void fused_forward(const FusedForward&) { no_tiles_in_this_build(); }
inline void fused_backward(const FusedBackward&) { no_tiles_in_this_build(); }
inline void skinny_linear(const SkinnyLinear&) { no_tiles_in_this_build(); }
inline void skinny_linear(const SkinnyLinearBf16&) { no_tiles_in_this_build(); }
inline void skinny_weight_grad(const SkinnyWeightGrad&) { no_tiles_in_this_build(); }
inline void skinny_weight_grad(const SkinnyWeightGradBf16&) { no_tiles_in_this_build(); }
inline void skinny_input_grad(const SkinnyInputGrad&) { no_tiles_in_this_build(); }
inline void skinny_input_grad(const SkinnyInputGradBf16&) { no_tiles_in_this_build(); }

inline void limit_tiles_to_avx2(bool) {}  // nothing to limit
inline const char* tile_isa() { return "none"; }

#endif  // XCLIP_CPU_TILES

}  // namespace xclip_ext
