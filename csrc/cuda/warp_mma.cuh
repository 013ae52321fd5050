// Warp-level tensor-core building blocks for the CUDA kernels, with two definitions of each:
// on the device (nvcc) inline PTX; in the host model (XK_HOST_MODEL defined, plain g++) an
// emulation of the same instruction on a CPU SIMT scheduler (host_model/simt.h), so that the
// kernels written on these blocks run unchanged on the CPU in `make test` (docs/cuda.md).
//
// Every function is called by every lane of a warp together (they are warp collectives on the
// device: .sync.aligned); each lane passes its own arguments and gets its own results. The
// fragment layouts are the PTX ISA's (section "Matrix fragments for mma.m16n8k16" and
// "ldmatrix"), with groupID g = lane / 4 and t = lane % 4:
//
//   A, 16 x 16 (row-major), 4 registers of two 16-bit elements each (low half = lower column):
//     a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B, 16 x 8 (k x n, "col"), 2 registers:
//     b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C and D, 16 x 8 float32, 4 floats:
//     c[0], c[1] = C[g][2t], C[g][2t+1]   c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//
//   ldmatrix .x4 (.x2): lanes 8j..8j+7 give the addresses of rows 0..7 of 8 x 8 matrix j
//   (j < 4, or j < 2 for .x2; each row 8 contiguous 16-bit elements, 16-byte aligned, in shared
//   memory). Lane l gets r[j] = M_j[l / 4][2 (l % 4), 2 (l % 4) + 1]; with .trans it gets
//   r[j] = (M_j[2 (l % 4)][l / 4], M_j[2 (l % 4) + 1][l / 4]), i.e. the same of M_j transposed.
//
// 16-bit element types are tags (F16, BF16) over uint16_t storage: the kernels move raw bits
// and convert with to_float / pack2 (round to nearest even, NaN kept) so that the host model
// needs no CUDA headers.
#pragma once

#include <cstdint>

#if defined(XK_HOST_MODEL)
#include "host_model/simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// The kernel's dynamic shared memory, 16-byte aligned: XK_EXTERN_SHARED(smem) declares
// `unsigned char* smem`-like storage on both sides (kernels written on these blocks use no
// static __shared__ arrays, so that the host model has one buffer per block to check against).
#if !defined(XK_HOST_MODEL)
#define XK_EXTERN_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace xclip_ext::warp_mma {

struct F16 {};
struct BF16 {};

#if !defined(XK_HOST_MODEL)

// ---- conversions ----------------------------------------------------------------------------

