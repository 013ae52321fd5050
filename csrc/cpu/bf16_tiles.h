// bfloat16 IFA on the register tiles: bf16 in memory, float32 accumulation and softmax.
//
// Two paths, chosen at run time in simd_kernels.cpp beside the AVX-512/AVX2 choice:
//  * convert (the default, on AVX-512 or AVX2): the float32 tiles of ifa_tiles.inc, which
//    widen the bf16 rows as they pack them into their float32 panels and round each result
//    to bf16 as they store it (bf16_tiles.inc);
//  * native (forward only, CPUs with avx512_bf16, opt-in: set_cpu_isa("avx512_bf16")): the
//    score and P V products run on vdpbf16ps, pairs of bf16 along the reduction dim multiplied
//    into float32 accumulators (ifa_tiles_bf16.inc). Not the default because on the Xeon it was
//    measured on (BENCHMARKS.md) vdpbf16ps costs four FMAs' time for two FMAs' work, so the
//    convert path's float32 FMAs are the faster way to the same float32 accumulation.
// The backward takes the convert path on every CPU. bf16 values travel as their bits
// (uint16_t), so this header needs no bf16 type of ATen or of the compiler.
#pragma once

#include <cstdint>

#include "simd_kernels.h"

namespace xclip_ext {

// As FusedForward, with bf16 q, k, v, msg_k, msg_v and out; lse stays float32.
struct Bf16Forward {
  int64_t frames, tokens, heads, dim;
  float scale;
  const uint16_t *q, *k, *v, *msg_k, *msg_v;
  RowStrides q_strides, k_strides, v_strides;
  HeadStrides msg_k_strides, msg_v_strides;
  uint16_t* out;
  float* lse;
  int64_t out_row_stride;  // heads * dim
};

// As FusedBackward, with every tensor bf16 but lse (float32).
struct Bf16Backward {
  int64_t frames, tokens, heads, dim;
  float scale;
  const uint16_t *q, *k, *v, *msg_k, *msg_v, *out, *grad_out;
  const float* lse;
  RowStrides q_strides, k_strides, v_strides, out_strides, grad_out_strides;
  HeadStrides msg_k_strides, msg_v_strides;
  uint16_t *dq, *dk, *dv, *dmsg_k, *dmsg_v;
  int64_t grad_row_stride;  // heads * dim
};

#ifdef XCLIP_CPU_TILES

// Whether the tiles take this head dim in bf16 (a multiple of 16, as in float32); others are
// widened to float32 by the caller and take the BLAS path.
bool bf16_tiles_support(int64_t dim);

// Both run the whole problem in parallel over frame-heads.
void bf16_forward(const Bf16Forward& problem);
void bf16_backward(const Bf16Backward& problem);

// Whether the forward runs natively (vdpbf16ps) now: the CPU has avx512_bf16 and
// set_cpu_isa asked for it.
bool bf16_native();

// Whether this build and CPU have the native path at all (whatever set_cpu_isa says).
bool cpu_has_native_bf16();

// Lets the bf16 forward run natively where the CPU has avx512_bf16 (set_cpu_isa "avx512_bf16";
// tests and benchmarks compare the two paths). Thread-safe, as limit_tiles_to_avx2.
void allow_native_bf16(bool allow);

#else

inline bool bf16_tiles_support(int64_t) { return false; }
inline void bf16_forward(const Bf16Forward&) { no_tiles_in_this_build(); }
inline void bf16_backward(const Bf16Backward&) { no_tiles_in_this_build(); }
inline bool bf16_native() { return false; }
inline bool cpu_has_native_bf16() { return false; }
inline void allow_native_bf16(bool) {}

#endif  // XCLIP_CPU_TILES

}  // namespace xclip_ext
