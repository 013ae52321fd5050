// IFA backward for fp16/bf16 on tensor cores (mma.sync.m16n8k16, fp32 accumulation): the dK/dV
// kernel and the dQ kernel (with the message column's per-tile partials), their tile sizes and
// shared-memory layouts. Written only on warp_mma.cuh's building blocks and plain C++, so that
// the same source compiles with nvcc for the GPU and with g++ against the host model
// (host_model/simt.h, driven by host_model/ifa_backward_model.cpp in `make test`).
//
// Math (per frame f and head h, scale s; i query rows, j keys, m the message key; all in fp32):
//   P_ij = exp(s q_i.k_j - lse_i)        p_i = exp(s q_i.msg_k - lse_i)    delta_i = dO_i.O_i
//   dP_ij = dO_i.v_j   dS_ij = P_ij (dP_ij - delta_i)   dS_msg_i = p_i (dO_i.msg_v - delta_i)
//   dV_j = sum_i P_ij dO_i      dK_j = s sum_i dS_ij q_i
//   dQ_i = s (sum_j dS_ij k_j + dS_msg_i msg_k)
//   d msg_k = s sum_i dS_msg_i q_i      d msg_v = sum_i p_i dO_i
// lse (natural log, from the forward) and delta (fp32) arrive as (F, H, N) float32. Every
// output element has one writer (no atomics, deterministic): dK/dV one block per key tile,
// dQ one block per query tile; d msg_k / d msg_v as per-query-tile partials (F, H, tiles, D)
// that the caller sums over tiles in a fixed order.
//
// Layout of the work. 128 threads = 4 warps; each warp owns 16 rows of the block's tile (keys
// in dK/dV, queries in dQ) and computes its 16 x BM (resp. 16 x BN) score tile with mma in
// fp32 C fragments, turns it into P and dS in registers, and feeds those back as A fragments
// (the C layout of two n8 tiles is the A layout of one k16 tile) into the second products. The
// dK/dV kernel works transposed (rows = keys: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
// dK += dS^T Q) so that each warp owns whole dK/dV rows. The operand that streams (Q, dO in
// dK/dV; K, V in dQ) is double-buffered: tile t + 1 is copied with cp.async while tile t is
// multiplied. Shared rows are DP + 8 elements long (16 bytes of padding): the eight 16-byte
// rows an ldmatrix reads then start in eight different 4-bank groups (no bank conflict), and
// every row start stays 16-byte aligned for cp.async.
//
// Staging. Rows past N and columns past D are zero in shared memory (cp.async with full =
// false writes zeros and reads nothing). cp.async needs 16-byte aligned global addresses, so
// the caller checks the pointers, strides and D (vec_staging_ok); otherwise the kernels stage
// element by element with plain loads (the `vec` flag, uniform over the grid).
#pragma once

#include <cmath>
#include <cstdint>

#include "mma_tiles.cuh"
#include "warp_mma.cuh"

namespace xclip_ext::ifa_mma_backward {

using warp_mma::BF16;
using warp_mma::F16;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

// Tile sizes and shared-memory layouts (bytes), used by the kernels, the CUDA launcher and the
// host-model entry alike, so that all three agree.
template <int DP>
struct BwdTiles {
  static_assert(DP % 32 == 0 && DP >= 32 && DP <= 128, "head dim is padded to 32, 64, 96 or 128");
  static constexpr int kStride = DP + 8;  // elements per shared row
  static constexpr int kRowBytes = kStride * 2;

  // dK/dV: a block owns kWarps * 16 keys and streams query tiles of dkdv_queries rows. dK and
  // dV take DP floats per lane; the query tile shrinks as DP grows (64, 32 at DP = 96, 16 at
  // DP = 128) so that the 16 x BM score tiles and the fragments in flight fit beside them in
  // 255 registers without spilling (at DP = 128 a 32-query tile spills under ptxas 13).
  static constexpr int dkdv_keys = 16 * kWarps;
  static constexpr int dkdv_queries = DP <= 64 ? 64 : DP <= 96 ? 32 : 16;
  struct Dkdv {  // byte offsets: K, V once; Q, dO, lse (log2 units), delta in 2 buffers each
    static constexpr int k = 0;
    static constexpr int v = k + dkdv_keys * kRowBytes;
    static constexpr int q = v + dkdv_keys * kRowBytes;
    static constexpr int dout = q + 2 * dkdv_queries * kRowBytes;
    static constexpr int lse = dout + 2 * dkdv_queries * kRowBytes;
    static constexpr int delta = lse + 2 * dkdv_queries * 4;
    static constexpr int total = delta + 2 * dkdv_queries * 4;
  };

