// CFA (cross-frame attention over message tokens) on CUDA: the fused message path of a block.
//
// What it computes: messages + out_proj(MHA(LayerNorm(messages))) where the attention runs over
// the T = num_frames <= 64 message rows of each video (F = b * T rows, frames of a video
// adjacent), with nn.MultiheadAttention's packed (3W, W) in_proj_weight.
//
// Why this shape. The message path is b * T rows (tens to hundreds): unfused it is a chain of
// tiny launches (LayerNorm, in-proj GEMM, reshapes, softmax, two batched matmuls, out-proj,
// residual add) dominated by launch latency (docs/benchmarking.md#hardware-limits). Here it is
// two launches:
//   1. one block per (video, head): fp32 LayerNorm statistics of the video's T rows, that
//      head's q, k, v = LN(m) W^T + b (the normalised rows are produced on the fly, chunk by
//      chunk, so no normalised copy ever goes to global memory), softmax(q k^T / sqrt(hd)) v
//      over the T messages, written into its column slice of `mixed` (F, W); the same block
//      writes messages + out_proj_bias into its slice of `residual`;
//   2. at::addmm(residual, mixed, out_proj_weight^T): the output projection with the residual
//      accumulated by cuBLAS (a real GEMM over all rows, where cuBLAS beats anything simple).
// Every head recomputes the LayerNorm statistics of its video's rows: T * W reads from L2,
// negligible next to the head's 3 * hd * W weight slice, and it avoids a third launch.
//
// Why tensor cores for fp16/bf16 (issue 16: "use tensor cores for its projections only if the
// GPU-time model says it pays"). The projections are 6 F W^2 of the 6 F W^2 + 4 F T W FLOPs
// here. On CUDA-core FMA this kernel models (python -m benchmarks.gpu_model on make gpu-static's
// sm_90a rows, bf16, batch 32, T = 8, H100) at 14.0 us at X-CLIP-B/16 and 37.4 us at L/14,
// compute bound, against 2.4 / 3.0 us for the Triton message kernel, whose projections run on
// tensor cores. The tensor-core kernel's own sm_90a figures (158 registers at DP = 64, 38.7 KiB
// at T = 8: 3 blocks per SM) model 1.5 / 3.6 us (docs/cuda.md). So fp16/bf16 run
// cfa_mma_fwd_kernel (cfa_mma.cuh: same contract and launch structure, q/k/v on mma.sync
// m16n8k16 with fp32 accumulation; its own header gives tiles, shared memory, registers), and
// the kernel below is built for fp32 only (the exact path). A model, not a measurement.
//
// Why these tiles (the fp32 kernel). 128 threads as 8 row groups (ty) x 16 lanes (tx), thread (ty,
// tx) owning rows t = ty + 8i (i < 8, so T <= 64) and head-dim columns tx + 16j: with T = 8 (the
// common case) all 128 threads still have work, and the T x T softmax rows live in one half-warp
// (shuffle reductions). The projection streams W in chunks of 16 columns: the normalised rows (Tp x
// 16) and one weight slice (DP x 16) sit in shared memory with odd row strides (17), so the 16
// lanes reading 16 different weight rows hit 16 banks. q, k and v are projected one after the other
// (three passes over the chunks) to keep the accumulators at 8 x DP/16 <= 64 registers. Head dim is
// padded to DP in {32, 64, 96, 128}; T to Tp = roundup(T, 8).
// Shared memory (acc_t units) = Tp*17 + DP*17 + 3*Tp*(DP+1) + Tp*80 + 2*Tp, sized at launch:
// T = 8, hd = 64: 13.4 KiB; T = 32: 41 KiB; T = 64: 77.8 KiB (fp32).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../xclip_ops.h"
#include "cfa_mma.cuh"
#include "common.cuh"

