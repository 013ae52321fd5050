// Test entry points of the host model itself (tests/xclip_kernels/test_cuda_host_model.py): a tiny
// tensor-core kernel written on warp_mma.cuh exactly as the real kernels are, the 16-bit
// conversions, and kernels that commit the bugs the model must report.
#include "warp_mma.cuh"

namespace {

using namespace xclip_ext::warp_mma;

// D = A B + C for a batch of 16 x 16 problems, one block of two warps each (warp w computes the
// columns 8w .. 8w + 7 as one m16n8k16). 16-bit operands in global memory:
//   A: row-major A (16 x 16, m x k), or with ATrans row-major A^T (k x m), read with ldmatrix .trans;
//   B: row-major B^T (n x k, the "col" operand as stored), or with BTrans row-major B (k x n),
//      read with ldmatrix .trans.
// Staging: cp_async_16 of A and B into dynamic shared memory (64 chunks of 16 bytes, one per thread).
template <class Tag, bool ATrans, bool BTrans>
__global__ void __launch_bounds__(64) mma_tile_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b,
                                                      const float* __restrict__ c, float* __restrict__ d) {
  XK_EXTERN_SHARED(smem);
  uint16_t* a_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* b_s = a_s + 256;
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const unsigned problem = blockIdx.x;
  const uint16_t* src = (warp == 0 ? a : b) + problem * 256 + lane * 8;
  cp_async_16((warp == 0 ? a_s : b_s) + lane * 8, src, true);
  cp_async_commit();
  cp_async_wait<0>();
  sync_block();

  uint32_t a_frag[4], b_frag[2];
  if (ATrans) {
    // Matrix j of .x4 is A^T's 8 x 8 block (rows 8 (j / 2), columns 8 (j % 2)): its transpose is
    // A's block (rows 8 (j % 2), columns 8 (j / 2)), the order a[0..3] needs.
    ldmatrix_x4_trans(a_frag, a_s + ((lane % 8) + (lane / 16) * 8) * 16 + ((lane / 8) % 2) * 8);
  } else {
    // Matrix j: A's rows 8 (j % 2) .., columns 8 (j / 2) ..: lane l gives row l % 16, column 8 (l / 16).
    ldmatrix_x4(a_frag, a_s + (lane % 16) * 16 + (lane / 16) * 8);
  }
  if (BTrans) {
    // Matrix j: B's rows (k) 8j .. 8j + 7, columns (n) 8 warp ..; lanes 16..31 give unused addresses.
    ldmatrix_x2_trans(b_frag, b_s + (lane % 16) * 16 + 8 * warp);
  } else {
    // Matrix j: B^T's rows (n) 8 warp + 0..7, columns (k) 8j ...
    ldmatrix_x2(b_frag, b_s + (8 * warp + lane % 8) * 16 + ((lane / 8) % 2) * 8);
  }
  const unsigned g = lane / 4, t = lane % 4, col = 8 * warp + 2 * t;
  const float* c_p = c + problem * 256;
  float acc[4] = {c_p[g * 16 + col], c_p[g * 16 + col + 1], c_p[(g + 8) * 16 + col], c_p[(g + 8) * 16 + col + 1]};
  mma_m16n8k16(Tag{}, acc, a_frag, b_frag, acc);
  float* d_p = d + problem * 256;
  d_p[g * 16 + col] = acc[0];
  d_p[g * 16 + col + 1] = acc[1];
  d_p[(g + 8) * 16 + col] = acc[2];
  d_p[(g + 8) * 16 + col + 1] = acc[3];
}

template <class Tag, bool ATrans, bool BTrans>
void launch_mma_tile(int batch, const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  xk_sim::register_global(a, static_cast<std::size_t>(batch) * 256 * sizeof(uint16_t));
  xk_sim::register_global(b, static_cast<std::size_t>(batch) * 256 * sizeof(uint16_t));
  xk_sim::launch(dim3(static_cast<unsigned>(batch)), dim3(64), 2 * 256 * sizeof(uint16_t),
                 mma_tile_kernel<Tag, ATrans, BTrans>, a, b, c, d);
}

