// Host-model entry of the IFA tensor-core backward (ifa_mma_backward.cuh): runs the dK/dV and dQ
// kernels on the CPU SIMT model with the grid, block and shared-memory sizes the CUDA launcher
// (frame_attention_backward_cuda) uses, from the same BwdTiles struct, and the same choice of
// staging path (vec_staging_ok). tests/xclip_kernels/test_cuda_mma_backward_model.py drives it.
#include <string>

#include "ifa_mma_backward.cuh"

namespace {

using namespace xclip_ext::ifa_mma_backward;

// One past the last element a (F, N, H, D) operand with these strides reaches.
std::size_t extent_rows(int64_t f, int64_t n, int64_t h, int64_t d, const int64_t* s) {
  return static_cast<std::size_t>((f - 1) * s[0] + (n - 1) * s[1] + (h - 1) * s[2] + d);
}

// cp_async_16 may read only the operands it stages (registered again before every launch: the
// model clears the list when a launch ends).
void register_inputs(const BwdParams& p, int f) {
  const int64_t rows_strides[4][3] = {{p.q.sf, p.q.sn, p.q.sh},
                                      {p.k.sf, p.k.sn, p.k.sh},
                                      {p.v.sf, p.v.sn, p.v.sh},
                                      {p.dout.sf, p.dout.sn, p.dout.sh}};
  const uint16_t* rows_ptrs[4] = {p.q.ptr, p.k.ptr, p.v.ptr, p.dout.ptr};
  for (int i = 0; i < 4; ++i)
    xk_sim::register_global(rows_ptrs[i], 2 * extent_rows(f, p.n, p.h, p.d, rows_strides[i]));
}

template <class Tag, int DP>
void run(const BwdParams& params, int f) {
  using T = BwdTiles<DP>;
  BwdParams p = params;
  p.q_tiles = T::dq_tiles(p.n);
  const unsigned fh = static_cast<unsigned>(f) * static_cast<unsigned>(p.h);
  register_inputs(p, f);
  xk_sim::launch(dim3(fh, static_cast<unsigned>(T::dkdv_tiles(p.n))), dim3(kThreads), T::Dkdv::total,
                 ifa_mma_bwd_dkdv_kernel<Tag, DP>, p);
  register_inputs(p, f);
  xk_sim::launch(dim3(fh, static_cast<unsigned>(p.q_tiles)), dim3(kThreads), T::Dq::total,
                 ifa_mma_bwd_dq_kernel<Tag, DP>, p);
}

// The launcher's head-dim padding (cuda_common::dispatch_head_dim): DP in {32, 64, 96, 128}.
template <class Tag>
void dispatch(const BwdParams& p, int f) {
  if (p.d <= 32) run<Tag, 32>(p, f);
  else if (p.d <= 64) run<Tag, 64>(p, f);
  else if (p.d <= 96) run<Tag, 96>(p, f);
  else run<Tag, 128>(p, f);
}

int tiles_for(int n) { return BwdTiles<32>::dq_tiles(n); }

template <int DP>
void layout(int32_t* out) {
  using T = BwdTiles<DP>;
  const int32_t values[6] = {T::dkdv_queries, T::dkdv_keys, T::Dkdv::total, T::dq_queries, T::dq_keys, T::Dq::total};
  for (int i = 0; i < 6; ++i) out[i] = values[i];
}

}  // namespace

