// CFA forward (the fused message path: LayerNorm + q/k/v + attention over T) for fp16/bf16 with
// the q/k/v projections on tensor cores (mma.sync.m16n8k16, fp32 accumulation), written only on
// the building blocks of warp_mma.cuh so that the same source runs on the GPU and, through the
// host model (host_model/simt.h), on the CPU in `make test` (docs/cuda.md). The contract is the
// FMA kernel's (message_attention.cu, header): one block per (video, head) writes that head's
// columns of `mixed` = attention(q, k, v) and `residual` = messages + out_proj_bias; the
// output projection stays at::addmm (cuBLAS).
//
// Per block (128 threads = 4 warps):
//   1. fp32 LayerNorm statistics of the video's T <= 64 rows (one warp per row, two passes).
//   2. q | k | v = LN(m) W^T + b as one GEMM of (Tp16 x W) by (W x 3 DP) (Tp16 = T rounded up
//      to 16-row m-tiles, zero rows past T; DP the head dim padded to 32, 64, 96 or 128, zero
//      weight rows past hd), streamed over W in k-chunks of 32:
//        A  the normalised rows of the chunk, computed in fp32 from the statistics and rounded
//           once to the 16-bit type (what PyTorch's LayerNorm at that dtype returns), stored
//           with plain stores;
//        B  the head's weight rows of the chunk (a weight row in shared memory is a column of
//           B, as K is in the IFA kernel's Q K^T: ldmatrix without .trans), staged with
//           cp.async 16-byte copies, double-buffered: chunk c + 1 is in flight (and its A being
//           written) while chunk c is multiplied;
//      each warp owns a contiguous run of the n8 tiles (a quarter of the 3 DP / 8, so T = 8,
//      one m-tile, still uses all four warps) across all m-tiles; one ldmatrix.x4 gives one n8
//      tile's B fragments for both k16 steps of a chunk. At DP 96 and 128 the three parts go in
//      three passes over W (one part each): one pass would need 144 / 192 fp32 accumulators per
//      thread at T = 64, past the register file without spills.
//   3. bias added in fp32, q, k, v kept in fp32 in shared memory; the T x T attention on CUDA
//      cores exactly as the FMA kernel does it (it is tiny: T <= 64 keys).
// Weights whose rows cannot be copied 16 bytes at a time (W % 8 != 0 or w_in not 16-byte
// aligned) take a plain element-wise staging path into the same buffers (CfaArgs::vec_w).
// Shared rows of the staging buffers are 32 + 8 elements (80 bytes): the 8 rows of one ldmatrix
// phase start in 8 different 16-byte bank groups, so fragment loads are conflict-free.
//
// Sizes (CfaTiles; docs/cuda.md): shared memory at T = 8 / 64: 20.7 / 50.2, 38.7 / 89.2,
// 26.7 / 98.2, 34.7 / 127.2 KiB at DP = 32, 64, 96, 128; registers (nvcc 13.0 -O3, -Xptxas -v)
// 91, 158, 116-118, 148 on sm_80 and 94, 158, 125, 155 on sm_90a, no spills. Per thread at DP
// 64: 4 m-tiles x 6 n8 tiles x 4 fp32 accumulators (sized for T = 64 whatever T is).
#pragma once

#include <cmath>
#include <cstdint>

#include "warp_mma.cuh"