namespace xclip_ext {
namespace {

// ---- kernels begin (device code only below this line, up to "kernels end") ----

using namespace cuda_common;

constexpr int kMaxT = 64;            // most messages per video
constexpr int kBK = 16;              // W columns per projection chunk
constexpr int kPS = kMaxT + 16;      // row stride of the probability tile

// Shared-memory layout in acc_t units for Tp = roundup(T, 8) rows; host and device agree.
template <int DP>
struct CfaSmem {
  static constexpr int kXS = kBK + 1, kS = DP + 1;
  int x, w, q, k, v, p, mean, rstd, total;
  __host__ __device__ explicit CfaSmem(int tp) {
    x = 0;
    w = x + tp * kXS;
    q = w + DP * kXS;
    k = q + tp * kS;
    v = k + tp * kS;
    p = v + tp * kS;
    mean = p + tp * kPS;
    rstd = mean + tp;
    total = rstd + tp;
  }
};

// One block per (video, head). messages, w_in (3W, W) and the vectors are contiguous.
template <typename scalar_t, typename acc_t, int DP>
__global__ void __launch_bounds__(kThreads)
    cfa_fwd_kernel(const scalar_t* __restrict__ messages, const scalar_t* __restrict__ ln_w,
                   const scalar_t* __restrict__ ln_b, const scalar_t* __restrict__ w_in,
                   const scalar_t* __restrict__ b_in, const scalar_t* __restrict__ b_out,
                   scalar_t* __restrict__ mixed, scalar_t* __restrict__ residual, int T, int W, int hd, acc_t eps,
                   acc_t scale_log2e) {
  static_assert(DP % kTX == 0, "head dim padding must fit the 16 lanes");
  constexpr int RT = kMaxT / kTY, CT = kMaxT / kTX, CD = DP / kTX;
  constexpr int XS = CfaSmem<DP>::kXS, S = CfaSmem<DP>::kS;
  const int Tp = (T + kTY - 1) / kTY * kTY;
  const CfaSmem<DP> L(Tp);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Xs = sm + L.x;
  acc_t* Ws = sm + L.w;
  acc_t* Ps = sm + L.p;
  acc_t* Mean = sm + L.mean;
  acc_t* Rstd = sm + L.rstd;

  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t video = blockIdx.x;
  const int h = blockIdx.y;
  const int64_t row0 = video * T;  // first message row of this video
  const scalar_t* x = messages + row0 * W;

  // 1. LayerNorm statistics, two-pass in acc_t (biased variance, like F.layer_norm).
  for (int t = warp; t < T; t += kThreads / 32) {
    const scalar_t* row = x + static_cast<int64_t>(t) * W;
    acc_t sum = acc_t(0);
    for (int c = lane; c < W; c += 32) sum += static_cast<acc_t>(row[c]);
    const acc_t mean = warp_sum(sum) / acc_t(W);
    acc_t sq = acc_t(0);
    for (int c = lane; c < W; c += 32) {
      const acc_t dlt = static_cast<acc_t>(row[c]) - mean;
      sq += dlt * dlt;
    }
    const acc_t var = warp_sum(sq) / acc_t(W);
    if (lane == 0) {
      Mean[t] = mean;
      Rstd[t] = rsqrt_(var + eps);
    }
  }
  __syncthreads();

  // 2. This head's q, k, v (part 0, 1, 2): rows [part*W + h*hd, +hd) of w_in.
  for (int part = 0; part < 3; ++part) {
    const scalar_t* wrows = w_in + (static_cast<int64_t>(part) * W + static_cast<int64_t>(h) * hd) * W;
    acc_t acc[RT][CD];
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < CD; ++j) acc[i][j] = acc_t(0);

    for (int k0 = 0; k0 < W; k0 += kBK) {
      __syncthreads();  // everyone is done with the previous chunk
      for (int idx = threadIdx.x; idx < Tp * kBK; idx += kThreads) {
        const int t = idx / kBK, c = idx - t * kBK, gc = k0 + c;
        acc_t val = acc_t(0);
        if (t < T && gc < W) {
          val = (static_cast<acc_t>(x[static_cast<int64_t>(t) * W + gc]) - Mean[t]) * Rstd[t] *
                    static_cast<acc_t>(ln_w[gc]) +
                static_cast<acc_t>(ln_b[gc]);
        }
        Xs[t * XS + c] = val;
      }
      for (int idx = threadIdx.x; idx < DP * kBK; idx += kThreads) {
        const int d = idx / kBK, c = idx - d * kBK, gc = k0 + c;
        acc_t val = acc_t(0);
        if (d < hd && gc < W) val = static_cast<acc_t>(wrows[static_cast<int64_t>(d) * W + gc]);
        Ws[d * XS + c] = val;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        acc_t wv[CD];
#pragma unroll
        for (int j = 0; j < CD; ++j) wv[j] = Ws[(tx + kTX * j) * XS + kk];
#pragma unroll
        for (int i = 0; i < RT; ++i) {
          if (kTY * i < Tp) {  // row ty + 8i < Tp
            const acc_t xv = Xs[(ty + kTY * i) * XS + kk];
#pragma unroll
            for (int j = 0; j < CD; ++j) acc[i][j] += xv * wv[j];
          }
        }
      }
    }

    acc_t* dst = sm + (part == 0 ? L.q : part == 1 ? L.k : L.v);
    const scalar_t* bias = b_in + static_cast<int64_t>(part) * W + static_cast<int64_t>(h) * hd;
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const int t = ty + kTY * i;
      if (t < Tp) {
#pragma unroll
        for (int j = 0; j < CD; ++j) {
          const int d = tx + kTX * j;
          dst[t * S + d] = (t < T && d < hd) ? acc[i][j] + static_cast<acc_t>(bias[d]) : acc_t(0);
        }
      }
    }
  }
  __syncthreads();

