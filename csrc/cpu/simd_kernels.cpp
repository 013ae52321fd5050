// Instantiates the tile kernels (ifa_tiles.inc, linear_tiles.inc, and bf16_tiles.inc for
// bfloat16) for AVX2 and AVX-512 and picks one at run time; the opt-in native bf16 forward
// (ifa_tiles_bf16.inc) is a third instantiation, for AVX512_BF16.
//
// The AVX-512 copy is compiled under `#pragma GCC target` rather than a -mavx512f flag so that
// one translation unit, built with the project's AVX2 flags, holds both: nothing outside the
// pragma (torch's inline functions included) is ever compiled for AVX-512, so the library
// still loads and runs on AVX2-only CPUs.
//
// An x86-64 source: the build compiles it, with XCLIP_CPU_TILES defined, only for that target.
#include "simd_kernels.h"

#include "bf16_tiles.h"

#ifndef XCLIP_CPU_TILES
#error "simd_kernels.cpp is built only together with XCLIP_CPU_TILES (the headers then declare its functions)"
#endif

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace xclip_ext {

namespace tiles_avx2 {
constexpr int kWidth = 8;
constexpr int kTileRows = 6;    // 12 accumulators + 2 key vectors + 1 broadcast of 16 registers
constexpr int kLinearRows = 2;  // 8 accumulators + 4 weight vectors + 1 x vector
constexpr int kLinearCols = 4;
#include "simd_vec.inc"
#include "ifa_tiles.inc"
#include "linear_tiles.inc"
#include "bf16_tiles.inc"
}  // namespace tiles_avx2

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define XCLIP_HAVE_AVX512_TILES 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace tiles_avx512 {
constexpr int kWidth = 16;
constexpr int kTileRows = 12;   // 24 accumulators + 2 key vectors + 1 broadcast of 32 registers
constexpr int kLinearRows = 4;  // 24 accumulators + 6 weight vectors + 1 x vector
constexpr int kLinearCols = 6;
#include "simd_vec.inc"
#include "ifa_tiles.inc"
#include "linear_tiles.inc"
#include "bf16_tiles.inc"
}  // namespace tiles_avx512
#pragma GCC pop_options

// The native bf16 forward on vdpbf16ps, in a namespace of its own so that nothing else is
// compiled for AVX512_BF16 (it runs only where CPUID has it). It builds on the AVX-512 tiles'
// vectors and helpers: their target is a subset of this one, so they inline here.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")
namespace tiles_avx512_bf16 {
using namespace tiles_avx512;
#include "ifa_tiles_bf16.inc"
}  // namespace tiles_avx512_bf16
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t kSkinnyMaxRows = 64;

// Set from Python (set_cpu_isa, once at load time from the environment, and by tests); read
// once per call. Relaxed order: nothing else is published through it.
std::atomic<bool> tiles_limited_to_avx2{false};
std::atomic<bool> native_bf16_allowed{false};

bool use_avx512() {
#ifdef XCLIP_HAVE_AVX512_TILES
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return has && !tiles_limited_to_avx2.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

bool has_native_bf16() {
#ifdef XCLIP_HAVE_AVX512_TILES
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

bool use_native_bf16() {
  return has_native_bf16() && use_avx512() && native_bf16_allowed.load(std::memory_order_relaxed);
}

template <typename Problem, typename Tasks, typename Scratch>
void run_parallel(const Problem& problem, Tasks tasks, Scratch scratch_floats) {
  at::parallel_for(0, problem.frames * problem.heads, 1, [&](int64_t begin, int64_t end) {
    // Kept per thread between calls: a fresh buffer of this size comes from mmap, and its page
    // faults cost a measurable share of a call. 64 floats of slack align the start.
    thread_local std::vector<float> scratch;
    const size_t needed = static_cast<size_t>(scratch_floats(problem)) + 64;
    if (scratch.size() < needed) scratch.resize(needed);
    const auto address = reinterpret_cast<uintptr_t>(scratch.data());
    float* aligned = scratch.data() + ((64 - address % 64) % 64) / sizeof(float);
    tasks(problem, begin, end, aligned);
  });
}

}  // namespace

void limit_tiles_to_avx2(bool limit) { tiles_limited_to_avx2.store(limit, std::memory_order_relaxed); }

const char* tile_isa() { return use_avx512() ? "avx512" : "avx2"; }

bool fused_forward_supports(int64_t dim) { return dim % tiles_avx2::kPanel == 0; }

void fused_forward(const FusedForward& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  // A head dim that is a multiple of 16 but not of 32 (e.g. 80) takes the AVX2 tiles.
  if (use_avx512() && problem.dim % tiles_avx512::kPanel == 0)
    return run_parallel(problem, tiles_avx512::forward_tasks<FusedForward>,
                        tiles_avx512::forward_scratch_floats<FusedForward>);
#endif
  run_parallel(problem, tiles_avx2::forward_tasks<FusedForward>, tiles_avx2::forward_scratch_floats<FusedForward>);
}

void fused_backward(const FusedBackward& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512() && problem.dim % tiles_avx512::kPanel == 0)
    return run_parallel(problem, tiles_avx512::backward_tasks<FusedBackward>,
                        tiles_avx512::backward_scratch_floats<FusedBackward>);
#endif
  run_parallel(problem, tiles_avx2::backward_tasks<FusedBackward>, tiles_avx2::backward_scratch_floats<FusedBackward>);
}

bool bf16_tiles_support(int64_t dim) { return fused_forward_supports(dim); }

void allow_native_bf16(bool allow) { native_bf16_allowed.store(allow, std::memory_order_relaxed); }

bool bf16_native() { return use_native_bf16(); }

bool cpu_has_native_bf16() { return has_native_bf16(); }

void bf16_forward(const Bf16Forward& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  // As in float32, a head dim that is a multiple of 16 but not of 32 takes the AVX2 tiles.
  if (problem.dim % tiles_avx512::kPanel == 0) {
    if (use_native_bf16())
      return run_parallel(problem, tiles_avx512_bf16::forward_tasks_native,
                          tiles_avx512_bf16::forward_native_scratch_floats);
    if (use_avx512())
      return run_parallel(problem, tiles_avx512::forward_tasks_bf16, tiles_avx512::forward_bf16_scratch_floats);
  }
#endif
  run_parallel(problem, tiles_avx2::forward_tasks_bf16, tiles_avx2::forward_bf16_scratch_floats);
}

void bf16_backward(const Bf16Backward& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512() && problem.dim % tiles_avx512::kPanel == 0)
    return run_parallel(problem, tiles_avx512::backward_tasks_bf16, tiles_avx512::backward_bf16_scratch_floats);
#endif
  run_parallel(problem, tiles_avx2::backward_tasks_bf16, tiles_avx2::backward_bf16_scratch_floats);
}

