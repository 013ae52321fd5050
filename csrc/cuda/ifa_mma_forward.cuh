// IFA forward for fp16/bf16 on tensor cores (mma.sync.m16n8k16, fp32 accumulation),
// FlashAttention-2 style, written only on the building blocks of warp_mma.cuh so that the same
// source runs on the GPU and, through the host model (host_model/simt.h), on the CPU in
// `make test` (docs/cuda.md). The math is the FMA kernel's (frame_attention.cu, header): query
// rows i of frame f, head h attend to the N keys of (f, h) plus the message key; the message
// opens the online softmax (running max = its score, sum = 1, accumulator = msg_v), so masked
// (-inf) key columns of a ragged last tile can never make a NaN.
//
// One block = 4 warps = 64 query rows of one frame-head (blockIdx.x = f * H + h, blockIdx.y =
// query tile); warp w owns rows 16w..16w+15. Per key tile of 32:
//   S = Q K^T       A = Q fragments (loaded once, kept in registers), B = K via ldmatrix
//                   (a K row in shared memory is a column of B: no transpose needed);
//   online softmax  on S in the mma C layout: lane (g = lane / 4, t = lane % 4) holds rows g and
//                   g + 8, columns 2t, 2t + 1 of every n8 tile; a row's max is the quad's max
//                   (shfl_xor 1 and 2); its sum stays per lane until the end;
//   O += P V        P's C fragments of two n8 tiles are the A fragment of one k16 step
//                   (packed to 16 bits in registers); B = V via ldmatrix.trans.
// Q and the K/V tiles are staged in shared memory as raw 16-bit values with cp.async (16-byte
// copies, zero-filled past N and past D), K/V double-buffered so that tile t + 1 is in flight
// while tile t is multiplied. Inputs whose rows cannot be copied 16 bytes at a time (D not a
// multiple of 8, or a pointer/stride not 16-byte aligned) take a plain element-wise staging
// path into the same buffers (FwdArgs::vec_in). Shared rows are DP + 8 elements long: the 8
// row addresses of one ldmatrix phase then fall in 8 different 16-byte bank groups (row pitch
// 2 DP + 16 bytes, DP a multiple of 16), so fragment loads are conflict-free.
//
// Sizes (FwdTiles; docs/cuda.md): shared memory (64 + 4 x 32) (DP + 8) x 2 bytes = 15.0, 27.0,
// 39.0, 51.0 KiB at DP = 32, 64, 96, 128; registers (nvcc 13.0 -O3, -Xptxas -v, fp16 = bf16)
// 80, 95, 127, 165 on sm_80 and 80, 83, 127, 166 on sm_90a, no spills. Per thread: the O
// accumulator (DP / 2 floats), S (16 floats), Q fragments (DP / 4 registers).
#pragma once

#include <cstdint>

#include "mma_tiles.cuh"
#include "warp_mma.cuh"