  // 3. Scores and softmax over the T keys (log2 domain); the probabilities go to Ps.
  const acc_t* Qs = sm + L.q;
  const acc_t* Ks = sm + L.k;
  const acc_t* Vs = sm + L.v;
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    if (kTY * i < Tp) {  // uniform across the block: the shuffles below see every lane
      const int t = ty + kTY * i;
      acc_t s[CT];
      acc_t mx = acc_t(-INFINITY);
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        const int key = tx + kTX * j;
        acc_t dot = acc_t(0);
        if (key < T) {
          for (int d = 0; d < DP; ++d) dot += Qs[t * S + d] * Ks[key * S + d];
        }
        s[j] = key < T ? dot * scale_log2e : acc_t(-INFINITY);
        mx = max_(mx, s[j]);
      }
      mx = half_warp_max(mx);  // finite: key 0 < T is always present
      acc_t sum = acc_t(0);
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        s[j] = exp2_(s[j] - mx);
        sum += s[j];
      }
      const acc_t inv = acc_t(1) / half_warp_sum(sum);
#pragma unroll
      for (int j = 0; j < CT; ++j) Ps[t * kPS + tx + kTX * j] = s[j] * inv;
    }
  }
  __syncthreads();

  // 4. out = P V into this head's columns of `mixed`; residual = messages + out_proj_bias there.
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int t = ty + kTY * i;
    if (t < T) {
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        const int d = tx + kTX * j;
        if (d < hd) {
          acc_t o = acc_t(0);
          for (int s = 0; s < T; ++s) o += Ps[t * kPS + s] * Vs[s * S + d];
          const int64_t idx = (row0 + t) * W + static_cast<int64_t>(h) * hd + d;
          mixed[idx] = static_cast<scalar_t>(o);
          residual[idx] = static_cast<scalar_t>(static_cast<acc_t>(messages[idx]) +
                                                static_cast<acc_t>(b_out[static_cast<int64_t>(h) * hd + d]));
        }
      }
    }
  }
}

// ---- kernels end ----


// The shared-memory check and opt-in above 48 KiB for one launch.
template <typename Kernel>
void prepare_shared_memory(Kernel kernel, size_t bytes, int64_t num_frames, int64_t head_dim) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "message_attention_forward_cuda: needs ", bytes,
              " bytes of shared memory per block for T = ", num_frames, ", head dim ", head_dim,
              "; this GPU allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// fp32: the exact CUDA-core kernel above.