namespace xclip_ext::cfa_mma {

// Everything the kernel reads, as the launcher (message_attention.cu) and the host-model entry
// (host_model/cfa_forward_model.cpp) fill it. All 16-bit tensors contiguous.
struct CfaArgs {
  const uint16_t* messages;  // (F, W), F = videos * T
  const uint16_t* ln_w;      // (W,)
  const uint16_t* ln_b;      // (W,)
  const uint16_t* w_in;      // (3W, W): q, k, v rows, head h at rows [part W + h hd, + hd)
  const uint16_t* b_in;      // (3W,)
  const uint16_t* b_out;     // (W,)
  uint16_t* mixed;           // (F, W)
  uint16_t* residual;        // (F, W)
  int t, w, hd;              // frames per video, width, head dim
  float eps;
  float scale_log2e;  // softmax scale 1 / sqrt(hd) times log2(e): the softmax runs in base 2
  bool vec_w;         // w_in rows may be staged with 16-byte copies (weights_vectorizable)
};

// Byte offsets of the dynamic shared memory for one T; host and device agree.
struct CfaLayout {
  int64_t a, b, p, qkv, mean, rstd, total;
};

// Tiles and the shared-memory layout; the launcher and the host-model entry size the grid and
// the dynamic shared memory from these (one definition for both).
template <int DP>
struct CfaTiles {
  static_assert(DP == 32 || DP == 64 || DP == 96 || DP == 128, "head dim padded to 32, 64, 96 or 128");
  static constexpr int kThreads = 128, kWarps = kThreads / 32;
  static constexpr int kMaxT = 64;           // most messages per video
  static constexpr int kBK = 32;             // W columns per k-chunk: two k16 steps
  static constexpr int kStride = kBK + 8;    // 16-bit elements per staging row (see the header)
  static constexpr int kParts = DP <= 64 ? 3 : 1;  // of q, k, v per pass over W (see the header)
  static constexpr int kPasses = 3 / kParts;
  static constexpr int kNRows = kParts * DP;  // B rows (weight rows) per chunk
  static constexpr int kWarpTiles = kNRows / 8 / kWarps;  // n8 tiles per warp
  static constexpr int kMTiles = kMaxT / 16;
  static constexpr int kS = DP + 1;         // fp32 q/k/v row stride (odd: the FMA attention's reads)
  static constexpr int kPS = kMaxT + 16;    // fp32 probability row stride
  static_assert(kWarpTiles * 8 * kWarps == kNRows, "the n8 tiles split evenly over the warps");

