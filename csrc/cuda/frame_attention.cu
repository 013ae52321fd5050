// IFA (intra-frame attention) on CUDA: flash-style forward and backward.
//
// What it computes. Each frame f and head h attends from its N query rows to N keys plus one
// message key: out[f,i,h] = sum_j softmax_j(scale <q_i, key_j>) value_j, keys j in
// {k[f,0..N-1,h], msg_k[f,h]}. The message token never gets a query row (the official model
// drops its output) and is never concatenated: the forward folds it into the online softmax
// as its starting state (running max = the message score, running sum = 1, accumulator =
// msg_v), so every row's running max is finite from the start and masked (-inf) key columns
// of a ragged last tile can never produce NaN. lse (natural log) is saved for the backward.
//
// Backward (recompute, no stored probabilities): delta_i = rowsum(dO_i * O_i) with torch ops
// (float32), then two kernels so that every output element has exactly one writer
// (deterministic, no atomics): a dK/dV kernel (one block per key tile, looping over query
// tiles) and a dQ kernel (one block per query tile, looping over key tiles) that also handles
// the message column and writes per-query-tile partial sums of d msg_k and d msg_v; a torch
// sum reduces those. fp32 runs the CUDA-core kernels below (ifa_bwd_dkdv_kernel,
// ifa_bwd_dq_kernel, fp32 only). fp16/bf16 run the same two-kernel scheme on tensor cores
// (ifa_mma_backward.cuh, which gives its tiles, shared memory and registers:
// launch_mma_backward): mma.sync m16n8k16 with fp32 accumulation, P and dS rounded to the
// input type only as mma operands, the streamed Q/dO (dK/dV) or K/V (dQ) tiles double-buffered
// by cp.async; the host model runs those kernels' source on the CPU (docs/cuda.md).
//
// Why CUDA-core FMA for fp32 and tensor cores for fp16/bf16. The kernels in this file do
// scalar fp32 math in shared memory (no fp64 is built), converting inputs once when a tile is
// staged: exact for fp32 inputs (no tf32), so they run fp32, forward and backward. The fp16/bf16
// forward runs ifa_mma_fwd_kernel instead (ifa_mma_forward.cuh, which gives its tiles, shared
// memory and registers): mma.sync m16n8k16 with fp32 accumulation, fragments by ldmatrix, K/V
// tiles double-buffered by cp.async; the fp16/bf16 backward runs the kernels of
// ifa_mma_backward.cuh (above). The FMA kernels use a small fraction of an H100's multiply rate
// (~60 TFLOP/s fp32 FMA against ~790 TFLOP/s bf16 dense on tensor cores), too little for a
// CUDA backend to keep up with Triton's tensor-core kernels; the tensor-core kernels' index
// math is checked on the CPU, where this file cannot run, by the host model (docs/cuda.md).
//
// Why these tiles. 128 threads = 4 warps laid out as 8 row groups (ty) x 16 lanes (tx); a
// half-warp owns whole tile rows, so row max/sum reductions are 4 xor-shuffles that never
// leave the half-warp and need no shared memory. Thread (ty, tx) owns rows ty + 8i and columns
// tx + 16j of every tile it computes (strided, not blocked): the 16 lanes of a half-warp then
// read 16 different key/query rows of a tile whose row stride is DP + 1 (odd), which lands in
// 16 different banks, while the other operand is a broadcast. The head dim is padded to DP in
// {32, 64, 96, 128} (compile-time, zero-filled), which covers D = 1..128 with four
// instantiations. Query tiles of 64 rows keep the number of blocks high for N ~ 200 (4 tiles
// per frame-head) and waste at most 63 rows on the ragged tail; key tiles are 64 wide for
// DP <= 64 and 32 wide above, so that every kernel's shared memory stays under 78 KiB in fp32
// (2-3 blocks per SM on A100/H100, and within the 99 KiB opt-in limit of sm_86/89); these
// are the fp32 kernels (the fp16/bf16 tiles: ifa_mma_forward.cuh, ifa_mma_backward.cuh):
//   forward    BM=64 queries, BN=64|32 keys:   DP=64: 69.2 KiB, DP=128: 77.5 KiB
//   dK/dV      BN=64|32 keys, BM=32 queries:   DP=64: 73.0 KiB, DP=128: 76.8 KiB
//   dQ         BM=64|32 queries, BN=32 keys:   DP=64: 62.2 KiB, DP=128: 72.0 KiB
// Registers: at most 64
// accumulators per thread plus a 16-32 entry score tile.
//
// Indexing: all global offsets are int64; N, H, D and tile indices are int. The grid is
// (F * H, query or key tiles): F * H goes on x, whose limit is 2^31 - 1, not on y (65535).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "ifa_mma_backward.cuh"
#include "../xclip_ops.h"
#include "common.cuh"
#include "ifa_mma_forward.cuh"