__device__ __forceinline__ float to_float(F16, uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ float to_float(BF16, uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
__device__ __forceinline__ uint16_t from_float(F16, float x) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ uint16_t from_float(BF16, float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
// Two floats as one register of two 16-bit elements: lo in bits 0..15 (the lower column).
__device__ __forceinline__ uint32_t pack2(F16 tag, float lo, float hi) {
  return static_cast<uint32_t>(from_float(tag, lo)) | (static_cast<uint32_t>(from_float(tag, hi)) << 16);
}
__device__ __forceinline__ uint32_t pack2(BF16 tag, float lo, float hi) {
  return static_cast<uint32_t>(from_float(tag, lo)) | (static_cast<uint32_t>(from_float(tag, hi)) << 16);
}

// ---- shared-memory fragment loads ------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}

// ---- the product: d = a * b + c, fp32 accumulation --------------------------------------------

__device__ __forceinline__ void mma_m16n8k16(F16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16(BF16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// ---- asynchronous global -> shared copies (sm_80+) --------------------------------------------

// Copies 16 bytes (both addresses 16-byte aligned); with full == false it writes 16 zero bytes
// and reads nothing (the ragged tail of a tile).
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_dst)),
               "l"(global_src), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `Pending` committed groups of this thread are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// ---- lane exchange and block barrier -----------------------------------------------------------

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
__device__ __forceinline__ void sync_warp() { __syncwarp(); }
__device__ __forceinline__ void sync_block() { __syncthreads(); }

#else  // XK_HOST_MODEL: the emulation on host_model/simt.h's scheduler

// Every collective takes the caller's source location as hidden trailing arguments
// (__builtin_FILE/__builtin_LINE defaults), so that the model's messages name the kernel's line
// and can tell the call sites of .aligned instructions apart; calls look the same as on the device.

inline float to_float(F16, uint16_t bits) { return ::xk_sim::detail::f16_to_float(bits); }
inline float to_float(BF16, uint16_t bits) { return ::xk_sim::detail::bf16_to_float(bits); }
inline uint16_t from_float(F16, float x) { return ::xk_sim::detail::float_to_f16(x); }
inline uint16_t from_float(BF16, float x) { return ::xk_sim::detail::float_to_bf16(x); }
inline uint32_t pack2(F16 tag, float lo, float hi) {
  return static_cast<uint32_t>(from_float(tag, lo)) | (static_cast<uint32_t>(from_float(tag, hi)) << 16);
}
inline uint32_t pack2(BF16 tag, float lo, float hi) {
  return static_cast<uint32_t>(from_float(tag, lo)) | (static_cast<uint32_t>(from_float(tag, hi)) << 16);
}

namespace host_model_detail {
template <int N>
inline void ldmatrix(::xk_sim::detail::Op op, uint32_t (&r)[N], const void* row, const char* file, int line) {
  ::xk_sim::detail::Lane& lane = ::xk_sim::detail::me();
  lane.address = row;
  lane.regs_out = r;
  ::xk_sim::detail::arrive_warp(op, file, line);
}
inline void mma(::xk_sim::detail::Op op, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                const float (&c)[4], const char* file, int line) {
  ::xk_sim::detail::Lane& lane = ::xk_sim::detail::me();
  lane.a = a;
  lane.b = b;
  lane.c = c;
  lane.d = d;
  ::xk_sim::detail::arrive_warp(op, file, line);
}
}  // namespace host_model_detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  host_model_detail::ldmatrix(::xk_sim::detail::Op::LdmatrixX4, r, row, file, line);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  host_model_detail::ldmatrix(::xk_sim::detail::Op::LdmatrixX4Trans, r, row, file, line);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  host_model_detail::ldmatrix(::xk_sim::detail::Op::LdmatrixX2, r, row, file, line);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  host_model_detail::ldmatrix(::xk_sim::detail::Op::LdmatrixX2Trans, r, row, file, line);
}

inline void mma_m16n8k16(F16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  host_model_detail::mma(::xk_sim::detail::Op::MmaF16, d, a, b, c, file, line);
}
inline void mma_m16n8k16(BF16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  host_model_detail::mma(::xk_sim::detail::Op::MmaBF16, d, a, b, c, file, line);
}

inline void cp_async_16(void* shared_dst, const void* global_src, bool full, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::xk_sim::detail::cp_async_16(shared_dst, global_src, full, file, line);
}
inline void cp_async_commit() { ::xk_sim::detail::cp_async_commit(); }
template <int Pending>
inline void cp_async_wait() {
  static_assert(Pending >= 0, "cp_async_wait: the number of groups left in flight is not negative");
  ::xk_sim::detail::cp_async_wait(Pending);
}

inline float shfl_xor(float v, int lane_mask, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::xk_sim::detail::Lane& lane = ::xk_sim::detail::me();
  lane.shfl_value = v;
  lane.shfl_mask = lane_mask;
  ::xk_sim::detail::arrive_warp(::xk_sim::detail::Op::ShflXor, file, line);
  return lane.shfl_result;
}
inline void sync_warp(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::xk_sim::detail::arrive_warp(::xk_sim::detail::Op::SyncWarp, file, line);
}
inline void sync_block(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::xk_sim::detail::sync_block(file, line);
}

#endif  // XK_HOST_MODEL

}  // namespace xclip_ext::warp_mma