  static constexpr int rows16(int t) { return (t + 15) / 16 * 16; }
  static constexpr int rows8(int t) { return (t + 7) / 8 * 8; }
  // A double buffer (rows16(t) rows), B double buffer, and the probabilities aliasing both
  // (they are used only after the last chunk); then q, k, v (rows8(t) rows each), mean, rstd.
  static constexpr CfaLayout layout(int t) {
    const int64_t a_bytes = int64_t{2} * rows16(t) * kStride * 2;
    const int64_t b_bytes = int64_t{2} * kNRows * kStride * 2;
    const int64_t p_bytes = int64_t{rows8(t)} * kPS * 4;
    const int64_t staging = a_bytes + b_bytes > p_bytes ? a_bytes + b_bytes : p_bytes;
    const int64_t qkv = staging;
    const int64_t mean = qkv + int64_t{3} * rows8(t) * kS * 4;
    const int64_t rstd = mean + int64_t{rows8(t)} * 4;
    const int64_t total = (rstd + int64_t{rows8(t)} * 4 + 15) / 16 * 16;
    return CfaLayout{0, a_bytes, 0, qkv, mean, rstd, total};
  }
  static constexpr int64_t shared_bytes(int t) { return layout(t).total; }
};

// Host side: can the (3W, W) weight's rows be moved 16 bytes (8 elements) at a time? Needs
// W % 8 == 0 (every row start then stays 16-byte aligned) and a 16-byte aligned base.
inline bool weights_vectorizable(const void* w_in, int64_t width) {
  return width % 8 == 0 && reinterpret_cast<uintptr_t>(w_in) % 16 == 0;
}

// Host side: the kernel's arguments as the launcher and the host-model entry pass them (all
// contiguous; messages (videos * t, w), w_in (3w, w)); decides the weight staging path.
inline CfaArgs make_cfa_args(const uint16_t* messages, const uint16_t* ln_w, const uint16_t* ln_b,
                             const uint16_t* w_in, const uint16_t* b_in, const uint16_t* b_out, uint16_t* mixed,
                             uint16_t* residual, int t, int w, int hd, double eps) {
  const double scale_log2e = 1.4426950408889634 / std::sqrt(static_cast<double>(hd));
  return CfaArgs{messages, ln_w, ln_b, w_in, b_in, b_out, mixed, residual, t, w, hd, static_cast<float>(eps),
                 static_cast<float>(scale_log2e), weights_vectorizable(w_in, w)};
}

namespace detail {

// Sum over the 32 lanes of a warp, the same butterfly order on every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += warp_mma::shfl_xor(v, off);
  return v;
}

// NaN-propagating max (a NaN score must reach the row's output, as in the FMA kernel).
__device__ __forceinline__ float nan_max(float a, float b) { return a > b ? a : b; }

// The weight rows of one k-chunk into B (kNRows x kBK, row pitch kStride): row n is column
// d = n % DP of part pass * kParts + n / DP; rows past hd and columns past W become zero.
template <int DP>
__device__ __forceinline__ void stage_b(uint16_t* dst, const CfaArgs& a, int h, int pass, int k0) {
  using L = CfaTiles<DP>;
  constexpr int S = L::kStride, BK = L::kBK, kChunks = BK / 8;
  static_assert((L::kNRows * kChunks) % L::kThreads == 0, "B chunk must split evenly");
  const int64_t w = a.w;
  if (a.vec_w) {
#pragma unroll
    for (int i = 0; i < L::kNRows * kChunks / L::kThreads; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + i * L::kThreads;
      const int n = idx / kChunks, c = (idx - n * kChunks) * 8;
      const int part = pass * L::kParts + n / DP, d = n % DP;
      const bool full = d < a.hd && k0 + c < a.w;  // w % 8 == 0 here: a chunk is all in or all out
      const uint16_t* src = a.w_in + (part * w + int64_t{h} * a.hd + d) * w + k0 + c;
      // A zero-filling copy reads nothing; it still gets an address inside the operand.
      warp_mma::cp_async_16(dst + n * S + c, full ? src : a.w_in, full);
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < L::kNRows * BK / L::kThreads; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + i * L::kThreads;
      const int n = idx / BK, c = idx - n * BK;
      const int part = pass * L::kParts + n / DP, d = n % DP;
      dst[n * S + c] = (d < a.hd && k0 + c < a.w) ? a.w_in[(part * w + int64_t{h} * a.hd + d) * w + k0 + c]
                                                  : uint16_t{0};
    }
  }
}

// The normalised rows of one k-chunk into A (rows16(T) x kBK, row pitch kStride), rounded once
// to the 16-bit type; rows past T and columns past W become zero.
template <typename Tag, int DP>
__device__ __forceinline__ void stage_a(uint16_t* dst, const CfaArgs& a, const uint16_t* __restrict__ x,
                                        const float* mean, const float* rstd, int rows, int k0) {
  using L = CfaTiles<DP>;
  constexpr int S = L::kStride, BK = L::kBK;
  const Tag tag{};
#pragma unroll 1
  for (int idx = static_cast<int>(threadIdx.x); idx < rows * BK; idx += L::kThreads) {
    const int r = idx / BK, c = idx - r * BK, gc = k0 + c;
    uint16_t bits = 0;
    if (r < a.t && gc < a.w) {
      const float xv = warp_mma::to_float(tag, x[static_cast<int64_t>(r) * a.w + gc]);
      bits = warp_mma::from_float(tag, (xv - mean[r]) * rstd[r] * warp_mma::to_float(tag, a.ln_w[gc]) +
                                           warp_mma::to_float(tag, a.ln_b[gc]));
    }
    dst[r * S + c] = bits;
  }
}

}  // namespace detail

