// Instantiates the tile kernels (ifa_tiles.inc, linear_tiles.inc) for AVX2 and AVX-512 and
// picks one at run time.
//
// The AVX-512 copy is compiled under `#pragma GCC target` rather than a -mavx512f flag so that
// one translation unit, built with the project's AVX2 flags, holds both: nothing outside the
// pragma (torch's inline functions included) is ever compiled for AVX-512, so the library
// still loads and runs on AVX2-only CPUs.
#include "simd_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
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
}  // namespace tiles_avx512
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t kSkinnyMaxRows = 64;

bool use_avx512() {
#ifdef XCLIP_HAVE_AVX512_TILES
  const char* forced = std::getenv("XCLIP_KERNELS_CPU_ISA");
  if (forced != nullptr && std::string(forced) == "avx2") return false;
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
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

bool fused_forward_supports(int64_t dim) { return dim % tiles_avx2::kPanel == 0; }

void fused_forward(const FusedForward& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  // A head dim that is a multiple of 16 but not of 32 (e.g. 80) takes the AVX2 tiles.
  if (use_avx512() && problem.dim % tiles_avx512::kPanel == 0)
    return run_parallel(problem, tiles_avx512::forward_tasks, tiles_avx512::forward_scratch_floats);
#endif
  run_parallel(problem, tiles_avx2::forward_tasks, tiles_avx2::forward_scratch_floats);
}

void fused_backward(const FusedBackward& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512() && problem.dim % tiles_avx512::kPanel == 0)
    return run_parallel(problem, tiles_avx512::backward_tasks, tiles_avx512::backward_scratch_floats);
#endif
  run_parallel(problem, tiles_avx2::backward_tasks, tiles_avx2::backward_scratch_floats);
}

bool skinny_linear_supports(int64_t rows, int64_t inner) {
  // The tiles are for the message path's b*T rows; from a few dozen rows on, BLAS's packing of
  // the weight pays for itself (a chosen bound, not a measured crossover).
  return rows <= kSkinnyMaxRows && inner % tiles_avx2::kWidth == 0;
}

// Parallel over groups of `cols` weight rows, so every worker runs full tiles.
template <typename Tasks>
void run_linear(const SkinnyLinear& problem, int64_t cols, Tasks tasks) {
  const int64_t groups = (problem.outputs + cols - 1) / cols;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    tasks(problem, begin * cols, std::min(end * cols, problem.outputs));
  });
}

// The outer-product form when the rows fill whole vectors and it is built for the width (x
// packed transposed once by the calling thread, read by every worker), else the dot form.
template <typename OuterTasks, typename Pack, typename DotTasks>
void run_linear_forms(const SkinnyLinear& problem, int64_t width, OuterTasks outer, int64_t outer_cols, Pack pack,
                      int64_t transposed_floats, DotTasks dot, int64_t dot_cols) {
  if (outer == nullptr || problem.rows % width != 0) return run_linear(problem, dot_cols, dot);
  thread_local std::vector<float> transposed;
  if (transposed.size() < static_cast<size_t>(transposed_floats)) transposed.resize(transposed_floats);
  pack(problem, transposed.data());
  const float* xt = transposed.data();
  run_linear(problem, outer_cols,
             [xt, outer](const SkinnyLinear& p, int64_t begin, int64_t end) { outer(p, xt, begin, end); });
}

void skinny_linear(const SkinnyLinear& problem) {
#ifdef XCLIP_HAVE_AVX512_TILES
  if (use_avx512() && problem.inner % tiles_avx512::kWidth == 0) {
    namespace t = tiles_avx512;
    return run_linear_forms(problem, t::kWidth, t::outer_tasks_for(problem.inner), t::kOuterCols,
                            t::pack_x_transposed, t::transposed_x_floats(problem), t::linear_tasks, t::kLinearCols);
  }
#endif
  namespace t = tiles_avx2;
  run_linear_forms(problem, t::kWidth, t::outer_tasks_for(problem.inner), t::kOuterCols, t::pack_x_transposed,
                   t::transposed_x_floats(problem), t::linear_tasks, t::kLinearCols);
}

}  // namespace xclip_ext