namespace xclip_ext::ifa_mma {

using mma_tiles::Rows16;
using mma_tiles::Vecs16;

// Everything the forward kernel reads, as the launcher (frame_attention.cu) and the host-model
// entry (host_model/ifa_forward_model.cpp) fill it.
struct FwdArgs {
  Rows16 q, k, v;
  Vecs16 msg_k, msg_v;
  uint16_t* out;  // (F, N, H, D), contiguous
  float* lse;     // (F, H, N), natural log
  int n, heads, dim;
  float scale_log2e;  // softmax scale * log2(e): the softmax runs in base 2
  bool vec_in;        // q, k, v rows may be staged with 16-byte copies (mma_tiles::rows_vectorizable)
  bool vec_out;       // out rows may be written 16 bytes at a time
};

// Tiles and the shared-memory layout, in 16-bit elements; the launcher and the host-model
// entry size the grid and the dynamic shared memory from these (one definition for both).
template <int DP>
struct FwdTiles {
  static_assert(DP == 32 || DP == 64 || DP == 96 || DP == 128, "head dim padded to 32, 64, 96 or 128");
  static constexpr int kThreads = 128, kWarps = kThreads / 32;
  static constexpr int kBlockM = 16 * kWarps;  // one m16 row block per warp
  // Key tiles of 32: at DP = 64, 96 registers against 135-140 with 64 (5 blocks per SM instead
  // of 3), and at most 31 masked key columns (N = 197: 224 keys computed, not 256).
  static constexpr int kBlockN = 32;
  static constexpr int kStride = DP + 8;  // see the file header: conflict-free ldmatrix
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockM * kStride;  // two K buffers, then two V buffers
  static constexpr int kV = kK + 2 * kBlockN * kStride;
  static constexpr int kElems = kV + 2 * kBlockN * kStride;
  static constexpr int64_t kSharedBytes = int64_t{kElems} * 2;
  static constexpr int64_t query_tiles(int64_t n) { return (n + kBlockM - 1) / kBlockM; }
};

// Host side: the kernel's arguments from the operands as the launcher and the host-model entry
// pass them (out contiguous (F, N, H, D)); decides the staging paths. scale: the softmax scale.
inline FwdArgs make_fwd_args(Rows16 q, Rows16 k, Rows16 v, Vecs16 msg_k, Vecs16 msg_v, uint16_t* out, float* lse,
                             int n, int heads, int dim, double scale) {
  const bool vec_in = mma_tiles::rows_vectorizable(q, dim) && mma_tiles::rows_vectorizable(k, dim) &&
                      mma_tiles::rows_vectorizable(v, dim);
  const int64_t row = int64_t{heads} * dim;
  const bool vec_out = mma_tiles::rows_vectorizable(Rows16{out, row * n, row, dim}, dim);
  return FwdArgs{q, k, v, msg_k, msg_v, out, lse, n, heads, dim, static_cast<float>(scale * 1.4426950408889634),
                 vec_in, vec_out};
}

namespace detail {

// 16 bytes moved as one unit (128-bit load/store on the device).
struct alignas(16) Chunk16 {
  uint32_t w[4];
};

}  // namespace detail

// out[f, i, h, :] = softmax_j(scale <q_i, key_j>) . value_j over keys {k[f, :, h], msg_k[f, h]}
// and lse[f, h, i] (natural log), for the fp16 (Tag = warp_mma::F16) or bf16 (BF16) bits in a.
// Grid (F * H, FwdTiles<DP>::query_tiles(N)), 128 threads, FwdTiles<DP>::kSharedBytes of dynamic
// shared memory; DP >= D.
template <typename Tag, int DP>
__global__ void __launch_bounds__(FwdTiles<DP>::kThreads) ifa_mma_fwd_kernel(const FwdArgs a) {
  using namespace warp_mma;
  using L = FwdTiles<DP>;
  constexpr int S = L::kStride, BM = L::kBlockM, BN = L::kBlockN;
  constexpr int KD = DP / 16;  // k16 steps of Q K^T
  constexpr int NT = BN / 8;   // n8 tiles of S
  constexpr int KN = BN / 16;  // k16 steps of P V
  constexpr int DT = DP / 8;   // n8 tiles of O
  constexpr float kLn2 = 0.6931471805599453f;
  const Tag tag{};

  XK_EXTERN_SHARED(smem_raw);
  uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* q_s = smem + L::kQ;

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  // ldmatrix: lanes 8j..8j+7 point at the rows of 8x8 matrix j.
  const int lrow = lane % 8, lmat = lane / 8;
  const int64_t fh = blockIdx.x;
  const int64_t f = fh / a.heads, h = fh % a.heads;
  const int m0 = static_cast<int>(blockIdx.y) * BM;
  const int n = a.n, dim = a.dim;

  const uint16_t* q_g = a.q.ptr + f * a.q.sf + h * a.q.sh;
  const uint16_t* k_g = a.k.ptr + f * a.k.sf + h * a.k.sh;
  const uint16_t* v_g = a.v.ptr + f * a.v.sf + h * a.v.sh;
  const uint16_t* mk_g = a.msg_k.ptr + f * a.msg_k.sf + h * a.msg_k.sh;
  const uint16_t* mv_g = a.msg_v.ptr + f * a.msg_v.sf + h * a.msg_v.sh;

  // Prologue: Q (group 0) and the first K/V tile (group 1) in flight; wait for Q only.
  mma_tiles::stage_rows<BM, DP, L::kThreads>(q_s, q_g, a.q.sn, m0, n, dim, a.vec_in);
  cp_async_commit();
  mma_tiles::stage_rows<BN, DP, L::kThreads>(smem + L::kK, k_g, a.k.sn, 0, n, dim, a.vec_in);
  mma_tiles::stage_rows<BN, DP, L::kThreads>(smem + L::kV, v_g, a.v.sn, 0, n, dim, a.vec_in);
  cp_async_commit();
  cp_async_wait<1>();
  sync_block();

  // This warp's 16 Q rows as A fragments: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) give
  // a[0] = rows 0-7 / cols 0-7, a[1] = rows 8-15 / cols 0-7, a[2], a[3] the same at cols 8-15.
  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk)
    ldmatrix_x4(qf[kk], q_s + (warp * 16 + lrow + 8 * (lmat % 2)) * S + 16 * kk + 8 * (lmat / 2));