// mixed[v T + i, h hd + d] = sum_j softmax_j(scale q_i . k_j) v_j[d] and residual there =
// messages + b_out, for the fp16 (Tag = warp_mma::F16) or bf16 (BF16) bits in a.
// Grid (videos, heads), 128 threads, CfaTiles<DP>::shared_bytes(T) of dynamic shared memory;
// DP >= hd, 1 <= T <= 64.
template <typename Tag, int DP>
__global__ void __launch_bounds__(CfaTiles<DP>::kThreads) cfa_mma_fwd_kernel(const CfaArgs a) {
  using namespace warp_mma;
  using L = CfaTiles<DP>;
  constexpr int S = L::kStride, BK = L::kBK, NTW = L::kWarpTiles, MT = L::kMTiles;
  constexpr int QS = L::kS, PS = L::kPS;
  constexpr int kTX = 16, kTY = L::kThreads / kTX;  // attention: 8 row groups x 16 lanes
  constexpr int RT = L::kMaxT / kTY, CT = L::kMaxT / kTX, CD = DP / kTX;
  const Tag tag{};

  const int T = a.t, W = a.w, hd = a.hd;
  const int tp16 = L::rows16(T), tp8 = L::rows8(T), mtiles = tp16 / 16;
  const CfaLayout lay = L::layout(T);
  XK_EXTERN_SHARED(smem_raw);
  uint16_t* a_s = reinterpret_cast<uint16_t*>(smem_raw + lay.a);
  uint16_t* b_s = reinterpret_cast<uint16_t*>(smem_raw + lay.b);
  float* p_s = reinterpret_cast<float*>(smem_raw + lay.p);
  float* qkv_s = reinterpret_cast<float*>(smem_raw + lay.qkv);
  float* mean_s = reinterpret_cast<float*>(smem_raw + lay.mean);
  float* rstd_s = reinterpret_cast<float*>(smem_raw + lay.rstd);
  const int a_buf = tp16 * S, b_buf = L::kNRows * S;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  // ldmatrix: lanes 8j..8j+7 point at the rows of 8x8 matrix j.
  const int lrow = lane % 8, lmat = lane / 8;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * T;  // first message row of this video
  const int h = static_cast<int>(blockIdx.y);
  const uint16_t* x = a.messages + row0 * W;

  // 1. LayerNorm statistics in fp32, two passes (biased variance, like F.layer_norm).
  for (int r = warp; r < T; r += L::kWarps) {  // uniform across the warp: the shuffles see all lanes
    const uint16_t* row = x + static_cast<int64_t>(r) * W;
    float sum = 0.0f;
    for (int c = lane; c < W; c += 32) sum += to_float(tag, row[c]);
    const float mean = detail::warp_sum(sum) / static_cast<float>(W);
    float sq = 0.0f;
    for (int c = lane; c < W; c += 32) {
      const float dlt = to_float(tag, row[c]) - mean;
      sq += dlt * dlt;
    }
    const float var = detail::warp_sum(sq) / static_cast<float>(W);
    if (lane == 0) {
      mean_s[r] = mean;
      rstd_s[r] = 1.0f / sqrtf(var + a.eps);
    }
  }
  sync_block();

  // 2. The projections: pass p covers parts [p kParts, (p + 1) kParts) of q, k, v.
  const int chunks = (W + BK - 1) / BK;
#pragma unroll 1
  for (int pass = 0; pass < L::kPasses; ++pass) {
    float acc[MT][NTW][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NTW; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;

    // Prologue: chunk 0's B in flight, its A written (visible after the first barrier below).
    detail::stage_b<DP>(b_s, a, h, pass, 0);
    cp_async_commit();
    detail::stage_a<Tag, DP>(a_s, a, x, mean_s, rstd_s, tp16, 0);
    int buf = 0;
#pragma unroll 1
    for (int c = 0; c < chunks; ++c, buf ^= 1) {
      // The other buffers are free (the barrier ending the last iteration): chunk c + 1's B in
      // flight and its A written while this chunk is multiplied.
      if (c + 1 < chunks) {
        detail::stage_b<DP>(b_s + (buf ^ 1) * b_buf, a, h, pass, (c + 1) * BK);
        cp_async_commit();
        detail::stage_a<Tag, DP>(a_s + (buf ^ 1) * a_buf, a, x, mean_s, rstd_s, tp16, (c + 1) * BK);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      sync_block();
      const uint16_t* as = a_s + buf * a_buf;
      const uint16_t* bs = b_s + buf * b_buf;

#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        // B fragments of this warp's n8 tiles for k16 step kk: matrices (rows n0..n0 + 7) x
        // (cols 16 kk + 0-7 | + 8-15) are b[0], b[1] (one k step at a time: fewer live registers).
        uint32_t bf[NTW][2];
#pragma unroll
        for (int j = 0; j < NTW; ++j)
          ldmatrix_x2(bf[j], bs + ((warp * NTW + j) * 8 + lrow) * S + 16 * kk + 8 * (lmat % 2));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (mt < mtiles) {  // uniform across the block
            // A: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in fragment order a[0..3].
            uint32_t af[4];
            ldmatrix_x4(af, as + (mt * 16 + lrow + 8 * (lmat % 2)) * S + 16 * kk + 8 * (lmat / 2));
#pragma unroll
            for (int j = 0; j < NTW; ++j) mma_m16n8k16(tag, acc[mt][j], af, bf[j], acc[mt][j]);
          }
        }
      }
      // Every warp is done with these buffers before the next iteration refills them. (The host
      // model's test drops it with XK_TEST_DROP_CFA_TILE_BARRIER and expects its race error;
      // never defined in a real build.)
#ifndef XK_TEST_DROP_CFA_TILE_BARRIER
      sync_block();
#endif
    }

    // Bias in fp32; q, k, v rows past T and columns past hd are zero (the attention's padding).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (mt < mtiles) {
#pragma unroll
        for (int j = 0; j < NTW; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = mt * 16 + g + 8 * (e / 2);
            const int n = (warp * NTW + j) * 8 + 2 * t4 + e % 2;
            const int part = pass * L::kParts + n / DP, d = n % DP;
            if (r < tp8) {
              qkv_s[(part * tp8 + r) * QS + d] =
                  (r < T && d < hd) ? acc[mt][j][e] + to_float(tag, a.b_in[static_cast<int64_t>(part) * W +
                                                                          static_cast<int64_t>(h) * hd + d])
                                    : 0.0f;
            }
          }
        }
      }
    }
  }
  sync_block();

  // 3. Scores and softmax over the T keys (log2 domain), thread (ty, tx) owning rows ty + 8i
  // and keys tx + 16j; a row lives in one half-warp (xor shuffles below 16 stay in it). The
  // probabilities go to p_s (aliasing the staging buffers, free after the last chunk).
  const int tx = tid % kTX, ty = tid / kTX;
  const float* qs = qkv_s;
  const float* ks = qkv_s + tp8 * QS;
  const float* vs = qkv_s + 2 * tp8 * QS;
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    if (kTY * i < tp8) {  // uniform across the block
      const int r = ty + kTY * i;
      float s[CT];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        const int key = tx + kTX * j;
        float dot = 0.0f;
        if (key < T) {
          for (int d = 0; d < DP; ++d) dot += qs[r * QS + d] * ks[key * QS + d];
        }
        s[j] = key < T ? dot * a.scale_log2e : -INFINITY;
        mx = detail::nan_max(mx, s[j]);
      }