namespace xclip_ext {
namespace {

// ---- kernels begin (device code only below this line, up to "kernels end") ----

using namespace cuda_common;

// A (F, N, H, D) operand read through its strides (last dim contiguous).
template <typename T>
struct Rows {
  const T* ptr;
  int64_t sf, sn, sh;
};
// A (F, H, D) operand.
template <typename T>
struct Vecs {
  const T* ptr;
  int64_t sf, sh;
};

// Stage rows [row0, row0 + ROWS) x [0, DP) of one frame-head into shared memory (row stride
// DP + 1), converted to acc_t; rows >= nrows and columns >= dim are zero. Consecutive threads
// take consecutive columns: coalesced global reads.
template <int DP, int ROWS, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_rows(acc_t* dst, const scalar_t* __restrict__ src, int64_t row_stride,
                                           int row0, int nrows, int dim) {
  for (int idx = threadIdx.x; idx < ROWS * DP; idx += kThreads) {
    const int r = idx / DP;
    const int c = idx - r * DP;
    const int gr = row0 + r;
    acc_t val = acc_t(0);
    if (gr < nrows && c < dim) val = static_cast<acc_t>(src[static_cast<int64_t>(gr) * row_stride + c]);
    dst[r * (DP + 1) + c] = val;
  }
}

// Stage one (D,) vector, zero-padded to DP.
template <int DP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_vec(acc_t* dst, const scalar_t* __restrict__ src, int dim) {
  for (int c = threadIdx.x; c < DP; c += kThreads) dst[c] = c < dim ? static_cast<acc_t>(src[c]) : acc_t(0);
}

// Shared-memory layouts in units of acc_t; used by both the kernels and the launchers.
template <int DP, int BM, int BN>
struct FwdSmem {
  static constexpr int kS = DP + 1, kPS = BN + 16;
  static constexpr int q = 0, k = q + BM * kS, v = k + BN * kS, p = v + BN * kS;
  static constexpr int mk = p + BM * kPS, mv = mk + DP, total = mv + DP;
};
template <int DP, int BM, int BN>
struct DkdvSmem {
  static constexpr int kS = DP + 1, kPS = BM + 16;
  static constexpr int k = 0, v = k + BN * kS, q = v + BN * kS, dout = q + BM * kS;
  static constexpr int p = dout + BM * kS, ds = p + BN * kPS, lse = ds + BN * kPS, delta = lse + BM;
  static constexpr int total = delta + BM;
};
template <int DP, int BM, int BN>
struct DqSmem {
  static constexpr int kS = DP + 1, kPS = BN + 16;
  static constexpr int q = 0, dout = q + BM * kS, k = dout + BM * kS, v = k + BN * kS, ds = v + BN * kS;
  static constexpr int mk = ds + BM * kPS, mv = mk + DP, lse = mv + DP, delta = lse + BM;
  static constexpr int pm = delta + BM, dsm = pm + BM, total = dsm + BM;
};

// Forward: one block per (frame-head, query tile of BM rows); loops over key tiles of BN.
template <typename scalar_t, typename acc_t, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    ifa_fwd_kernel(Rows<scalar_t> Q, Rows<scalar_t> K, Rows<scalar_t> V, Vecs<scalar_t> MK, Vecs<scalar_t> MV,
                   scalar_t* __restrict__ out, float* __restrict__ lse, int N, int H, int D, acc_t scale_log2e) {
  static_assert(BM % kTY == 0 && BN % kTX == 0 && DP % kTX == 0, "tiles must fit the 8 x 16 thread grid");
  using L = FwdSmem<DP, BM, BN>;
  constexpr int S = L::kS, PS = L::kPS, RM = BM / kTY, CN = BN / kTX, CD = DP / kTX;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Qs = sm + L::q;
  acc_t* Ks = sm + L::k;
  acc_t* Vs = sm + L::v;
  acc_t* Ps = sm + L::p;
  acc_t* Mk = sm + L::mk;
  acc_t* Mv = sm + L::mv;

  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t fh = blockIdx.x;
  const int64_t f = fh / H, h = fh % H;
  const int m0 = blockIdx.y * BM;

  stage_rows<DP, BM>(Qs, Q.ptr + f * Q.sf + h * Q.sh, Q.sn, m0, N, D);
  stage_vec<DP>(Mk, MK.ptr + f * MK.sf + h * MK.sh, D);
  stage_vec<DP>(Mv, MV.ptr + f * MV.sf + h * MV.sh, D);
  __syncthreads();

  // The message key opens the online softmax (log2 domain): m = its score, l = 1, acc = msg_v.
  acc_t m_i[RM], l_i[RM], acc[RM][CD];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const acc_t* qrow = Qs + (ty + kTY * i) * S;
    acc_t part = acc_t(0);
    for (int c = tx; c < DP; c += kTX) part += qrow[c] * Mk[c];
    m_i[i] = half_warp_sum(part) * scale_log2e;
    l_i[i] = acc_t(1);
#pragma unroll
    for (int j = 0; j < CD; ++j) acc[i][j] = Mv[tx + kTX * j];
  }