extern "C" {

// The number of query tiles of the dQ kernel for N tokens: the partials' third dimension. The
// query tile does not depend on DP (static_assert below), so N alone decides it.
int xk_ifa_backward_q_tiles(int n) {
  static_assert(BwdTiles<32>::dq_queries == BwdTiles<64>::dq_queries &&
                    BwdTiles<64>::dq_queries == BwdTiles<96>::dq_queries &&
                    BwdTiles<96>::dq_queries == BwdTiles<128>::dq_queries,
                "the dQ query tile is the same for every DP");
  return tiles_for(n);
}

// The tiles and dynamic shared memory (bytes) the launcher uses at head-dim padding dp (32, 64,
// 96 or 128): out = (dK/dV query tile, dK/dV key tile, dK/dV shared bytes, dQ query tile, dQ key
// tile, dQ shared bytes), for mirrors such as scripts/gpu_static.py to be checked against.
int xk_ifa_backward_layout(int dp, int32_t* out) {
  return xk_sim::run_entry([&] {
    switch (dp) {
      case 32: layout<32>(out); break;
      case 64: layout<64>(out); break;
      case 96: layout<96>(out); break;
      case 128: layout<128>(out); break;
      default: throw xk_sim::Error("dp must be 32, 64, 96 or 128, got " + std::to_string(dp));
    }
  });
}

// Whether the launcher would stage with cp.async (1) or plain loads (0) for these operands:
// rows_strides holds (sf, sn, sh) of q, k, v, dO in elements.
int xk_ifa_backward_vec_staging(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* dout,
                                const int64_t* rows_strides, int d) {
  const uint16_t* ptrs[4] = {q, k, v, dout};
  bool ok = true;
  for (int i = 0; i < 4; ++i) {
    const int64_t* s = rows_strides + 3 * i;
    ok = ok && vec_staging_ok(Rows16{ptrs[i], s[0], s[1], s[2]}, d);
  }
  return ok ? 1 : 0;
}

// The backward of frame attention for one (F, N, H, D) problem in fp16 (bf16 == 0) or bf16:
//   q, k, v, dout: 16-bit bits, (F, N, H, D) with strides rows_strides[3 i .. 3 i + 2] (sf, sn,
//                  sh; elements; last dim contiguous);
//   msg_k, msg_v:  (F, H, D) with strides vecs_strides[2 i .. 2 i + 1] (sf, sh);
//   lse, delta:    float32 (F, H, N) contiguous;
// writes dq, dk, dv ((F, N, H, D) contiguous 16-bit) and dmk_part, dmv_part (float32 (F, H,
// xk_ifa_backward_q_tiles(N), D) contiguous: per query tile, scale * sum dS_msg q and sum p dO).
int xk_ifa_backward(int bf16, int f, int n, int h, int d, double scale, const uint16_t* q, const uint16_t* k,
                    const uint16_t* v, const uint16_t* dout, const int64_t* rows_strides, const uint16_t* msg_k,
                    const uint16_t* msg_v, const int64_t* vecs_strides, const float* lse, const float* delta,
                    uint16_t* dq, uint16_t* dk, uint16_t* dv, float* dmk_part, float* dmv_part) {
  return xk_sim::run_entry([&] {
    if (f < 1 || n < 1 || h < 1)
      throw xk_sim::Error("F, N and H must be positive, got " + std::to_string(f) + ", " + std::to_string(n) + ", " +
                          std::to_string(h));
    if (d < 1 || d > 128) throw xk_sim::Error("D must be in [1, 128], got " + std::to_string(d));
    const int64_t* s = rows_strides;
    BwdParams p{};
    p.q = Rows16{q, s[0], s[1], s[2]};
    p.k = Rows16{k, s[3], s[4], s[5]};
    p.v = Rows16{v, s[6], s[7], s[8]};
    p.dout = Rows16{dout, s[9], s[10], s[11]};
    p.msg_k = Vecs16{msg_k, vecs_strides[0], vecs_strides[1]};
    p.msg_v = Vecs16{msg_v, vecs_strides[2], vecs_strides[3]};
    p.lse = lse;
    p.delta = delta;
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.dmk_part = dmk_part;
    p.dmv_part = dmv_part;
    p.n = n;
    p.h = h;
    p.d = d;
    // As the launcher: the scale in double, then rounded once to the kernel's fp32.
    p.scale = static_cast<float>(scale);
    p.scale_log2e = static_cast<float>(scale * 1.4426950408889634);
    p.vec = xk_ifa_backward_vec_staging(q, k, v, dout, rows_strides, d) != 0;
    if (bf16) dispatch<BF16>(p, f);
    else dispatch<F16>(p, f);
  });
}

}  // extern "C"