  // dQ: a block owns kWarps * 16 query rows and streams key tiles of dq_keys rows (halved above
  // DP = 64 for the same register reason: dQ is DP / 2 floats per lane).
  static constexpr int dq_queries = 16 * kWarps;
  static constexpr int dq_keys = DP <= 64 ? 64 : 32;
  struct Dq {  // byte offsets: Q, dO once; K, V in 2 buffers; msg_k, msg_v, p_msg, ds_msg floats
    static constexpr int q = 0;
    static constexpr int dout = q + dq_queries * kRowBytes;
    static constexpr int k = dout + dq_queries * kRowBytes;
    static constexpr int v = k + 2 * dq_keys * kRowBytes;
    static constexpr int msg_k = v + 2 * dq_keys * kRowBytes;
    static constexpr int msg_v = msg_k + DP * 4;
    static constexpr int p_msg = msg_v + DP * 4;
    static constexpr int ds_msg = p_msg + dq_queries * 4;
    static constexpr int total = ds_msg + dq_queries * 4;
  };

  static constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
  // Grid y of each kernel (grid x is F * H); dq_tiles is also the partials' tile count.
  static constexpr int dkdv_tiles(int n) { return ceil_div(n, dkdv_keys); }
  static constexpr int dq_tiles(int n) { return ceil_div(n, dq_queries); }
};

using mma_tiles::Rows16;
using mma_tiles::Vecs16;

struct BwdParams {
  Rows16 q, k, v, dout;
  Vecs16 msg_k, msg_v;
  const float* lse;    // (F, H, N), natural log
  const float* delta;  // (F, H, N)
  uint16_t* dq;        // (F, N, H, D) contiguous, like dk and dv
  uint16_t* dk;
  uint16_t* dv;
  float* dmk_part;  // (F, H, q_tiles, D): this tile's s sum_i dS_msg_i q_i
  float* dmv_part;  // (F, H, q_tiles, D): this tile's sum_i p_i dO_i
  int n, h, d;
  int q_tiles;  // BwdTiles<DP>::dq_tiles(n)
  float scale, scale_log2e;
  bool vec;  // 16-byte staging allowed (vec_staging_ok)
};

// Host side: whether every operand's rows may be staged with 16-byte copies.
inline bool vec_staging_ok(const Rows16& r, int d) { return mma_tiles::rows_vectorizable(r, d); }

// ---- device helpers -------------------------------------------------------------------------

// A (F, H, D) vector as DP floats, zero past d.
template <class Tag, int DP>
__device__ __forceinline__ void stage_vec(Tag tag, float* dst, const uint16_t* src, int d) {
  for (int c = static_cast<int>(threadIdx.x); c < DP; c += kThreads)
    dst[c] = c < d ? warp_mma::to_float(tag, src[c]) : 0.f;
}

// The lane's ldmatrix row address for the 16 x 16 block at (row0, col0) of a tile with row
// stride kS: lanes 0-7 rows 0-7 / cols 0-7, 8-15 rows 8-15 / cols 0-7, 16-23 rows 0-7 / cols
// 8-15, 24-31 rows 8-15 / cols 8-15. Non-transposed, r[0..3] are then an A fragment (rows x k);
// for a B operand stored [n][k] the n8 tiles are {r[0], r[2]} (rows 0-7) and {r[1], r[3]};
// transposed (.trans), for a B operand stored [k][n], they are {r[0], r[1]} (cols 0-7) and
// {r[2], r[3]}.
template <int kS>
__device__ __forceinline__ const uint16_t* frag_row(const uint16_t* tile, int row0, int col0, int lane) {
  return tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kS + col0 + (lane >> 4) * 8;
}

__device__ __forceinline__ void zero(float (&c)[4]) { c[0] = c[1] = c[2] = c[3] = 0.f; }

// acc += a b (the accumulator passed as c through a copy: d and c never alias).
template <class Tag>
__device__ __forceinline__ void mma(Tag tag, float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  const float c[4] = {acc[0], acc[1], acc[2], acc[3]};
  warp_mma::mma_m16n8k16(tag, acc, a, b, c);
}

// Two n8 C tiles (columns 16 kk .. 16 kk + 15 of a 16-row tile) as the A fragment of one k16
// step, rounded to the input type.
template <class Tag>
__device__ __forceinline__ void c_to_a(Tag tag, uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = warp_mma::pack2(tag, lo[0], lo[1]);
  a[1] = warp_mma::pack2(tag, lo[2], lo[3]);
  a[2] = warp_mma::pack2(tag, hi[0], hi[1]);
  a[3] = warp_mma::pack2(tag, hi[2], hi[3]);
}

// acc[n] += A (16 x 16*KT, A fragments `a`) x B, B the [k][n] tile `b` (rows k, DP columns):
// transposed ldmatrix of each 16 x 16 block, n8 tiles over all DP columns.
template <class Tag, int KT, int DP, int kS>
__device__ __forceinline__ void mma_a_by_rows(Tag tag, float (&acc)[DP / 8][4], const uint32_t (&a)[KT][4],
                                              const uint16_t* b, int lane) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int dd = 0; dd < DP / 16; ++dd) {
      uint32_t r[4];
      warp_mma::ldmatrix_x4_trans(r, frag_row<kS>(b, 16 * kk, 16 * dd, lane));
      mma(tag, acc[2 * dd], a[kk], r[0], r[1]);
      mma(tag, acc[2 * dd + 1], a[kk], r[2], r[3]);
    }
  }
}