  for (int n0 = 0; n0 < N; n0 += BN) {
    __syncthreads();  // everyone is done with the previous K, V and P tiles
    stage_rows<DP, BN>(Ks, K.ptr + f * K.sf + h * K.sh, K.sn, n0, N, D);
    stage_rows<DP, BN>(Vs, V.ptr + f * V.sf + h * V.sh, V.sn, n0, N, D);
    __syncthreads();

    acc_t s[RM][CN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < CN; ++j) s[i][j] = acc_t(0);
#pragma unroll 4
    for (int d = 0; d < DP; ++d) {
      acc_t qv[RM], kv[CN];
#pragma unroll
      for (int i = 0; i < RM; ++i) qv[i] = Qs[(ty + kTY * i) * S + d];
#pragma unroll
      for (int j = 0; j < CN; ++j) kv[j] = Ks[(tx + kTX * j) * S + d];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CN; ++j) s[i][j] += qv[i] * kv[j];
    }

#pragma unroll
    for (int i = 0; i < RM; ++i) {
      acc_t mx = acc_t(-INFINITY);
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        s[i][j] = (n0 + tx + kTX * j < N) ? s[i][j] * scale_log2e : acc_t(-INFINITY);
        mx = max_(mx, s[i][j]);
      }
      const acc_t m_new = max_(m_i[i], half_warp_max(mx));  // finite: m_i[i] is
      const acc_t alpha = exp2_(m_i[i] - m_new);
      acc_t rs = acc_t(0);
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        const acc_t p = exp2_(s[i][j] - m_new);  // masked columns: exp2(-inf) = 0
        Ps[(ty + kTY * i) * PS + tx + kTX * j] = p;
        rs += p;
      }
      l_i[i] = l_i[i] * alpha + half_warp_sum(rs);
#pragma unroll
      for (int j = 0; j < CD; ++j) acc[i][j] *= alpha;
      m_i[i] = m_new;
    }
    __syncthreads();

    const int nv = min(BN, N - n0);
    for (int n = 0; n < nv; ++n) {
      acc_t pv[RM], vv[CD];
#pragma unroll
      for (int i = 0; i < RM; ++i) pv[i] = Ps[(ty + kTY * i) * PS + n];
#pragma unroll
      for (int j = 0; j < CD; ++j) vv[j] = Vs[n * S + tx + kTX * j];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) acc[i][j] += pv[i] * vv[j];
    }
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int r = m0 + ty + kTY * i;
    if (r < N) {
      const acc_t inv = acc_t(1) / l_i[i];
      scalar_t* orow = out + ((f * N + r) * H + h) * D;
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        const int d = tx + kTX * j;
        if (d < D) orow[d] = static_cast<scalar_t>(acc[i][j] * inv);
      }
      if (tx == 0) lse[fh * N + r] = static_cast<float>((m_i[i] + log2_(l_i[i])) * acc_t(kLn2));
    }
  }
}

