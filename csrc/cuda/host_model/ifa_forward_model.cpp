// Host-model entry of the tensor-core IFA forward (csrc/cuda/ifa_mma_forward.cuh): the kernel's
// own source on the CPU scheduler of simt.h, launched as frame_attention.cu's launcher does (same
// FwdTiles grid, block and shared-memory size, same make_fwd_args). Called by
// tests/xclip_kernels/test_cuda_mma_model.py through ctypes.
#include <string>
#include <type_traits>

#include "ifa_mma_forward.cuh"

namespace {

using namespace xclip_ext;

// Calls fn with the padded head dim as frame_attention.cu's dispatch_head_dim picks it
// (common.cuh includes ATen, which the host model does without).
template <typename Fn>
void dispatch_dp(int dim, Fn&& fn) {
  if (dim < 1 || dim > 128) throw xk_sim::Error("head dim D must be in [1, 128], got " + std::to_string(dim));
  if (dim <= 32) fn(std::integral_constant<int, 32>());
  else if (dim <= 64) fn(std::integral_constant<int, 64>());
  else if (dim <= 96) fn(std::integral_constant<int, 96>());
  else fn(std::integral_constant<int, 128>());
}

// Bytes from `ptr` to one past the last element of a (F, N, H, D) view with these strides: the
// only global memory cp_async_16 may read for it.
std::size_t span_bytes(int frames, int tokens, int heads, int dim, const int64_t* strides) {
  const int64_t last = (frames - 1) * strides[0] + (tokens - 1) * strides[1] + (heads - 1) * strides[2] + dim;
  return static_cast<std::size_t>(last) * sizeof(uint16_t);
}

template <typename Tag>
void run_forward(int frames, int tokens, int heads, int dim, double scale, const uint16_t* q, const int64_t* qs,
                 const uint16_t* k, const int64_t* ks, const uint16_t* v, const int64_t* vs, const uint16_t* mk,
                 const int64_t* mks, const uint16_t* mv, const int64_t* mvs, uint16_t* out, float* lse, int* staging) {
  dispatch_dp(dim, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    using L = ifa_mma::FwdTiles<DP>;
    const ifa_mma::FwdArgs args =
        ifa_mma::make_fwd_args({q, qs[0], qs[1], qs[2]}, {k, ks[0], ks[1], ks[2]}, {v, vs[0], vs[1], vs[2]},
                               {mk, mks[0], mks[1]}, {mv, mvs[0], mvs[1]}, out, lse, tokens, heads, dim, scale);
    staging[0] = args.vec_in;
    staging[1] = args.vec_out;
    xk_sim::register_global(q, span_bytes(frames, tokens, heads, dim, qs));
    xk_sim::register_global(k, span_bytes(frames, tokens, heads, dim, ks));
    xk_sim::register_global(v, span_bytes(frames, tokens, heads, dim, vs));
    const dim3 grid(static_cast<unsigned>(frames * heads), static_cast<unsigned>(L::query_tiles(tokens)));
    xk_sim::launch(grid, dim3(L::kThreads), L::kSharedBytes, ifa_mma::ifa_mma_fwd_kernel<Tag, DP>, args);
  });
}

}  // namespace

extern "C" {

// The forward on 16-bit bits (bf16 != 0: bfloat16, else float16): q, k, v (F, N, H, D) and
// msg_k, msg_v (F, H, D) at their pointers with element strides (3 and 2 of them; the last dim
// contiguous), into out (F, N, H, D) contiguous and lse (F, H, N) float32. staging[0], [1] get
// the kernel's vec_in / vec_out (16-byte copies of the inputs / of out, else element-wise).
int xk_ifa_forward(int bf16, int frames, int tokens, int heads, int dim, double scale, const uint16_t* q,
                   const int64_t* q_strides, const uint16_t* k, const int64_t* k_strides, const uint16_t* v,
                   const int64_t* v_strides, const uint16_t* msg_k, const int64_t* msg_k_strides,
                   const uint16_t* msg_v, const int64_t* msg_v_strides, uint16_t* out, float* lse, int* staging) {
  return xk_sim::run_entry([&] {
    if (frames < 1 || tokens < 1 || heads < 1)
      throw xk_sim::Error("F, N, H must be positive, got " + std::to_string(frames) + ", " + std::to_string(tokens) +
                          ", " + std::to_string(heads));
    if (bf16)
      run_forward<warp_mma::BF16>(frames, tokens, heads, dim, scale, q, q_strides, k, k_strides, v, v_strides, msg_k,
                                  msg_k_strides, msg_v, msg_v_strides, out, lse, staging);
    else
      run_forward<warp_mma::F16>(frames, tokens, heads, dim, scale, q, q_strides, k, k_strides, v, v_strides, msg_k,
                                 msg_k_strides, msg_v, msg_v_strides, out, lse, staging);
  });
}

// FwdTiles of the head dim's padded instantiation: tiles[0..3] = DP, query tile rows, key tile
// rows, dynamic shared bytes (what scripts/gpu_static.py mirrors).
int xk_ifa_forward_tiles(int dim, long* tiles) {
  return xk_sim::run_entry([&] {
    dispatch_dp(dim, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using L = ifa_mma::FwdTiles<DP>;
      tiles[0] = DP;
      tiles[1] = L::kBlockM;
      tiles[2] = L::kBlockN;
      tiles[3] = static_cast<long>(L::kSharedBytes);
    });
  });
}

}  // extern "C"