// s[n] = A B^T for a warp's 16 rows (from row0 of tile a) against NT rows of tile b (both
// [row][DP]): the score products of both kernels, one n8 tile of columns per s[n].
template <class Tag, int NT, int DP, int kS>
__device__ __forceinline__ void scores(Tag tag, float (&s)[NT / 8][4], const uint16_t* a, int row0, const uint16_t* b,
                                       int lane) {
#pragma unroll
  for (int nt = 0; nt < NT / 8; ++nt) zero(s[nt]);
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t fa[4];
    warp_mma::ldmatrix_x4(fa, frag_row<kS>(a, row0, 16 * kk, lane));
#pragma unroll
    for (int nn = 0; nn < NT / 16; ++nn) {
      uint32_t r[4];
      warp_mma::ldmatrix_x4(r, frag_row<kS>(b, 16 * nn, 16 * kk, lane));
      mma(tag, s[2 * nn], fa, r[0], r[2]);
      mma(tag, s[2 * nn + 1], fa, r[1], r[3]);
    }
  }
}

// Stores a warp's 16 x DP fp32 C tile `acc` times `mul` as 16-bit rows row0 + g, row0 + g + 8 of
// a contiguous (F, N, H, D) output (`out` = element (f, 0, h, 0), row stride H * D), rows
// below n and columns below d only.
template <class Tag, int DP>
__device__ __forceinline__ void store_rows(Tag tag, uint16_t* out, int64_t row_stride, int row0, int n, int d,
                                           const float (&acc)[DP / 8][4], float mul, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    if (r < n) {
      uint16_t* o = out + static_cast<int64_t>(r) * row_stride;
#pragma unroll
      for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = 8 * nt + 2 * t + e;
          if (c < d) o[c] = warp_mma::from_float(tag, acc[nt][2 * half + e] * mul);
        }
      }
    }
  }
}

// ---- dK / dV ----------------------------------------------------------------------------------