// Backward, dK and dV: one block per (frame-head, key tile of BN rows); loops over query tiles
// of BM rows. The tiles are computed transposed (rows = keys) so each thread accumulates whole
// dK/dV entries: s^T = K Q^T, dP^T = V dO^T, P^T and dS^T go through shared memory.
template <typename scalar_t, typename acc_t, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    ifa_bwd_dkdv_kernel(Rows<scalar_t> Q, Rows<scalar_t> K, Rows<scalar_t> V, Rows<scalar_t> DO,
                        const float* __restrict__ lse, const acc_t* __restrict__ delta, scalar_t* __restrict__ dk_out,
                        scalar_t* __restrict__ dv_out, int N, int H, int D, acc_t scale, acc_t scale_log2e) {
  static_assert(BN % kTY == 0 && BM % kTX == 0 && DP % kTX == 0, "tiles must fit the 8 x 16 thread grid");
  using L = DkdvSmem<DP, BM, BN>;
  constexpr int S = L::kS, PS = L::kPS, RK = BN / kTY, CQ = BM / kTX, CD = DP / kTX;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Ks = sm + L::k;
  acc_t* Vs = sm + L::v;
  acc_t* Qs = sm + L::q;
  acc_t* Gs = sm + L::dout;
  acc_t* Pt = sm + L::p;
  acc_t* St = sm + L::ds;
  acc_t* Ls = sm + L::lse;
  acc_t* Dl = sm + L::delta;

  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t fh = blockIdx.x;
  const int64_t f = fh / H, h = fh % H;
  const int n0 = blockIdx.y * BN;
  const float* lse_row = lse + fh * N;
  const acc_t* delta_row = delta + fh * N;

  stage_rows<DP, BN>(Ks, K.ptr + f * K.sf + h * K.sh, K.sn, n0, N, D);
  stage_rows<DP, BN>(Vs, V.ptr + f * V.sf + h * V.sh, V.sn, n0, N, D);

  acc_t dk[RK][CD], dv[RK][CD];
#pragma unroll
  for (int i = 0; i < RK; ++i)
#pragma unroll
    for (int j = 0; j < CD; ++j) dk[i][j] = dv[i][j] = acc_t(0);

  for (int m0 = 0; m0 < N; m0 += BM) {
    __syncthreads();  // everyone is done with the previous Q, dO, P^T and dS^T tiles
    stage_rows<DP, BM>(Qs, Q.ptr + f * Q.sf + h * Q.sh, Q.sn, m0, N, D);
    stage_rows<DP, BM>(Gs, DO.ptr + f * DO.sf + h * DO.sh, DO.sn, m0, N, D);
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const int gm = m0 + r;
      Ls[r] = gm < N ? static_cast<acc_t>(lse_row[gm]) * acc_t(kLog2e) : acc_t(0);
      Dl[r] = gm < N ? delta_row[gm] : acc_t(0);
    }
    __syncthreads();

    acc_t s[RK][CQ], dp[RK][CQ];
#pragma unroll
    for (int i = 0; i < RK; ++i)
#pragma unroll
      for (int j = 0; j < CQ; ++j) s[i][j] = dp[i][j] = acc_t(0);
#pragma unroll 4
    for (int d = 0; d < DP; ++d) {
      acc_t kv[RK], vv[RK], qv[CQ], gv[CQ];
#pragma unroll
      for (int i = 0; i < RK; ++i) {
        kv[i] = Ks[(ty + kTY * i) * S + d];
        vv[i] = Vs[(ty + kTY * i) * S + d];
      }
#pragma unroll
      for (int j = 0; j < CQ; ++j) {
        qv[j] = Qs[(tx + kTX * j) * S + d];
        gv[j] = Gs[(tx + kTX * j) * S + d];
      }
#pragma unroll
      for (int i = 0; i < RK; ++i)
#pragma unroll
        for (int j = 0; j < CQ; ++j) {
          s[i][j] += kv[i] * qv[j];
          dp[i][j] += vv[i] * gv[j];
        }
    }
#pragma unroll
    for (int i = 0; i < RK; ++i) {
      const int kr = ty + kTY * i;
#pragma unroll
      for (int j = 0; j < CQ; ++j) {
        const int qc = tx + kTX * j;
        const bool valid = (n0 + kr < N) && (m0 + qc < N);
        const acc_t p = valid ? exp2_(s[i][j] * scale_log2e - Ls[qc]) : acc_t(0);
        Pt[kr * PS + qc] = p;
        St[kr * PS + qc] = p * (dp[i][j] - Dl[qc]);
      }
    }
    __syncthreads();

    const int mv = min(BM, N - m0);
    for (int m = 0; m < mv; ++m) {
      acc_t pv[RK], sv[RK], gv[CD], qv[CD];
#pragma unroll
      for (int i = 0; i < RK; ++i) {
        pv[i] = Pt[(ty + kTY * i) * PS + m];
        sv[i] = St[(ty + kTY * i) * PS + m];
      }
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        gv[j] = Gs[m * S + tx + kTX * j];
        qv[j] = Qs[m * S + tx + kTX * j];
      }
#pragma unroll
      for (int i = 0; i < RK; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) {
          dv[i][j] += pv[i] * gv[j];
          dk[i][j] += sv[i] * qv[j];
        }
    }
  }

#pragma unroll
  for (int i = 0; i < RK; ++i) {
    const int kr = n0 + ty + kTY * i;
    if (kr < N) {
      const int64_t row = ((f * N + kr) * H + h) * D;
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        const int d = tx + kTX * j;
        if (d < D) {
          dk_out[row + d] = static_cast<scalar_t>(dk[i][j] * scale);
          dv_out[row + d] = static_cast<scalar_t>(dv[i][j]);
        }
      }
    }
  }
}