#pragma unroll
      for (int off = kTX / 2; off > 0; off >>= 1) mx = detail::nan_max(mx, shfl_xor(mx, off));
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < CT; ++j) {
        s[j] = exp2f(s[j] - mx);  // finite mx: key 0 < T is always present
        sum += s[j];
      }
#pragma unroll
      for (int off = kTX / 2; off > 0; off >>= 1) sum += shfl_xor(sum, off);
      const float inv = 1.0f / sum;
#pragma unroll
      for (int j = 0; j < CT; ++j) p_s[r * PS + tx + kTX * j] = s[j] * inv;
    }
  }
  sync_block();

  // 4. out = P V into this head's columns of `mixed`; residual = messages + out_proj_bias there.
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int r = ty + kTY * i;
    if (r < T) {
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        const int d = tx + kTX * j;
        if (d < hd) {
          float o = 0.0f;
          for (int s = 0; s < T; ++s) o += p_s[r * PS + s] * vs[s * QS + d];
          const int64_t idx = (row0 + r) * W + static_cast<int64_t>(h) * hd + d;
          a.mixed[idx] = from_float(tag, o);
          a.residual[idx] = from_float(tag, to_float(tag, a.messages[idx]) +
                                                to_float(tag, a.b_out[static_cast<int64_t>(h) * hd + d]));
        }
      }
    }
  }
}

}  // namespace xclip_ext::cfa_mma