// One block per (frame-head, key tile of BwdTiles::dkdv_keys rows); loops over query tiles.
template <class Tag, int DP>
__global__ void __launch_bounds__(kThreads) ifa_mma_bwd_dkdv_kernel(BwdParams p) {
  using T = BwdTiles<DP>;
  using L = typename T::Dkdv;
  constexpr int BN = T::dkdv_keys, BM = T::dkdv_queries, kS = T::kStride;
  const Tag tag{};
  XK_EXTERN_SHARED(smem);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + L::k);
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + L::v);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + L::q);
  uint16_t* Gs = reinterpret_cast<uint16_t*>(smem + L::dout);
  float* Ls = reinterpret_cast<float*>(smem + L::lse);
  float* Ds = reinterpret_cast<float*>(smem + L::delta);

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int t = lane & 3;
  const int64_t fh = blockIdx.x;
  const int64_t f = fh / p.h, h = fh % p.h;
  const int n0 = static_cast<int>(blockIdx.y) * BN;
  const int n = p.n;
  const uint16_t* q_fh = p.q.ptr + f * p.q.sf + h * p.q.sh;
  const uint16_t* g_fh = p.dout.ptr + f * p.dout.sf + h * p.dout.sh;
  const float* lse_fh = p.lse + fh * n;
  const float* delta_fh = p.delta + fh * n;

  // Query tile `m0` into buffer `buf`: Q and dO (asynchronous with vec). Its lse (log2 units)
  // and delta are one value per thread (threads 0 .. BM - 1: lse, BM .. 2 BM - 1: delta; zero
  // past N, where every score is masked anyway): plain loads, returned so that the caller
  // stores them to shared memory only halfway through the current tile's products (the load
  // latency hides behind that work instead of stalling the next barrier).
  const int tid = static_cast<int>(threadIdx.x);
  auto stage_queries = [&](int m0, int buf) -> float {
    mma_tiles::stage_rows<BM, DP, kThreads>(Qs + buf * BM * kS, q_fh, p.q.sn, m0, n, p.d, p.vec);
    mma_tiles::stage_rows<BM, DP, kThreads>(Gs + buf * BM * kS, g_fh, p.dout.sn, m0, n, p.d, p.vec);
    const int r = tid < BM ? tid : tid - BM;
    if (tid >= 2 * BM || m0 + r >= n) return 0.f;
    return tid < BM ? lse_fh[m0 + r] * kLog2e : delta_fh[m0 + r];
  };
  auto store_stats = [&](float value, int buf) {
    if (tid < BM) Ls[buf * BM + tid] = value;
    else if (tid < 2 * BM) Ds[buf * BM + tid - BM] = value;
  };

  mma_tiles::stage_rows<BN, DP, kThreads>(Ks, p.k.ptr + f * p.k.sf + h * p.k.sh, p.k.sn, n0, n, p.d, p.vec);
  mma_tiles::stage_rows<BN, DP, kThreads>(Vs, p.v.ptr + f * p.v.sf + h * p.v.sh, p.v.sn, n0, n, p.d, p.vec);
  store_stats(stage_queries(0, 0), 0);
  warp_mma::cp_async_commit();

  float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
    zero(dk[i]);
    zero(dv[i]);
  }

  const int row0 = 16 * warp;  // this warp's keys within the tile
  for (int m0 = 0, it = 0; m0 < n; m0 += BM, ++it) {
    const int buf = it & 1;
    const bool has_next = m0 + BM < n;
    float next_stats = 0.f;
    if (has_next) {
      // Buffer buf ^ 1 was last read in the previous iteration, which ended with a barrier.
      next_stats = stage_queries(m0 + BM, buf ^ 1);
      warp_mma::cp_async_commit();
      warp_mma::cp_async_wait<1>();
    } else {
      warp_mma::cp_async_wait<0>();
    }
    warp_mma::sync_block();  // every thread's copies of this tile have landed
    const uint16_t* Qb = Qs + buf * BM * kS;
    const uint16_t* Gb = Gs + buf * BM * kS;
    const float* Lb = Ls + buf * BM;
    const float* Db = Ds + buf * BM;

    // One 16 x BM score tile at a time, to keep registers for dK and dV: S^T = K Q^T -> P^T ->
    // dV += P^T dO, then dP^T = V dO^T -> dS^T -> dK += dS^T Q (the scale comes at the store).
    // Query columns past N contribute nothing; key rows past N are zero in K and V and are
    // never stored.
    float s[BM / 8][4];
    uint32_t a[BM / 16][4];
    scores<Tag, BM, DP, kS>(tag, s, Ks, row0, Qb, lane);
    float pt[BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * nt + 2 * t + (e & 1);
        pt[nt][e] = m0 + col < n ? exp2f(s[nt][e] * p.scale_log2e - Lb[col]) : 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) c_to_a(tag, a[kk], pt[2 * kk], pt[2 * kk + 1]);
    mma_a_by_rows<Tag, BM / 16, DP, kS>(tag, dv, a, Gb, lane);
    if (has_next) store_stats(next_stats, buf ^ 1);  // read after the barrier that ends this tile

    scores<Tag, BM, DP, kS>(tag, s, Vs, row0, Gb, lane);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * nt + 2 * t + (e & 1);
        s[nt][e] = m0 + col < n ? pt[nt][e] * (s[nt][e] - Db[col]) : 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) c_to_a(tag, a[kk], s[2 * kk], s[2 * kk + 1]);
    mma_a_by_rows<Tag, BM / 16, DP, kS>(tag, dk, a, Qb, lane);
    // Everyone is done with buffer buf before it is refilled. (The host model's test drops it
    // with XK_TEST_DROP_DKDV_TILE_BARRIER and expects its race error; never defined in a real build.)