// Backward, dQ: one block per (frame-head, query tile of BM rows); loops over key tiles of BN,
// then adds the message column and writes this tile's partial sums of d msg_k and d msg_v to
// dmk_part / dmv_part[(fh * m_tiles + tile) * D + d].
template <typename scalar_t, typename acc_t, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    ifa_bwd_dq_kernel(Rows<scalar_t> Q, Rows<scalar_t> K, Rows<scalar_t> V, Rows<scalar_t> DO, Vecs<scalar_t> MK,
                      Vecs<scalar_t> MV, const float* __restrict__ lse, const acc_t* __restrict__ delta,
                      scalar_t* __restrict__ dq_out, acc_t* __restrict__ dmk_part, acc_t* __restrict__ dmv_part,
                      int N, int H, int D, int m_tiles, acc_t scale, acc_t scale_log2e) {
  static_assert(BM % kTY == 0 && BN % kTX == 0 && DP % kTX == 0, "tiles must fit the 8 x 16 thread grid");
  using L = DqSmem<DP, BM, BN>;
  constexpr int S = L::kS, PS = L::kPS, RM = BM / kTY, CN = BN / kTX, CD = DP / kTX;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Qs = sm + L::q;
  acc_t* Gs = sm + L::dout;
  acc_t* Ks = sm + L::k;
  acc_t* Vs = sm + L::v;
  acc_t* Ss = sm + L::ds;
  acc_t* Mk = sm + L::mk;
  acc_t* Mv = sm + L::mv;
  acc_t* Ls = sm + L::lse;
  acc_t* Dl = sm + L::delta;
  acc_t* Pm = sm + L::pm;
  acc_t* Sm = sm + L::dsm;

  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t fh = blockIdx.x;
  const int64_t f = fh / H, h = fh % H;
  const int m0 = blockIdx.y * BM;

  stage_rows<DP, BM>(Qs, Q.ptr + f * Q.sf + h * Q.sh, Q.sn, m0, N, D);
  stage_rows<DP, BM>(Gs, DO.ptr + f * DO.sf + h * DO.sh, DO.sn, m0, N, D);
  stage_vec<DP>(Mk, MK.ptr + f * MK.sf + h * MK.sh, D);
  stage_vec<DP>(Mv, MV.ptr + f * MV.sf + h * MV.sh, D);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int gm = m0 + r;
    Ls[r] = gm < N ? static_cast<acc_t>(lse[fh * N + gm]) * acc_t(kLog2e) : acc_t(0);
    Dl[r] = gm < N ? delta[fh * N + gm] : acc_t(0);
  }

  acc_t dq[RM][CD];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < CD; ++j) dq[i][j] = acc_t(0);

  for (int n0 = 0; n0 < N; n0 += BN) {
    __syncthreads();  // Q/dO/lse staged (first pass); everyone is done with K, V, dS (later passes)
    stage_rows<DP, BN>(Ks, K.ptr + f * K.sf + h * K.sh, K.sn, n0, N, D);
    stage_rows<DP, BN>(Vs, V.ptr + f * V.sf + h * V.sh, V.sn, n0, N, D);
    __syncthreads();

    acc_t s[RM][CN], dp[RM][CN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < CN; ++j) s[i][j] = dp[i][j] = acc_t(0);
#pragma unroll 4
    for (int d = 0; d < DP; ++d) {
      acc_t qv[RM], gv[RM], kv[CN], vv[CN];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        qv[i] = Qs[(ty + kTY * i) * S + d];
        gv[i] = Gs[(ty + kTY * i) * S + d];
      }
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        kv[j] = Ks[(tx + kTX * j) * S + d];
        vv[j] = Vs[(tx + kTX * j) * S + d];
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CN; ++j) {
          s[i][j] += qv[i] * kv[j];
          dp[i][j] += gv[i] * vv[j];
        }
    }
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int qr = ty + kTY * i;
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        const int kc = tx + kTX * j;
        const bool valid = (m0 + qr < N) && (n0 + kc < N);
        const acc_t p = valid ? exp2_(s[i][j] * scale_log2e - Ls[qr]) : acc_t(0);
        Ss[qr * PS + kc] = p * (dp[i][j] - Dl[qr]);
      }
    }
    __syncthreads();

    const int nv = min(BN, N - n0);
    for (int n = 0; n < nv; ++n) {
      acc_t sv[RM], kv[CD];
#pragma unroll
      for (int i = 0; i < RM; ++i) sv[i] = Ss[(ty + kTY * i) * PS + n];
#pragma unroll
      for (int j = 0; j < CD; ++j) kv[j] = Ks[n * S + tx + kTX * j];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) dq[i][j] += sv[i] * kv[j];
    }
  }

  // The message column: p_msg = exp(score_msg - lse), dS_msg = p_msg (dO . msg_v - delta).
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int qr = ty + kTY * i;
    acc_t qm = acc_t(0), gm = acc_t(0);
    for (int c = tx; c < DP; c += kTX) {
      qm += Qs[qr * S + c] * Mk[c];
      gm += Gs[qr * S + c] * Mv[c];
    }
    qm = half_warp_sum(qm);
    gm = half_warp_sum(gm);
    const acc_t pm = (m0 + qr < N) ? exp2_(qm * scale_log2e - Ls[qr]) : acc_t(0);
    const acc_t dsm = pm * (gm - Dl[qr]);
#pragma unroll
    for (int j = 0; j < CD; ++j) dq[i][j] += dsm * Mk[tx + kTX * j];
    if (tx == 0) {
      Pm[qr] = pm;
      Sm[qr] = dsm;
    }
    if (m0 + qr < N) {
      scalar_t* drow = dq_out + ((f * N + m0 + qr) * H + h) * D;
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        const int d = tx + kTX * j;
        if (d < D) drow[d] = static_cast<scalar_t>(dq[i][j] * scale);
      }
    }
  }
  __syncthreads();

  // Partial sums over this tile's rows (rows past N have pm = dsm = 0 and zero Q, dO).
  const int64_t part = (fh * m_tiles + blockIdx.y) * D;
  for (int c = threadIdx.x; c < D; c += kThreads) {
    acc_t a = acc_t(0), b = acc_t(0);
    for (int r = 0; r < BM; ++r) {
      a += Sm[r] * Qs[r * S + c];
      b += Pm[r] * Gs[r * S + c];
    }
    dmk_part[part + c] = a * scale;
    dmv_part[part + c] = b;
  }
}

