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

}  // namespace

extern "C" {

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

}  // extern "C"