  // The message key's score for rows g and g + 8, in fp32 from the same Q values: lane (g, t)
  // holds columns 16 kk + 2t + {0, 1, 8, 9}; the quad's four partial sums make the row's dot.
  float msg0 = 0.0f, msg1 = 0.0f;
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = 16 * kk + 2 * t + (e / 2) * 8 + (e % 2);
      const float key = col < dim ? to_float(tag, mk_g[col]) : 0.0f;
      const int shift = 16 * (e % 2), reg = 2 * (e / 2);  // a[0]/a[2]: row g, a[1]/a[3]: row g + 8
      msg0 += to_float(tag, static_cast<uint16_t>(qf[kk][reg] >> shift)) * key;
      msg1 += to_float(tag, static_cast<uint16_t>(qf[kk][reg + 1] >> shift)) * key;
    }
  }
  msg0 += shfl_xor(msg0, 1);
  msg0 += shfl_xor(msg0, 2);
  msg1 += shfl_xor(msg1, 1);
  msg1 += shfl_xor(msg1, 2);

  // Running state (log2 domain) for rows g (index 0) and g + 8 (index 1). The message's
  // probability-sum share, 1, is counted once per row: in the quad's lane t == 0.
  float row_max[2] = {msg0 * a.scale_log2e, msg1 * a.scale_log2e};
  float row_sum[2] = {t == 0 ? 1.0f : 0.0f, t == 0 ? 1.0f : 0.0f};
  float o[DT][4];
#pragma unroll
  for (int jd = 0; jd < DT; ++jd) {
    const int col = 8 * jd + 2 * t;
    const float v0 = col < dim ? to_float(tag, mv_g[col]) : 0.0f;
    const float v1 = col + 1 < dim ? to_float(tag, mv_g[col + 1]) : 0.0f;
    o[jd][0] = v0;
    o[jd][1] = v1;
    o[jd][2] = v0;
    o[jd][3] = v1;
  }

  int buf = 0;
  for (int n0 = 0; n0 < n; n0 += BN, buf ^= 1) {
    // Issue the next K/V tile into the other buffer (free: the barrier at the end of the last
    // iteration), then wait for this one.
    if (n0 + BN < n) {
      mma_tiles::stage_rows<BN, DP, L::kThreads>(smem + L::kK + (buf ^ 1) * BN * S, k_g, a.k.sn, n0 + BN, n, dim, a.vec_in);
      mma_tiles::stage_rows<BN, DP, L::kThreads>(smem + L::kV + (buf ^ 1) * BN * S, v_g, a.v.sn, n0 + BN, n, dim, a.vec_in);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    sync_block();
    const uint16_t* k_s = smem + L::kK + buf * BN * S;
    const uint16_t* v_s = smem + L::kV + buf * BN * S;

    // S = Q K^T. One ldmatrix.x4 per (k16 step, pair of n8 tiles): matrices (keys 0-7 | 8-15)
    // x (cols 0-7 | 8-15); for n8 tile 2p: b = {keys 0-7 cols 0-7, keys 0-7 cols 8-15}.
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_s + (16 * p + lrow + 8 * (lmat / 2)) * S + 16 * kk + 8 * (lmat % 2));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_m16n8k16(tag, s[2 * p], qf[kk], b0, s[2 * p]);
        mma_m16n8k16(tag, s[2 * p + 1], qf[kk], b1, s[2 * p + 1]);
      }
    }

    // Scale to log2 units, mask key columns past N, new row maxima (finite: the old ones are).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + 8 * j + 2 * t + (e % 2);
        s[j][e] = key < n ? s[j][e] * a.scale_log2e : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      alpha[r] = exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int jd = 0; jd < DT; ++jd) {
      o[jd][0] *= alpha[0];
      o[jd][1] *= alpha[0];
      o[jd][2] *= alpha[1];
      o[jd][3] *= alpha[1];
    }

    // O += P V, one k16 step (16 keys = n8 tiles 2 kk and 2 kk + 1 of S) at a time. V's
    // ldmatrix.trans matrices (keys 0-7 | 8-15) x (cols 0-7 | 8-15): for n8 tile 2q of O,
    // b = {keys 0-7 cols 0-7, keys 8-15 cols 0-7}.