void launch_fma_forward(const at::Tensor& messages, const at::Tensor& lnw, const at::Tensor& lnb,
                        const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& b_out, at::Tensor& mixed,
                        at::Tensor& residual, int64_t num_frames, int64_t videos, int64_t num_heads, int64_t head_dim,
                        double eps, cudaStream_t stream) {
  const int64_t width = messages.size(1);
  dispatch_head_dim(head_dim, "message_attention (cuda): head dim W / num_heads", [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    const int tp = static_cast<int>((num_frames + kTY - 1) / kTY * kTY);
    const size_t smem = static_cast<size_t>(CfaSmem<DP>(tp).total) * sizeof(float);
    auto kernel = cfa_fwd_kernel<float, float, DP>;
    prepare_shared_memory(kernel, smem, num_frames, head_dim);
    const dim3 grid(static_cast<unsigned>(videos), static_cast<unsigned>(num_heads));
    const double scale_log2e = kLog2e / std::sqrt(static_cast<double>(head_dim));
    kernel<<<grid, kThreads, smem, stream>>>(
        messages.data_ptr<float>(), lnw.data_ptr<float>(), lnb.data_ptr<float>(), w_in.data_ptr<float>(),
        b_in.data_ptr<float>(), b_out.data_ptr<float>(), mixed.data_ptr<float>(), residual.data_ptr<float>(),
        static_cast<int>(num_frames), static_cast<int>(width), static_cast<int>(head_dim), static_cast<float>(eps),
        static_cast<float>(scale_log2e));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// fp16/bf16: the tensor-core kernel (cfa_mma.cuh) on the tensors' raw 16-bit values; grid, block
// and shared memory from its CfaTiles, the weight staging path from make_cfa_args.
template <typename Tag>
void launch_mma_forward(const at::Tensor& messages, const at::Tensor& lnw, const at::Tensor& lnb,
                        const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& b_out, at::Tensor& mixed,
                        at::Tensor& residual, int64_t num_frames, int64_t videos, int64_t num_heads, int64_t head_dim,
                        double eps, cudaStream_t stream) {
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); };
  dispatch_head_dim(head_dim, "message_attention (cuda): head dim W / num_heads", [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    using L = cfa_mma::CfaTiles<DP>;
    static_assert(L::kThreads == kThreads, "one block size for every CUDA kernel (gpu_static reads kThreads)");
    static_assert(L::kMaxT == kMaxT, "both kernels take up to kMaxT frames");
    const size_t smem = static_cast<size_t>(L::shared_bytes(static_cast<int>(num_frames)));
    auto kernel = cfa_mma::cfa_mma_fwd_kernel<Tag, DP>;
    prepare_shared_memory(kernel, smem, num_frames, head_dim);
    const cfa_mma::CfaArgs args = cfa_mma::make_cfa_args(
        bits(messages), bits(lnw), bits(lnb), bits(w_in), bits(b_in), bits(b_out),
        reinterpret_cast<uint16_t*>(mixed.mutable_data_ptr()), reinterpret_cast<uint16_t*>(residual.mutable_data_ptr()),
        static_cast<int>(num_frames), static_cast<int>(messages.size(1)), static_cast<int>(head_dim), eps);
    const dim3 grid(static_cast<unsigned>(videos), static_cast<unsigned>(num_heads));
    kernel<<<grid, L::kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor message_attention_forward_cuda(const at::Tensor& messages_in, const at::Tensor& ln_weight,
                                          const at::Tensor& ln_bias, const at::Tensor& in_proj_weight,
                                          const at::Tensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                          const at::Tensor& out_proj_bias, int64_t num_frames, int64_t num_heads,
                                          double eps) {
  TORCH_CHECK(messages_in.is_cuda(), "message_attention_forward_cuda: messages must be a CUDA tensor");
  TORCH_CHECK_VALUE(messages_in.dim() == 2, "messages: expected (F, W), got ", messages_in.sizes());
  const int64_t frames = messages_in.size(0), width = messages_in.size(1);
  TORCH_CHECK_VALUE(num_frames >= 1 && num_frames <= kMaxT,
                    "num_frames: the CUDA message attention supports 1..64 frames per video, got ", num_frames);
  TORCH_CHECK_VALUE(frames % num_frames == 0, "num_frames: expected a divisor of F = ", frames, ", got ",
                    num_frames);
  TORCH_CHECK_VALUE(num_heads >= 1 && width % num_heads == 0, "num_heads: expected a divisor of W = ", width,
                    ", got ", num_heads);
  TORCH_CHECK_VALUE(width <= INT32_MAX / 4, "messages: width too large: ", width);
  const int64_t head_dim = width / num_heads;
  const int64_t videos = frames / num_frames;
  const c10::cuda::CUDAGuard guard(messages_in.device());

  const at::Tensor messages = messages_in.contiguous();
  const at::Tensor lnw = ln_weight.contiguous(), lnb = ln_bias.contiguous();
  const at::Tensor w_in = in_proj_weight.contiguous(), b_in = in_proj_bias.contiguous();
  const at::Tensor b_out = out_proj_bias.contiguous();
  at::Tensor mixed = at::empty({frames, width}, messages.options());
  at::Tensor residual = at::empty({frames, width}, messages.options());

  if (frames > 0 && width > 0) {
    TORCH_CHECK_VALUE(videos <= INT32_MAX && num_heads <= 65535, "message_attention (cuda): too many videos or heads");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (messages.scalar_type()) {
      case at::kFloat:
        launch_fma_forward(messages, lnw, lnb, w_in, b_in, b_out, mixed, residual, num_frames, videos, num_heads,
                           head_dim, eps, stream);
        break;
      case at::kHalf:
        launch_mma_forward<warp_mma::F16>(messages, lnw, lnb, w_in, b_in, b_out, mixed, residual, num_frames, videos,
                                          num_heads, head_dim, eps, stream);
        break;
      case at::kBFloat16:
        launch_mma_forward<warp_mma::BF16>(messages, lnw, lnb, w_in, b_in, b_out, mixed, residual, num_frames,
                                           videos, num_heads, head_dim, eps, stream);
        break;
      default:
        TORCH_CHECK_VALUE(false, "message_attention_forward_cuda: messages must be float32, float16 or bfloat16, got ",
                          messages.scalar_type());
    }
  }
  // The output projection, accumulating onto messages + out_proj_bias: the second launch.
  return at::addmm(residual, mixed, out_proj_weight.t());
}

}  // namespace xclip_ext