// ---- kernels end ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}
template <typename T>
Vecs<T> vecs_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Opt in to more than 48 KB of dynamic shared memory, after checking the device allows it.
template <typename Kernel>
void prepare_shared_memory(Kernel kernel, size_t bytes, const char* what) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), what, ": needs ", bytes,
              " bytes of shared memory per block for this head dim and dtype; this GPU allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}


// Tile sizes per kernel (see the comment at the top of the file).
template <int DP>
struct Tiles {
  static constexpr int fwd_m = 64, fwd_n = DP <= 64 ? 64 : 32;
  static constexpr int dkdv_m = 32, dkdv_n = DP <= 64 ? 64 : 32;
  static constexpr int dq_m = DP <= 64 ? 64 : 32, dq_n = 32;
};

// The fp16/bf16 tensor-core kernels read the tensors' raw 16-bit values through their strides
// (mma_tiles.cuh).
mma_tiles::Rows16 mma_rows(const at::Tensor& t) {
  return {reinterpret_cast<const uint16_t*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}
mma_tiles::Vecs16 mma_vecs(const at::Tensor& t) {
  return {reinterpret_cast<const uint16_t*>(t.const_data_ptr()), t.stride(0), t.stride(1)};
}

// fp16/bf16 backward: the tensor-core kernels (ifa_mma_backward.cuh); grids and shared memory
// from its BwdTiles, the staging path from vec_staging_ok, as the host model's entry
// (host_model/ifa_backward_model.cpp) launches them. Writes dq, dk, dv and returns the reduced
// (d msg_k, d msg_v) in q's dtype.
template <typename Tag>
std::tuple<at::Tensor, at::Tensor> launch_mma_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& msg_k, const at::Tensor& msg_v,
                                                       const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq,
                                                       at::Tensor& dk, at::Tensor& dv, double scale,
                                                       cudaStream_t stream) {
  namespace mb = ifa_mma_backward;
  static_assert(mb::kThreads == kThreads, "one block size for every CUDA kernel (gpu_static reads kThreads)");
  const int64_t frames = q.size(0), tokens = q.size(1), heads = q.size(2), head_dim = q.size(3);
  at::Tensor dmk, dmv;
  dispatch_head_dim(head_dim, "frame_attention (cuda): head dim D", [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    using T = mb::BwdTiles<DP>;
    const int n = static_cast<int>(tokens), d = static_cast<int>(head_dim);
    mb::BwdParams p{};
    p.q = mma_rows(q);
    p.k = mma_rows(k);
    p.v = mma_rows(v);
    p.dout = mma_rows(grad_out);
    p.msg_k = mma_vecs(msg_k);
    p.msg_v = mma_vecs(msg_v);
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = reinterpret_cast<uint16_t*>(dq.mutable_data_ptr());
    p.dk = reinterpret_cast<uint16_t*>(dk.mutable_data_ptr());
    p.dv = reinterpret_cast<uint16_t*>(dv.mutable_data_ptr());
    p.n = n;
    p.h = static_cast<int>(heads);
    p.d = d;
    p.q_tiles = T::dq_tiles(n);
    p.scale = static_cast<float>(scale);
    p.scale_log2e = static_cast<float>(scale * kLog2e);
    p.vec = mb::vec_staging_ok(p.q, d) && mb::vec_staging_ok(p.k, d) && mb::vec_staging_ok(p.v, d) &&
            mb::vec_staging_ok(p.dout, d);
    at::Tensor dmk_part = at::empty({frames, heads, p.q_tiles, head_dim}, q.options().dtype(at::kFloat));
    at::Tensor dmv_part = at::empty_like(dmk_part);
    p.dmk_part = dmk_part.data_ptr<float>();
    p.dmv_part = dmv_part.data_ptr<float>();
    const auto fh = static_cast<unsigned>(frames * heads);

    auto dkdv = mb::ifa_mma_bwd_dkdv_kernel<Tag, DP>;
    prepare_shared_memory(dkdv, T::Dkdv::total, "frame_attention_backward_cuda (dK/dV)");
    dkdv<<<dim3(fh, static_cast<unsigned>(T::dkdv_tiles(n))), mb::kThreads, T::Dkdv::total, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dq_kernel = mb::ifa_mma_bwd_dq_kernel<Tag, DP>;
    prepare_shared_memory(dq_kernel, T::Dq::total, "frame_attention_backward_cuda (dQ)");
    dq_kernel<<<dim3(fh, static_cast<unsigned>(p.q_tiles)), mb::kThreads, T::Dq::total, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Deterministic reduction of the per-tile partials (fixed order, no atomics).
    dmk = dmk_part.sum(2).to(q.scalar_type());
    dmv = dmv_part.sum(2).to(q.scalar_type());
  });
  return {dmk, dmv};
}