#ifndef XK_TEST_DROP_DKDV_TILE_BARRIER
    warp_mma::sync_block();
#endif
  }

  const int64_t row_stride = static_cast<int64_t>(p.h) * p.d;
  const int64_t out0 = (f * n * p.h + h) * p.d;  // element (f, 0, h, 0)
  store_rows<Tag, DP>(tag, p.dk + out0, row_stride, n0 + row0, n, p.d, dk, p.scale, lane);
  store_rows<Tag, DP>(tag, p.dv + out0, row_stride, n0 + row0, n, p.d, dv, 1.f, lane);
}

// ---- dQ and the message column ----------------------------------------------------------------

// One block per (frame-head, query tile of BwdTiles::dq_queries rows); loops over key tiles,
// then adds the message column and writes this tile's partials of d msg_k and d msg_v.
template <class Tag, int DP>
__global__ void __launch_bounds__(kThreads) ifa_mma_bwd_dq_kernel(BwdParams p) {
  using T = BwdTiles<DP>;
  using L = typename T::Dq;
  constexpr int BM = T::dq_queries, BN = T::dq_keys, kS = T::kStride;
  const Tag tag{};
  XK_EXTERN_SHARED(smem);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + L::q);
  uint16_t* Gs = reinterpret_cast<uint16_t*>(smem + L::dout);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + L::k);
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + L::v);
  float* Mk = reinterpret_cast<float*>(smem + L::msg_k);
  float* Mv = reinterpret_cast<float*>(smem + L::msg_v);
  float* Pm = reinterpret_cast<float*>(smem + L::p_msg);
  float* Sm = reinterpret_cast<float*>(smem + L::ds_msg);

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t fh = blockIdx.x;
  const int64_t f = fh / p.h, h = fh % p.h;
  const int m0 = static_cast<int>(blockIdx.y) * BM;
  const int n = p.n;
  const uint16_t* k_fh = p.k.ptr + f * p.k.sf + h * p.k.sh;
  const uint16_t* v_fh = p.v.ptr + f * p.v.sf + h * p.v.sh;

  mma_tiles::stage_rows<BM, DP, kThreads>(Qs, p.q.ptr + f * p.q.sf + h * p.q.sh, p.q.sn, m0, n, p.d, p.vec);
  mma_tiles::stage_rows<BM, DP, kThreads>(Gs, p.dout.ptr + f * p.dout.sf + h * p.dout.sh, p.dout.sn, m0, n, p.d, p.vec);
  mma_tiles::stage_rows<BN, DP, kThreads>(Ks, k_fh, p.k.sn, 0, n, p.d, p.vec);
  mma_tiles::stage_rows<BN, DP, kThreads>(Vs, v_fh, p.v.sn, 0, n, p.d, p.vec);
  warp_mma::cp_async_commit();
  stage_vec<Tag, DP>(tag, Mk, p.msg_k.ptr + f * p.msg_k.sf + h * p.msg_k.sh, p.d);
  stage_vec<Tag, DP>(tag, Mv, p.msg_v.ptr + f * p.msg_v.sf + h * p.msg_v.sh, p.d);

  // This lane's two query rows (g and g + 8 of the warp's 16): lse in log2 units and delta;
  // rows past N are masked below.
  const int row0 = 16 * warp;
  float lse2[2], delta[2];
  bool row_ok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + row0 + g + 8 * half;
    row_ok[half] = r < n;
    lse2[half] = row_ok[half] ? p.lse[fh * n + r] * kLog2e : 0.f;
    delta[half] = row_ok[half] ? p.delta[fh * n + r] : 0.f;
  }

  float dq[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) zero(dq[i]);

  for (int n0 = 0, it = 0; n0 < n; n0 += BN, ++it) {
    const int buf = it & 1;
    if (n0 + BN < n) {
      mma_tiles::stage_rows<BN, DP, kThreads>(Ks + (buf ^ 1) * BN * kS, k_fh, p.k.sn, n0 + BN, n, p.d, p.vec);
      mma_tiles::stage_rows<BN, DP, kThreads>(Vs + (buf ^ 1) * BN * kS, v_fh, p.v.sn, n0 + BN, n, p.d, p.vec);
      warp_mma::cp_async_commit();
      warp_mma::cp_async_wait<1>();
    } else {
      warp_mma::cp_async_wait<0>();
    }
    warp_mma::sync_block();
    const uint16_t* Kb = Ks + buf * BN * kS;
    const uint16_t* Vb = Vs + buf * BN * kS;

    // S = Q K^T and dP = dO V^T: this warp's 16 queries x BN keys; then dS in fp32, zero for
    // key columns past N and query rows past N.
    float s[BN / 8][4], dp[BN / 8][4];
    scores<Tag, BN, DP, kS>(tag, s, Qs, row0, Kb, lane);
    scores<Tag, BN, DP, kS>(tag, dp, Gs, row0, Vb, lane);
    uint32_t sa[BN / 16][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        const bool valid = row_ok[half] && n0 + 8 * nt + 2 * t + (e & 1) < n;
        const float pv = exp2f(s[nt][e] * p.scale_log2e - lse2[half]);
        dp[nt][e] = valid ? pv * (dp[nt][e] - delta[half]) : 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) c_to_a(tag, sa[kk], dp[2 * kk], dp[2 * kk + 1]);

    // dQ += dS K (the scale is applied at the store).
    mma_a_by_rows<Tag, BN / 16, DP, kS>(tag, dq, sa, Kb, lane);
    // Everyone is done with buffer buf before it is refilled (dropped by the host model's test
    // with XK_TEST_DROP_DQ_TILE_BARRIER, as above).
#ifndef XK_TEST_DROP_DQ_TILE_BARRIER
    warp_mma::sync_block();
#endif
  }

  // The message column: p = exp(s q.msg_k - lse), dS_msg = p (dO.msg_v - delta). The quad's
  // four lanes share rows g and g + 8; each takes every fourth column, then they combine.
  float pm[2], dsm[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint16_t* qr = Qs + (row0 + g + 8 * half) * kS;
    const uint16_t* gr = Gs + (row0 + g + 8 * half) * kS;
    float qm = 0.f, gm = 0.f;
#pragma unroll
    for (int c = t; c < DP; c += 4) {
      qm += warp_mma::to_float(tag, qr[c]) * Mk[c];
      gm += warp_mma::to_float(tag, gr[c]) * Mv[c];
    }
    qm += warp_mma::shfl_xor(qm, 1);
    qm += warp_mma::shfl_xor(qm, 2);
    gm += warp_mma::shfl_xor(gm, 1);
    gm += warp_mma::shfl_xor(gm, 2);
    pm[half] = row_ok[half] ? exp2f(qm * p.scale_log2e - lse2[half]) : 0.f;
    dsm[half] = row_ok[half] ? pm[half] * (gm - delta[half]) : 0.f;
  }
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nt][e] += dsm[e >> 1] * Mk[8 * nt + 2 * t + (e & 1)];
  }
  if (t == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      Pm[row0 + g + 8 * half] = pm[half];
      Sm[row0 + g + 8 * half] = dsm[half];
    }
  }
  const int64_t row_stride = static_cast<int64_t>(p.h) * p.d;
  store_rows<Tag, DP>(tag, p.dq + (f * n * p.h + h) * p.d, row_stride, m0 + row0, n, p.d, dq, p.scale, lane);
  warp_mma::sync_block();

  // This tile's partials, summed over its rows in order (rows past N: p = dS = 0, Q = dO = 0).
  const int64_t part = (fh * p.q_tiles + blockIdx.y) * p.d;
  for (int c = static_cast<int>(threadIdx.x); c < p.d; c += kThreads) {
    float a = 0.f, b = 0.f;
    for (int r = 0; r < BM; ++r) {
      a += Sm[r] * warp_mma::to_float(tag, Qs[r * kS + c]);
      b += Pm[r] * warp_mma::to_float(tag, Gs[r * kS + c]);
    }
    p.dmk_part[part + c] = a * p.scale;
    p.dmv_part[part + c] = b;
  }
}

}  // namespace xclip_ext::ifa_mma_backward
