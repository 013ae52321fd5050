// Host-model entry of the tensor-core CFA forward (csrc/cuda/cfa_mma.cuh): the kernel's own source
// on the CPU scheduler of simt.h, launched as message_attention.cu's launcher does (same CfaTiles
// grid, block and shared-memory size, same make_cfa_args). Called by
// tests/xclip_kernels/test_cuda_cfa_model.py through ctypes.
#include <string>
#include <type_traits>

#include "cfa_mma.cuh"

namespace {

using namespace xclip_ext;

// Calls fn with the padded head dim as message_attention.cu's dispatch_head_dim picks it
// (common.cuh includes ATen, which the host model does without).
template <typename Fn>
void dispatch_dp(int dim, Fn&& fn) {
  if (dim < 1 || dim > 128) throw xk_sim::Error("head dim W / H must be in [1, 128], got " + std::to_string(dim));
  if (dim <= 32) fn(std::integral_constant<int, 32>());
  else if (dim <= 64) fn(std::integral_constant<int, 64>());
  else if (dim <= 96) fn(std::integral_constant<int, 96>());
  else fn(std::integral_constant<int, 128>());
}

template <typename Tag>
void run_forward(int videos, int frames, int width, int heads, double eps, const uint16_t* messages,
                 const uint16_t* ln_w, const uint16_t* ln_b, const uint16_t* w_in, const uint16_t* b_in,
                 const uint16_t* b_out, uint16_t* mixed, uint16_t* residual, int* staging) {
  const int hd = width / heads;
  dispatch_dp(hd, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    using L = cfa_mma::CfaTiles<DP>;
    const cfa_mma::CfaArgs args =
        cfa_mma::make_cfa_args(messages, ln_w, ln_b, w_in, b_in, b_out, mixed, residual, frames, width, hd, eps);
    staging[0] = args.vec_w;
    // cp_async_16 may read only the weight.
    xk_sim::register_global(w_in, static_cast<std::size_t>(3) * width * width * sizeof(uint16_t));
    const dim3 grid(static_cast<unsigned>(videos), static_cast<unsigned>(heads));
    xk_sim::launch(grid, dim3(L::kThreads), L::shared_bytes(frames), cfa_mma::cfa_mma_fwd_kernel<Tag, DP>, args);
  });
}

}  // namespace

extern "C" {

// The message path's kernel on 16-bit bits (bf16 != 0: bfloat16, else float16): messages
// (videos * frames, width), ln_w, ln_b (width), w_in (3 width, width), b_in (3 width), b_out
// (width), all contiguous, into mixed and residual (videos * frames, width). staging[0] gets
// the kernel's vec_w (16-byte copies of the weight, else element-wise).
int xk_cfa_forward(int bf16, int videos, int frames, int width, int heads, double eps, const uint16_t* messages,
                   const uint16_t* ln_w, const uint16_t* ln_b, const uint16_t* w_in, const uint16_t* b_in,
                   const uint16_t* b_out, uint16_t* mixed, uint16_t* residual, int* staging) {
  return xk_sim::run_entry([&] {
    if (videos < 1 || width < 1 || heads < 1 || width % heads != 0)
      throw xk_sim::Error("videos, width, heads must be positive with heads dividing width, got " +
                          std::to_string(videos) + ", " + std::to_string(width) + ", " + std::to_string(heads));
    if (frames < 1 || frames > 64) throw xk_sim::Error("frames must be in [1, 64], got " + std::to_string(frames));
    if (bf16)
      run_forward<warp_mma::BF16>(videos, frames, width, heads, eps, messages, ln_w, ln_b, w_in, b_in, b_out, mixed,
                                  residual, staging);
    else
      run_forward<warp_mma::F16>(videos, frames, width, heads, eps, messages, ln_w, ln_b, w_in, b_in, b_out, mixed,
                                 residual, staging);
  });
}

// CfaTiles of the head dim's padded instantiation: tiles[0..3] = DP, k-chunk columns, passes
// over W, dynamic shared bytes for `frames` (what scripts/gpu_static.py mirrors).
int xk_cfa_forward_tiles(int head_dim, int frames, long* tiles) {
  return xk_sim::run_entry([&] {
    dispatch_dp(head_dim, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using L = cfa_mma::CfaTiles<DP>;
      tiles[0] = DP;
      tiles[1] = L::kBK;
      tiles[2] = L::kPasses;
      tiles[3] = static_cast<long>(L::shared_bytes(frames));
    });
  });
}

}  // extern "C"