void check_sizes(int64_t frames, int64_t tokens, int64_t heads, int64_t head_dim) {
  TORCH_CHECK_VALUE(frames * heads <= INT32_MAX, "frame_attention (cuda): F * H must fit in int32, got ",
                    frames * heads);
  TORCH_CHECK_VALUE(tokens <= INT32_MAX / 2, "frame_attention (cuda): N too large: ", tokens);
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 128, "frame_attention (cuda): head dim D must be in [1, 128], got ",
                    head_dim);
}

// fp16/bf16 forward: the tensor-core kernel (ifa_mma_forward.cuh) on the tensors' raw 16-bit
// values; grid, block and shared memory from its FwdTiles, the staging paths from make_fwd_args.
template <typename Tag>
void launch_mma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& msg_k,
                        const at::Tensor& msg_v, at::Tensor& out, at::Tensor& lse, double scale, cudaStream_t stream) {
  const int64_t frames = q.size(0), tokens = q.size(1), heads = q.size(2), head_dim = q.size(3);
  dispatch_head_dim(head_dim, "frame_attention (cuda): head dim D", [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    using L = ifa_mma::FwdTiles<DP>;
    static_assert(L::kThreads == kThreads, "one block size for every CUDA kernel (gpu_static reads kThreads)");
    auto kernel = ifa_mma::ifa_mma_fwd_kernel<Tag, DP>;
    prepare_shared_memory(kernel, L::kSharedBytes, "frame_attention_forward_cuda");
    const ifa_mma::FwdArgs args = ifa_mma::make_fwd_args(
        mma_rows(q), mma_rows(k), mma_rows(v), mma_vecs(msg_k), mma_vecs(msg_v),
        reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), lse.data_ptr<float>(), static_cast<int>(tokens),
        static_cast<int>(heads), static_cast<int>(head_dim), scale);
    const dim3 grid(static_cast<unsigned>(frames * heads), static_cast<unsigned>(L::query_tiles(tokens)));
    kernel<<<grid, L::kThreads, L::kSharedBytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> frame_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, const at::Tensor& msg_k_in,
                                                                const at::Tensor& msg_v_in, double scale) {
  TORCH_CHECK(q_in.is_cuda(), "frame_attention_forward_cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor msg_k = last_dim_contiguous(msg_k_in), msg_v = last_dim_contiguous(msg_v_in);
  const int64_t frames = q.size(0), tokens = q.size(1), heads = q.size(2), head_dim = q.size(3);
  at::Tensor out = at::empty({frames, tokens, heads, head_dim}, q.options());
  at::Tensor lse = at::empty({frames, heads, tokens}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  check_sizes(frames, tokens, heads, head_dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  switch (q.scalar_type()) {
    case at::kFloat:
      // fp32: the exact CUDA-core kernel.
      dispatch_head_dim(head_dim, "frame_attention (cuda): head dim D", [&](auto dp) {
        constexpr int DP = decltype(dp)::value;
        constexpr int BM = Tiles<DP>::fwd_m, BN = Tiles<DP>::fwd_n;
        const size_t smem = FwdSmem<DP, BM, BN>::total * sizeof(float);
        auto kernel = ifa_fwd_kernel<float, float, DP, BM, BN>;
        prepare_shared_memory(kernel, smem, "frame_attention_forward_cuda");
        const dim3 grid(static_cast<unsigned>(frames * heads), static_cast<unsigned>(ceil_div(tokens, BM)));
        kernel<<<grid, kThreads, smem, stream>>>(
            rows_of<float>(q), rows_of<float>(k), rows_of<float>(v), vecs_of<float>(msg_k), vecs_of<float>(msg_v),
            out.data_ptr<float>(), lse.data_ptr<float>(), static_cast<int>(tokens), static_cast<int>(heads),
            static_cast<int>(head_dim), static_cast<float>(scale * kLog2e));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      break;
    case at::kHalf:
      launch_mma_forward<warp_mma::F16>(q, k, v, msg_k, msg_v, out, lse, scale, stream);
      break;
    case at::kBFloat16:
      launch_mma_forward<warp_mma::BF16>(q, k, v, msg_k, msg_v, out, lse, scale, stream);
      break;
    default:
      TORCH_CHECK_VALUE(false, "frame_attention_forward_cuda: q must be float32, float16 or bfloat16, got ",
                        q.scalar_type());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& msg_k_in, const at::Tensor& msg_v_in, const at::Tensor& out, const at::Tensor& lse_in,
    double scale) {
  TORCH_CHECK(q_in.is_cuda(), "frame_attention_backward_cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor msg_k = last_dim_contiguous(msg_k_in), msg_v = last_dim_contiguous(msg_v_in);
  const at::Tensor grad_out = last_dim_contiguous(grad_out_in);
  const at::Tensor lse = lse_in.contiguous();
  const int64_t frames = q.size(0), tokens = q.size(1), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == frames * heads * tokens,
              "frame_attention_backward_cuda: lse must be float32 (F, H, N)");

  at::Tensor dq = at::empty({frames, tokens, heads, head_dim}, q.options());
  at::Tensor dk = at::empty_like(dq);
  at::Tensor dv = at::empty_like(dq);
  if (dq.numel() == 0) {
    // N = 0: no query row touches the message; D = 0 or F = 0: nothing to compute.
    return {dq, dk, dv, at::zeros({frames, heads, head_dim}, q.options()),
            at::zeros({frames, heads, head_dim}, q.options())};
  }
  check_sizes(frames, tokens, heads, head_dim);

  // delta_i = sum_d dO_id O_id in the accumulation type (float32), laid out (F, H, N) like lse.
  const at::ScalarType acc_type = at::kFloat;
  const at::Tensor delta = (grad_out.to(acc_type) * out.to(acc_type)).sum(-1).transpose(1, 2).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dmk, dmv;

  switch (q.scalar_type()) {
    case at::kFloat:
      // fp32: the exact CUDA-core kernels.
      dispatch_head_dim(head_dim, "frame_attention (cuda): head dim D", [&](auto dp) {
        constexpr int DP = decltype(dp)::value;
        const float scale_acc = static_cast<float>(scale), scale_log2e = static_cast<float>(scale * kLog2e);
        const int n = static_cast<int>(tokens), hh = static_cast<int>(heads), dd = static_cast<int>(head_dim);
        const auto fh = static_cast<unsigned>(frames * heads);

        {
          constexpr int BM = Tiles<DP>::dkdv_m, BN = Tiles<DP>::dkdv_n;
          const size_t smem = DkdvSmem<DP, BM, BN>::total * sizeof(float);
          auto kernel = ifa_bwd_dkdv_kernel<float, float, DP, BM, BN>;
          prepare_shared_memory(kernel, smem, "frame_attention_backward_cuda (dK/dV)");
          const dim3 grid(fh, static_cast<unsigned>(ceil_div(tokens, BN)));
          kernel<<<grid, kThreads, smem, stream>>>(rows_of<float>(q), rows_of<float>(k), rows_of<float>(v),
                                                   rows_of<float>(grad_out), lse.data_ptr<float>(),
                                                   delta.data_ptr<float>(), dk.data_ptr<float>(),
                                                   dv.data_ptr<float>(), n, hh, dd, scale_acc, scale_log2e);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        {
          constexpr int BM = Tiles<DP>::dq_m, BN = Tiles<DP>::dq_n;
          const int64_t m_tiles = ceil_div(tokens, BM);
          at::Tensor dmk_part = at::empty({frames, heads, m_tiles, head_dim}, q.options().dtype(acc_type));
          at::Tensor dmv_part = at::empty_like(dmk_part);
          const size_t smem = DqSmem<DP, BM, BN>::total * sizeof(float);
          auto kernel = ifa_bwd_dq_kernel<float, float, DP, BM, BN>;
          prepare_shared_memory(kernel, smem, "frame_attention_backward_cuda (dQ)");
          const dim3 grid(fh, static_cast<unsigned>(m_tiles));
          kernel<<<grid, kThreads, smem, stream>>>(
              rows_of<float>(q), rows_of<float>(k), rows_of<float>(v), rows_of<float>(grad_out),
              vecs_of<float>(msg_k), vecs_of<float>(msg_v), lse.data_ptr<float>(), delta.data_ptr<float>(),
              dq.data_ptr<float>(), dmk_part.data_ptr<float>(), dmv_part.data_ptr<float>(), n, hh, dd,
              static_cast<int>(m_tiles), scale_acc, scale_log2e);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // Deterministic reduction of the per-tile partials (fixed order, no atomics).
          dmk = dmk_part.sum(2);
          dmv = dmv_part.sum(2);
        }
      });
      break;
    case at::kHalf:
      std::tie(dmk, dmv) = launch_mma_backward<warp_mma::F16>(grad_out, q, k, v, msg_k, msg_v, lse, delta, dq, dk,
                                                              dv, scale, stream);
      break;
    case at::kBFloat16:
      std::tie(dmk, dmv) = launch_mma_backward<warp_mma::BF16>(grad_out, q, k, v, msg_k, msg_v, lse, delta, dq, dk,
                                                               dv, scale, stream);
      break;
    default:
      TORCH_CHECK_VALUE(false, "frame_attention_backward_cuda: q must be float32, float16 or bfloat16, got ",
                        q.scalar_type());
  }
  return {dq, dk, dv, dmk, dmv};
}

}  // namespace xclip_ext