#pragma unroll
    for (int kk = 0; kk < KN; ++kk) {
      float p[2][4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[half][e] = exp2f(s[2 * kk + half][e] - row_max[e / 2]);  // masked: exp2(-inf) = 0
          row_sum[e / 2] += p[half][e];
        }
      }
      const uint32_t pa[4] = {pack2(tag, p[0][0], p[0][1]), pack2(tag, p[0][2], p[0][3]), pack2(tag, p[1][0], p[1][1]),
                              pack2(tag, p[1][2], p[1][3])};
#pragma unroll
      for (int q = 0; q < DT / 2; ++q) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_s + (16 * kk + lrow + 8 * (lmat % 2)) * S + 16 * q + 8 * (lmat / 2));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_m16n8k16(tag, o[2 * q], pa, b0, o[2 * q]);
        mma_m16n8k16(tag, o[2 * q + 1], pa, b1, o[2 * q + 1]);
      }
    }
    // Every warp is done with this buffer before the next iteration refills it. (The host model's
    // test drops it with XK_TEST_DROP_FWD_TILE_BARRIER and expects its race error; never defined
    // in a real build.)
#ifndef XK_TEST_DROP_FWD_TILE_BARRIER
    sync_block();
#endif
  }

  // The full row sums, then out = O / sum through this warp's own 16 rows of the Q buffer (only
  // this warp ever read them) so that global stores are whole rows, 16 bytes at a time.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += shfl_xor(row_sum[r], 1);
    row_sum[r] += shfl_xor(row_sum[r], 2);
  }
  const float inv[2] = {1.0f / row_sum[0], 1.0f / row_sum[1]};
  uint16_t* o_s = q_s + warp * 16 * S;
#pragma unroll
  for (int jd = 0; jd < DT; ++jd) {
    const int col = 8 * jd + 2 * t;
#pragma unroll
    for (int e = 0; e < 4; ++e) o_s[(g + 8 * (e / 2)) * S + col + e % 2] = from_float(tag, o[jd][e] * inv[e / 2]);
  }
  sync_warp();
  const int row_base = m0 + warp * 16;
  if (a.vec_out) {
    constexpr int kChunks = DP / 8;
#pragma unroll
    for (int i = 0; i < 16 * kChunks / 32; ++i) {
      const int idx = lane + 32 * i;
      const int r = idx / kChunks, c = (idx - r * kChunks) * 8;
      if (row_base + r < n && c < dim) {
        const int64_t off = ((f * n + row_base + r) * a.heads + h) * dim + c;
        *reinterpret_cast<detail::Chunk16*>(a.out + off) = *reinterpret_cast<const detail::Chunk16*>(o_s + r * S + c);
      }
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < 16 * DP / 32; ++i) {
      const int idx = lane + 32 * i;
      const int r = idx / DP, c = idx - r * DP;
      if (row_base + r < n && c < dim) a.out[((f * n + row_base + r) * a.heads + h) * dim + c] = o_s[r * S + c];
    }
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_base + g + 8 * r;
      if (row < n) a.lse[fh * n + row] = (row_max[r] + log2f(row_sum[r])) * kLn2;
    }
  }
}

}  // namespace xclip_ext::ifa_mma
