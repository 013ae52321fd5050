// Device helpers shared by the CUDA kernels: the thread layout and the half-warp reductions.
//
// Every kernel here runs 128 threads as 8 row groups x 16 lanes, so that a half-warp owns
// whole tile rows and a row's max or sum is four xor-shuffles.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace xclip_ext::cuda_common {

constexpr int kThreads = 128;        // 4 warps per block
constexpr int kTX = 16;              // lanes across tile columns: one half-warp per row group
constexpr int kTY = kThreads / kTX;  // 8 row groups
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ float rsqrt_(float x) { return rsqrtf(x); }
template <typename T>
__device__ __forceinline__ T max_(T a, T b) { return a > b ? a : b; }

// Reductions over a full warp, and over the 16 lanes of a half-warp (xor offsets < 16 never
// cross halves). Every lane of the warp must call these: use them outside data-dependent branches.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <typename T>
__device__ __forceinline__ T half_warp_sum(T v) {
#pragma unroll
  for (int off = kTX / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <typename T>
__device__ __forceinline__ T half_warp_max(T v) {
#pragma unroll
  for (int off = kTX / 2; off > 0; off >>= 1) v = max_(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Host side: the dtypes the kernels are built for, float32, float16 and bfloat16 (accumulating in
// float32). No float64: the registry never sends it to CUDA (xclip_kernels/backends/cuda.py
// declares these three), its instantiations were a quarter of the build time, and the binding
// rejects it with a ValueError before any dispatch (csrc/binding.cpp, on_cuda).
#define XCLIP_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Host side: calls fn with the head dim padded to a compile-time DP in {32, 64, 96, 128};
// ``what`` names the op and argument in the error for larger head dims.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, const char* what, Fn&& fn) {
  if (head_dim <= 32) {
    fn(std::integral_constant<int, 32>());
  } else if (head_dim <= 64) {
    fn(std::integral_constant<int, 64>());
  } else if (head_dim <= 96) {
    fn(std::integral_constant<int, 96>());
  } else if (head_dim <= 128) {
    fn(std::integral_constant<int, 128>());
  } else {
    TORCH_CHECK_VALUE(false, what, " must be at most 128, got ", head_dim);
  }
}

}  // namespace xclip_ext::cuda_common