template <class Tag>
void dispatch_mma_tile(bool a_trans, bool b_trans, int batch, const uint16_t* a, const uint16_t* b, const float* c,
                       float* d) {
  if (a_trans && b_trans) launch_mma_tile<Tag, true, true>(batch, a, b, c, d);
  else if (a_trans) launch_mma_tile<Tag, true, false>(batch, a, b, c, d);
  else if (b_trans) launch_mma_tile<Tag, false, true>(batch, a, b, c, d);
  else launch_mma_tile<Tag, false, false>(batch, a, b, c, d);
}

// ---- probes of single instructions (the layout tables are checked in Python) ----------------

// Lane l of one warp runs the ldmatrix `variant` (0 .x4, 1 .x4.trans, 2 .x2, 3 .x2.trans) with its
// row address at element offsets[l] of a 512-element shared image of `image`; out[l][j] = r[j].
__global__ void ldmatrix_probe_kernel(int variant, const uint16_t* image, const int* offsets, uint32_t* out) {
  XK_EXTERN_SHARED(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  const unsigned lane = threadIdx.x;
  for (unsigned chunk = lane; chunk < 64; chunk += 32) cp_async_16(s + chunk * 8, image + chunk * 8, true);
  cp_async_commit();
  cp_async_wait<0>();
  sync_block();
  uint32_t r[4] = {0, 0, 0, 0};
  uint32_t(&r2)[2] = reinterpret_cast<uint32_t(&)[2]>(r);
  const uint16_t* row = s + offsets[lane];
  if (variant == 0) ldmatrix_x4(r, row);
  else if (variant == 1) ldmatrix_x4_trans(r, row);
  else if (variant == 2) ldmatrix_x2(r2, row);
  else ldmatrix_x2_trans(r2, row);
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

// Lane l of one warp passes registers a[l][0..3], b[l][0..1], c[l][0..3] to the mma; d[l] is its result.
template <class Tag>
__global__ void mma_probe_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const unsigned lane = threadIdx.x;
  const uint32_t a_frag[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3]};
  const uint32_t b_frag[2] = {b[lane * 2], b[lane * 2 + 1]};
  const float c_frag[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
  float d_frag[4];
  mma_m16n8k16(Tag{}, d_frag, a_frag, b_frag, c_frag);
  for (int j = 0; j < 4; ++j) d[lane * 4 + j] = d_frag[j];
}

// out[t] = shfl_xor(in[t], masks[t]) over a block of `threads` (whole warps).
__global__ void shfl_probe_kernel(const float* in, const int* masks, float* out) {
  const unsigned t = threadIdx.x;
  out[t] = shfl_xor(in[t], masks[t]);
}

// Every thread writes its coordinates: out[block][thread] = (threadIdx, blockIdx, blockDim, gridDim, order),
// order = how many threads ran before it (the launch's thread order).
__global__ void index_probe_kernel(uint32_t* out, uint32_t* counter) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  uint32_t* o = out + (static_cast<std::size_t>(block) * threads + thread) * 13;
  const uint32_t values[13] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                               blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z, (*counter)++};
  for (int i = 0; i < 13; ++i) o[i] = values[i];
}

