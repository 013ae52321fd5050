// What the tensor-core kernels (ifa_mma_forward.cuh, ifa_mma_backward.cuh) share about their
// 16-bit operands: how they are passed (pointer and element strides), when their rows may be
// staged with 16-byte cp.async copies, and the staging of a tile of rows into shared memory.
// Written on warp_mma.cuh only, so that it runs in the host model too (docs/cuda.md).
#pragma once

#include <cstdint>

#include "warp_mma.cuh"

namespace xclip_ext::mma_tiles {

// A (F, N, H, D) operand of 16-bit elements read through its strides in elements (last dim
// contiguous).
struct Rows16 {
  const uint16_t* ptr;
  int64_t sf, sn, sh;
};
// A (F, H, D) operand.
struct Vecs16 {
  const uint16_t* ptr;
  int64_t sf, sh;
};

// Host side: whether every row of `rows` starts 16-byte aligned and holds whole 16-byte chunks
// (8 elements): base pointer and the F, N, H strides multiples of 8 elements, D too. Otherwise
// the kernels stage element by element with plain loads.
inline bool rows_vectorizable(const Rows16& rows, int64_t dim) {
  return dim % 8 == 0 && reinterpret_cast<uintptr_t>(rows.ptr) % 16 == 0 && rows.sf % 8 == 0 &&
         rows.sn % 8 == 0 && rows.sh % 8 == 0;
}

// Rows [row0, row0 + ROWS) x [0, DP) of one frame-head's (N, D) slice (row stride `row_stride`
// elements, `src` = its row 0) into a shared tile of row pitch DP + 8 elements; rows >= n and
// columns >= d become zero, so products over the padding add exact zeros. With `vec` one
// cp.async per 16 bytes (the caller commits and waits; a zero-filling copy reads nothing but
// still gets an address inside the operand), else plain loads and stores (visible after the
// caller's block barrier). THREADS threads of the block share the work.
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void stage_rows(uint16_t* dst, const uint16_t* src, int64_t row_stride, int row0, int n,
                                           int d, bool vec) {
  constexpr int kChunks = DP / 8, kPitch = DP + 8, kTotal = ROWS * kChunks;
  constexpr int kSteps = (kTotal + THREADS - 1) / THREADS;
  if (vec) {
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + i * THREADS;
      if (kTotal % THREADS == 0 || idx < kTotal) {
        const int r = idx / kChunks, c = (idx % kChunks) * 8;
        const bool full = row0 + r < n && c < d;  // d % 8 == 0 here: a chunk is all in or all out
        warp_mma::cp_async_16(dst + r * kPitch + c, full ? src + static_cast<int64_t>(row0 + r) * row_stride + c : src,
                              full);
      }
    }
  } else {
    // The rare path (unaligned or D % 8 != 0): kept rolled, so that it does not cost the kernel
    // registers (unrolled, it raised the forward's from 95 to 127 at DP = 64).
#pragma unroll 1
    for (int i = 0; i < kSteps; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + i * THREADS;
      if (kTotal % THREADS == 0 || idx < kTotal) {
        const int r = idx / kChunks, c = (idx % kChunks) * 8;
        const bool row_ok = row0 + r < n;
        const uint16_t* s = src + static_cast<int64_t>(row_ok ? row0 + r : 0) * row_stride + c;
        uint16_t* t = dst + r * kPitch + c;
#pragma unroll
        for (int e = 0; e < 8; ++e) t[e] = (row_ok && c + e < d) ? s[e] : uint16_t(0);
      }
    }
  }
}

}  // namespace xclip_ext::mma_tiles