bool skinny_linear_supports(int64_t rows, int64_t inner) {
  // The tiles are for the message path's b*T rows; from a few dozen rows on, BLAS's packing of
  // the weight pays for itself (a chosen bound, not a measured crossover).
  return rows <= kSkinnyMaxRows && inner % tiles_avx2::kWidth == 0;
}

// x (rows, inner) packed transposed by `pack` into a per-thread buffer kept between calls
// (read by every worker of the parallel region that follows).
template <typename Pack>
const float* packed_transposed(const float* x, int64_t rows, int64_t inner, Pack pack, int64_t floats) {
  thread_local std::vector<float> transposed;
  if (transposed.size() < static_cast<size_t>(floats)) transposed.resize(floats);
  pack(x, rows, inner, transposed.data());
  return transposed.data();
}

// Parallel over groups of `cols` weight rows, so every worker runs full tiles.
template <typename P, typename Tasks>
void run_linear(const P& problem, int64_t cols, Tasks tasks) {
  const int64_t groups = (problem.outputs + cols - 1) / cols;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    tasks(problem, begin * cols, std::min(end * cols, problem.outputs));
  });
}

// The outer-product form when the rows fill whole vectors and it is built for the width (x
// packed transposed once by the calling thread, read by every worker), else the dot form.
template <typename P, typename OuterTasks, typename Pack, typename DotTasks>
void run_linear_forms(const P& problem, int64_t width, OuterTasks outer, int64_t outer_cols, Pack pack,
                      int64_t transposed_floats, DotTasks dot, int64_t dot_cols) {
  if (outer == nullptr || problem.rows % width != 0) return run_linear(problem, dot_cols, dot);
  const float* xt = packed_transposed(problem.x, problem.rows, problem.inner, pack, transposed_floats);
  run_linear(problem, outer_cols,
             [xt, outer](const P& p, int64_t begin, int64_t end) { outer(p, xt, begin, end); });
}