// What cp.async looks like to plain loads: out[l] = the destination's first element before the
// commit, after the commit, after the wait; then a zero-filling copy (full == false) after its wait.
__global__ void cp_async_visibility_kernel(const uint16_t* g, uint16_t* out) {
  XK_EXTERN_SHARED(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  const unsigned lane = threadIdx.x;
  cp_async_16(s + lane * 8, g + lane * 8, true);
  out[lane * 4] = s[lane * 8];
  cp_async_commit();
  out[lane * 4 + 1] = s[lane * 8];
  cp_async_wait<0>();
  out[lane * 4 + 2] = s[lane * 8];
  cp_async_16(s + lane * 8, g, false);
  cp_async_commit();
  cp_async_wait<0>();
  out[lane * 4 + 3] = s[lane * 8];
}

// ---- kernels that commit the bugs the model must report (tests name them by number) ------------

enum Bug : int {
  kNoBug = 0,
  kDivergentKinds = 1,
  kDivergentSites = 2,
  kLanesExited = 3,
  kBlockNotReached = 4,
  kBlockVsWarp = 5,
  kLdmatrixMisaligned = 6,
  kLdmatrixOutside = 7,
  kCpAsyncDstMisaligned = 8,
  kCpAsyncDstOutside = 9,
  kCpAsyncSrcMisaligned = 10,
  kCpAsyncSrcUnregistered = 11,
  kReadBeforeWait = 12,
  kUncommitted = 13,
  kNewerGroupPending = 14,
  kWaitAfterBarrier = 15,
  kPartialWarp = 16,
  kSharedTooLarge = 17,
  kBlockVsWarpLast = 18,
};

// Two warps; shared memory is two 16 x 16 tiles of 16-bit values (1024 bytes), tile w staged by
// warp w from g (512 valid, registered elements).
__global__ void bug_kernel(int which, const uint16_t* g, uint32_t* out) {
  XK_EXTERN_SHARED(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  uint32_t r[4] = {0, 0, 0, 0};
  const uint16_t* tile0_row = s + (lane % 16) * 16 + (lane / 16) * 8;
  switch (which) {
    case kNoBug:
    case kLdmatrixMisaligned:
    case kLdmatrixOutside:
    case kDivergentSites:
      cp_async_16(s + tid * 8, g + tid * 8, true);
      cp_async_commit();
      cp_async_wait<0>();
      sync_block();
      if (which == kNoBug) ldmatrix_x4(r, tile0_row);
      if (which == kLdmatrixMisaligned) ldmatrix_x4(r, lane == 5 ? tile0_row + 4 : tile0_row);
      if (which == kLdmatrixOutside) ldmatrix_x4(r, lane == 7 ? s + 512 : tile0_row);
      if (which == kDivergentSites) {
        if (lane < 16) ldmatrix_x4(r, tile0_row);
        else ldmatrix_x4(r, tile0_row);
      }
      break;
    case kDivergentKinds:
      if (warp == 0) {
        if (lane < 16) shfl_xor(1.0f, 1);
        else sync_warp();
      }
      break;
    case kLanesExited:
      if (lane >= 16) return;
      shfl_xor(1.0f, 1);
      break;
    case kBlockNotReached:
      if (tid == 5) return;
      sync_block();
      break;
    case kBlockVsWarp:
      if (warp == 0 && lane == 3) sync_block();
      else if (warp == 0) sync_warp();
      else sync_block();
      break;
    case kCpAsyncDstMisaligned: cp_async_16(s + (tid == 9 ? 4 : 0), g, true); break;
    case kCpAsyncDstOutside: cp_async_16(s + (tid == 9 ? 512 : 0), g, true); break;
    case kCpAsyncSrcMisaligned: cp_async_16(s, g + (tid == 9 ? 1 : 0), true); break;
    case kCpAsyncSrcUnregistered: cp_async_16(s, g + (tid == 9 ? 512 : 0), true); break;
    case kReadBeforeWait:
      cp_async_16(s + tid * 8, g + tid * 8, true);
      cp_async_commit();
      sync_block();
      ldmatrix_x4(r, tile0_row);
      break;
    case kUncommitted:
      cp_async_16(s + tid * 8, g + tid * 8, true);
      cp_async_wait<0>();
      sync_block();
      ldmatrix_x4(r, tile0_row);
      break;
    case kNewerGroupPending:
      // Warp 0 stages tile 0 as group 0 and tile 1 as group 1, then waits for all but one group:
      // tile 0 is readable, tile 1 is not.
      if (warp == 0) cp_async_16(s + lane * 8, g + lane * 8, true);
      cp_async_commit();
      if (warp == 0) cp_async_16(s + 256 + lane * 8, g + 256 + lane * 8, true);
      cp_async_commit();
      cp_async_wait<1>();
      sync_block();
      ldmatrix_x4(r, tile0_row);
      ldmatrix_x4(r, tile0_row + 256);
      break;
    case kWaitAfterBarrier:
      // The wait comes after the barrier: warp 1 reads tile 0 that warp 0 landed with no barrier since.
      cp_async_16(s + tid * 8, g + tid * 8, true);
      cp_async_commit();
      sync_block();
      cp_async_wait<0>();
      if (warp == 1) ldmatrix_x4(r, tile0_row);
      break;
    case kBlockVsWarpLast:  // the lane at the barrier is the last of its warp to stop
      if (warp == 0 && lane == 31) sync_block();
      else if (warp == 0) sync_warp();
      else sync_block();
      break;
    case kPartialWarp: sync_warp(); break;
    default: break;
  }
  for (int j = 0; j < 4; ++j) out[tid * 4 + j] = r[j];
}

// A double buffer, the pattern of the real kernels' streamed tiles: tile t + 1 (32 rows x 16
// 16-bit elements, chunk c = row c / 2, half c % 2) is copied into the other buffer while tile t
// is read. Who copies (`copier`):
//   2: thread tid copies chunk tid (warp w: rows 16w ..), and warp w reads rows 16 (1 - w) ..,
//      the other warp's copies: both warps run the same program in lockstep, as the real ones;
//   0 or 1: that warp copies every chunk (lane l: chunks l, l + 32), the other warp reads;
//  -1: as 2, but each warp reads its own rows, ordered by sync_warp alone (no race: one warp).
// The reading warp w writes its ldmatrix_x4 register 0 to out[w][t][lane]. The barriers: `landed`
// after each tile's wait (read after write: another warp's copy before this warp's read) and
// `done` ending each tile (write after read: every read of a buffer before its refill).
__global__ void double_buffer_kernel(int tiles, int copier, bool landed, bool done, const uint16_t* g, uint32_t* out) {
  XK_EXTERN_SHARED(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);  // two buffers of 512 elements
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool own = copier < 0, single = copier == 0 || copier == 1;
  const bool reads = !single || static_cast<int>(warp) != copier;
  const unsigned row0 = own ? 16 * warp : 16 * (1 - warp);
  auto stage = [&](int t) {
    uint16_t* buffer = s + (t % 2) * 512;
    const uint16_t* tile = g + t * 512;
    if (!single) {
      cp_async_16(buffer + tid * 8, tile + tid * 8, true);
    } else if (static_cast<int>(warp) == copier) {
      cp_async_16(buffer + lane * 8, tile + lane * 8, true);
      cp_async_16(buffer + (lane + 32) * 8, tile + (lane + 32) * 8, true);
    }
    cp_async_commit();
  };
  stage(0);
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) {
      stage(t + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (own) sync_warp();
    else if (landed) sync_block();
    if (reads) {
      uint32_t r[4];
      ldmatrix_x4(r, s + (t % 2) * 512 + (row0 + lane % 16) * 16 + (lane / 16) * 8);
      out[(warp * tiles + t) * 32 + lane] = r[0];
    }
    if (!own && done) sync_block();
  }
}

}  // namespace

extern "C" {

// Runs double_buffer_kernel on one block of two warps (g: tiles * 512 elements, registered;
// out: 2 x tiles x 32).
int xk_selftest_double_buffer(int tiles, int copier, int landed, int done, const uint16_t* g, uint32_t* out) {
  return xk_sim::run_entry([&] {
    if (tiles < 1 || copier < -1 || copier > 2)
      throw xk_sim::Error("tiles must be positive and copier -1, 0, 1 or 2, got " + std::to_string(tiles) + ", " +
                          std::to_string(copier));
    xk_sim::register_global(g, static_cast<std::size_t>(tiles) * 512 * sizeof(uint16_t));
    xk_sim::launch(dim3(1), dim3(64), 2048, double_buffer_kernel, tiles, copier, landed != 0,
                   done != 0, g, out);
  });
}

// d[p] = a[p] b[p] + c[p] for p < batch (16 x 16 each, layouts as mma_tile_kernel says); bf16 != 0
// for bfloat16 operands, else float16.
int xk_selftest_mma(int bf16, int a_trans, int b_trans, int batch, const uint16_t* a, const uint16_t* b,
                    const float* c, float* d) {
  return xk_sim::run_entry([&] {
    if (batch < 1) throw xk_sim::Error("batch must be positive, got " + std::to_string(batch));
    if (bf16) dispatch_mma_tile<BF16>(a_trans != 0, b_trans != 0, batch, a, b, c, d);
    else dispatch_mma_tile<F16>(a_trans != 0, b_trans != 0, batch, a, b, c, d);
  });
}

// out[i] = from_float(tag, x[i]) (round to nearest even) for i < n.
int xk_selftest_from_float(int bf16, const float* x, uint16_t* out, long n) {
  return xk_sim::run_entry([&] {
    for (long i = 0; i < n; ++i) out[i] = bf16 ? from_float(BF16{}, x[i]) : from_float(F16{}, x[i]);
  });
}

// out[i] = to_float(tag, bits[i]) for i < n.
int xk_selftest_to_float(int bf16, const uint16_t* bits, float* out, long n) {
  return xk_sim::run_entry([&] {
    for (long i = 0; i < n; ++i) out[i] = bf16 ? to_float(BF16{}, bits[i]) : to_float(F16{}, bits[i]);
  });
}

int xk_selftest_ldmatrix(int variant, const uint16_t* image, const int* offsets, uint32_t* out) {
  return xk_sim::run_entry([&] {
    if (variant < 0 || variant > 3) throw xk_sim::Error("variant must be 0..3, got " + std::to_string(variant));
    xk_sim::launch(dim3(1), dim3(32), 1024, ldmatrix_probe_kernel, variant, image, offsets, out);
  });
}

int xk_selftest_mma_fragments(int bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  return xk_sim::run_entry([&] {
    if (bf16) xk_sim::launch(dim3(1), dim3(32), 0, mma_probe_kernel<BF16>, a, b, c, d);
    else xk_sim::launch(dim3(1), dim3(32), 0, mma_probe_kernel<F16>, a, b, c, d);
  });
}

int xk_selftest_shfl(int threads, const float* in, const int* masks, float* out) {
  return xk_sim::run_entry([&] {
    xk_sim::launch(dim3(1), dim3(static_cast<unsigned>(threads)), 0, shfl_probe_kernel, in, masks, out);
  });
}

// out holds grid * block * 13 values (index_probe_kernel).
int xk_selftest_indices(const unsigned* grid, const unsigned* block, uint32_t* out) {
  return xk_sim::run_entry([&] {
    uint32_t counter = 0;
    xk_sim::launch(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, index_probe_kernel, out,
                   &counter);
  });
}

// g: 256 elements; out: 32 x 4 (cp_async_visibility_kernel).
int xk_selftest_cp_async_visibility(const uint16_t* g, uint16_t* out) {
  return xk_sim::run_entry([&] { xk_sim::launch(dim3(1), dim3(32), 512, cp_async_visibility_kernel, g, out); });
}

// Runs bug_kernel case `which` (g: 1024 elements, the first 512 registered; out: 64 x 4).
int xk_selftest_bug(int which, const uint16_t* g, uint32_t* out) {
  return xk_sim::run_entry([&] {
    xk_sim::register_global(g, 512 * sizeof(uint16_t));
    xk_sim::launch(dim3(1), dim3(which == kPartialWarp ? 48 : 64), which == kSharedTooLarge ? 200000 : 1024,
                   bug_kernel, which, g, out);
  });
}

}  // extern "C"