// Either weight type: the same tiles, instantiated for it.
template <typename P>
void skinny_linear_of(const P& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512() && problem.inner % tiles_avx512::kWidth == 0) {
    namespace t = tiles_avx512;
    return run_linear_forms(problem, t::kWidth, t::outer_tasks_for<P>(problem.inner), t::kOuterCols,
                            t::pack_x_transposed, t::transposed_x_floats(problem.rows, problem.inner),
                            t::linear_tasks<P>, t::kLinearCols);
  }
#endif
  namespace t = tiles_avx2;
  run_linear_forms(problem, t::kWidth, t::outer_tasks_for<P>(problem.inner), t::kOuterCols, t::pack_x_transposed,
                   t::transposed_x_floats(problem.rows, problem.inner), t::linear_tasks<P>, t::kLinearCols);
}

void skinny_linear(const SkinnyLinear& problem) { skinny_linear_of(problem); }

void skinny_linear(const SkinnyLinearBf16& problem) { skinny_linear_of(problem); }

bool skinny_linear_grad_supports(int64_t rows, int64_t columns) {
  return rows <= kSkinnyMaxRows && columns % 16 == 0;  // whole vectors on either instruction set
}

namespace {

template <typename P, typename Tasks>
void run_weight_grad(const P& problem, int64_t row_tile, Tasks tasks) {
  const int64_t groups = (problem.a_cols + row_tile - 1) / row_tile;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    tasks(problem, begin * row_tile, std::min(end * row_tile, problem.a_cols));
  });
}

template <typename P, typename Pack, typename Tasks>
void run_input_grad(const P& problem, int64_t width, Pack pack, int64_t transposed_floats, Tasks tasks) {
  const float* xt = packed_transposed(problem.x, problem.rows, problem.inner, pack, transposed_floats);
  at::parallel_for(0, problem.outputs / width, 1, [&](int64_t begin, int64_t end) {
    tasks(problem, xt, begin * width, end * width);
  });
}

}  // namespace

namespace {

template <typename P>
void skinny_weight_grad_of(const P& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512()) return run_weight_grad(problem, tiles_avx512::kGradRowTile, tiles_avx512::weight_grad_tasks<P>);
#endif
  run_weight_grad(problem, tiles_avx2::kGradRowTile, tiles_avx2::weight_grad_tasks<P>);
}

}  // namespace

void skinny_weight_grad(const SkinnyWeightGrad& problem) { skinny_weight_grad_of(problem); }

void skinny_weight_grad(const SkinnyWeightGradBf16& problem) { skinny_weight_grad_of(problem); }

namespace {

template <typename P>
void skinny_input_grad_of(const P& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512()) {
    namespace t = tiles_avx512;
    return run_input_grad(problem, t::kWidth, t::pack_x_transposed, t::transposed_x_floats(problem.rows, problem.inner),
                          t::input_grad_tasks<P>);
  }
#endif
  namespace t = tiles_avx2;
  run_input_grad(problem, t::kWidth, t::pack_x_transposed, t::transposed_x_floats(problem.rows, problem.inner),
                 t::input_grad_tasks<P>);
}

}  // namespace

void skinny_input_grad(const SkinnyInputGrad& problem) { skinny_input_grad_of(problem); }

void skinny_input_grad(const SkinnyInputGradBf16& problem) { skinny_input_grad_of(problem); }

}  // namespace xclip_ext
