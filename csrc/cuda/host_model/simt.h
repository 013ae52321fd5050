// The host model: a CPU SIMT scheduler on which the CUDA kernels written on warp_mma.cuh run
// unchanged, compiled by plain g++ with XK_HOST_MODEL defined (tests/xclip_kernels/
// cuda_host_model.py builds it; it is never part of the extension). docs/cuda.md says what it
// covers and what only a GPU can show.
//
// Every emulated CUDA thread is a fiber with its own stack (on x86-64 a hand-written switch of the
// callee-saved registers: ucontext's makes a system call per switch for the signal mask; ucontext
// elsewhere or with -DXK_SIM_UCONTEXT, e.g. under a sanitizer). The blocks of a launch run
// one after another; inside a block the scheduler resumes the runnable threads round-robin in
// linear thread order (deterministic), each until it reaches a collective:
//   - warp collectives (ldmatrix, mma, shfl_xor, sync_warp) are a rendezvous of the warp's 32
//     lanes: when the last lane arrives, the instruction's result is computed from all lanes'
//     inputs per the PTX fragment layouts (warp_mma.cuh's header) and the lanes resume;
//   - sync_block is a rendezvous of every thread of the block.
// A launch throws xk_sim::Error (the entry point turns it into a return code and a message,
// xk_sim::run_entry / xk_last_error) when the kernel breaks the rules a GPU would punish with a
// hang, garbage or a fault:
//   - lanes of a warp wait at different collectives, or some exited / wait at sync_block while
//     others wait at a warp collective, or a thread exited while others wait at sync_block;
//   - ldmatrix / cp_async_16 addresses not 16-byte aligned or outside the block's dynamic shared
//     memory; a cp_async_16 source outside the ranges given to xk_sim::register_global (when any);
//   - ldmatrix reading 16 bytes that a cp_async_16 still has in flight (not yet covered by the
//     issuing thread's cp_async_wait), or that another thread's copy landed with no sync_block
//     (sync_warp, within the issuer's warp) between that thread's wait and the read: with the
//     barrier counts as clocks this does not depend on the order the scheduler runs the warps;
//   - cp_async_16 into 16 bytes that another warp's ldmatrix read since the last sync_block (a
//     write-after-read race: on the device the copy may land before the read). With the check
//     above, a copy and another warp's read of the same chunk in one barrier epoch are an error
//     in whichever order the scheduler runs them.
// cp.async is modelled so that an early plain read shows too: the source is read at issue, the
// destination reads as 0xFF bytes (NaN in fp16 and bf16) until the issuing thread's
// cp_async_wait covers the copy's group, and only then the 16 bytes land. Dynamic shared memory
// starts every block as 0xFF bytes as well (a GPU's is uninitialised).
//
// State is thread_local: one launch at a time per OS thread, and separate OS threads (or pytest
// processes) do not share anything.
#pragma once

#if !defined(XK_HOST_MODEL)
#error "host_model/simt.h is the CPU model of the CUDA building blocks: compile with -DXK_HOST_MODEL"
#endif

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// ---- CUDA's language extensions, as far as the kernels use them --------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates (read through the scheduler's current fiber).
#define threadIdx (::xk_sim::detail::current_thread_idx())
#define blockIdx (::xk_sim::detail::current_block_idx())
#define blockDim (::xk_sim::detail::current_block_dim())
#define gridDim (::xk_sim::detail::current_grid_dim())

// The block's dynamic shared memory; declare it inside the kernel body (as on the device side).
#define XK_EXTERN_SHARED(name) unsigned char* const name = ::xk_sim::detail::dynamic_shared()

// ---- fiber context switch -----------------------------------------------------------------------

#if defined(__x86_64__) && !defined(XK_SIM_UCONTEXT)
#define XK_SIM_FAST_SWITCH 1
// xk_sim_switch(&save_sp, load_sp): pushes the System V callee-saved registers and the SSE/x87
// control words on the current stack, stores the stack pointer in *save_sp, continues on load_sp
// (a stack left by an earlier switch, or one make_context prepared). Weak in a COMDAT section:
// several translation units of one library may include this header.
extern "C" void xk_sim_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text.xk_sim_switch,"axG",@progbits,xk_sim_switch,comdat
  .weak xk_sim_switch
  .hidden xk_sim_switch
  .type xk_sim_switch, @function
xk_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size xk_sim_switch, .-xk_sim_switch
  .popsection
)");
#else
#define XK_SIM_FAST_SWITCH 0
#endif

namespace xk_sim {

// What the model throws on a kernel bug or a bad launch.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// sm_80's largest dynamic shared memory per block (163 KB, with the opt-in attribute): the
// kernels must fit the smallest architecture they are built for.
constexpr std::size_t kMaxDynamicSharedBytes = 166912;
// Each fiber's stack; kernels keep their fragment arrays on it.
constexpr std::size_t kFiberStackBytes = 256 * 1024;

namespace detail {

struct Context {
#if XK_SIM_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void switch_context(Context& from, Context& to) {
#if XK_SIM_FAST_SWITCH
  xk_sim_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Prepares `c` to start `entry` (which must never return) on [stack, stack + bytes).
inline void make_context(Context& c, void* stack, std::size_t bytes, void (*entry)()) {
#if XK_SIM_FAST_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~static_cast<uintptr_t>(15);
  uint64_t* p = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  // What xk_sim_switch pops, bottom up: control words, r15, r14, r13, r12, rbx, rbp, then `ret`
  // into entry with rsp = top - 8 (a call's alignment: 16 n + 8) over a null return address.
  p[-1] = 0;
  p[-2] = reinterpret_cast<uint64_t>(entry);
  for (int i = 3; i <= 8; ++i) p[-i] = 0;
  p[-9] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  c.sp = &p[-9];
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

enum class State : uint8_t { Runnable, AtWarp, AtBlock, Done };
enum class Op : uint8_t { LdmatrixX4, LdmatrixX4Trans, LdmatrixX2, LdmatrixX2Trans, MmaF16, MmaBF16, ShflXor, SyncWarp };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::LdmatrixX4: return "ldmatrix_x4";
    case Op::LdmatrixX4Trans: return "ldmatrix_x4_trans";
    case Op::LdmatrixX2: return "ldmatrix_x2";
    case Op::LdmatrixX2Trans: return "ldmatrix_x2_trans";
    case Op::MmaF16: return "mma_m16n8k16(F16)";
    case Op::MmaBF16: return "mma_m16n8k16(BF16)";
    case Op::ShflXor: return "shfl_xor";
    case Op::SyncWarp: return "sync_warp";
  }
  return "?";
}

// ldmatrix and mma are .sync.aligned on the device: every lane must execute the same instruction
// (the same call site here); shfl.sync and bar.warp.sync only need all lanes to take part.
inline bool op_is_aligned(Op op) { return op != Op::ShflXor && op != Op::SyncWarp; }

// A cp_async_16 in flight: the 16 source bytes read at issue, landing at `dst` at the wait that
// covers `group` (-1: not committed yet).
struct PendingCopy {
  unsigned char* dst;
  unsigned char bytes[16];
  long group;
  const char* file;  // the cp_async_16 call site, for race messages
  int line;
};

// An ldmatrix read of a chunk, for a race message: the thread whose row address it was (its warp
// is the reader: ldmatrix is a warp-wide instruction) and the instruction.
struct Read {
  uint32_t thread = 0;
  Op op = Op::LdmatrixX4;
  const char* file = "";
  int line = 0;
};

// Race bookkeeping per 16-byte chunk of shared memory. cp.async: copies in flight into it, and
// who landed the last one when (to require a barrier between that thread's wait and another's
// read). ldmatrix: the reads in barrier epoch read_epoch (the block's epoch when they happened):
// the first, and the latest from a warp other than the first's; together they name a reader of
// any warp other than a given one, in O(1) per access (the write-after-read check).
struct Chunk {
  uint32_t pending = 0;
  uint32_t issuer = 0;
  bool landed = false;
  long landed_block_epoch = 0;
  long landed_warp_epoch = 0;
  const char* issue_file = "";
  int issue_line = 0;
  long read_epoch = -1;
  bool other_warp_read = false;
  Read first_read, other_read;
};

struct Lane {
  Context context;
  void* stack = nullptr;
  uint3 thread_idx{0, 0, 0};
  unsigned linear = 0;
  State state = State::Runnable;
  // The collective this lane waits at, with its operands (pointers into the waiting fiber's
  // stack, alive while it waits).
  Op op = Op::SyncWarp;
  const char* file = "";
  int line = 0;
  const void* address = nullptr;
  uint32_t* regs_out = nullptr;
  const uint32_t* a = nullptr;
  const uint32_t* b = nullptr;
  const float* c = nullptr;
  float* d = nullptr;
  float shfl_value = 0.0f;
  int shfl_mask = 0;
  float shfl_result = 0.0f;
  // cp.async bookkeeping.
  std::vector<PendingCopy> pending;
  long committed_groups = 0;
};

struct StackPool {
  std::vector<void*> free;
  ~StackPool() {
    for (void* s : free) munmap(static_cast<unsigned char*>(s) - guard_bytes(), kFiberStackBytes + guard_bytes());
  }
  static std::size_t guard_bytes() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  // A stack with an inaccessible page below it, so an overflow faults instead of corrupting.
  void* take() {
    if (!free.empty()) {
      void* s = free.back();
      free.pop_back();
      return s;
    }
    std::size_t guard = guard_bytes();
    void* base = mmap(nullptr, kFiberStackBytes + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw Error("host model: cannot map a fiber stack");
    mprotect(base, guard, PROT_NONE);
    return static_cast<unsigned char*>(base) + guard;
  }
  void give(void* s) { free.push_back(s); }
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  std::size_t shared_bytes = 0;
  unsigned char* shared = nullptr;
  std::vector<Chunk> chunks;  // per 16 bytes of shared memory
  // Completed sync_block rendezvous of the block, and sync_warp ones per warp: the clocks that
  // order a landed cp.async before another thread's read.
  long block_epoch = 0;
  std::vector<long> warp_epochs;
  // Threads not runnable (waiting or exited), per warp and in the block: a rendezvous is looked
  // at only once all of its threads have stopped.
  std::vector<unsigned> warp_stopped;
  unsigned block_stopped = 0;
  std::vector<Lane> lanes;
  unsigned current = 0;
  Context scheduler;
  std::function<void()> body;
  std::string error;
  std::vector<std::pair<uintptr_t, std::size_t>> globals;
};

inline thread_local Launch* t_launch = nullptr;
inline thread_local StackPool t_stacks;
inline thread_local std::vector<std::pair<uintptr_t, std::size_t>> t_globals;
inline thread_local std::string t_last_error;

inline Launch& launch_state() {
  if (t_launch == nullptr) throw Error("host model: a device function was called outside xk_sim::launch");
  return *t_launch;
}
inline Lane& me() {
  Launch& l = launch_state();
  return l.lanes[l.current];
}

inline const uint3& current_thread_idx() { return me().thread_idx; }
inline const uint3& current_block_idx() { return launch_state().block_idx; }
inline const dim3& current_block_dim() { return launch_state().block; }
inline const dim3& current_grid_dim() { return launch_state().grid; }
inline unsigned char* dynamic_shared() { return launch_state().shared; }

inline std::string where(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

inline std::string lane_list(const std::vector<unsigned>& lanes) {
  // "0-15, 17" for readable messages.
  std::string out;
  for (std::size_t i = 0; i < lanes.size();) {
    std::size_t j = i;
    while (j + 1 < lanes.size() && lanes[j + 1] == lanes[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(lanes[i]);
    if (j > i) out += "-" + std::to_string(lanes[j]);
    i = j + 1;
  }
  return out;
}

inline std::string block_name(const Launch& l) {
  return "block (" + std::to_string(l.block_idx.x) + ", " + std::to_string(l.block_idx.y) + ", " +
         std::to_string(l.block_idx.z) + ")";
}

// Hands control back to the scheduler until it resumes this fiber.
inline void park(Lane& lane) {
  Launch& l = launch_state();
  switch_context(lane.context, l.scheduler);
}

// ---- cp.async --------------------------------------------------------------------------------

inline std::size_t shared_offset(const Launch& l, const void* p, std::size_t bytes, bool* inside) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(l.shared);
  *inside = a >= base && a + bytes <= base + l.shared_bytes && a + bytes >= a;
  return a - base;
}

inline void land(Launch& l, const PendingCopy& copy, const Lane& issuer) {
  std::memcpy(copy.dst, copy.bytes, 16);
  Chunk& chunk = l.chunks[static_cast<std::size_t>(copy.dst - l.shared) / 16];
  --chunk.pending;
  chunk.issuer = issuer.linear;
  chunk.issue_file = copy.file;
  chunk.issue_line = copy.line;
  chunk.landed = true;
  chunk.landed_block_epoch = l.block_epoch;
  chunk.landed_warp_epoch = l.warp_epochs[issuer.linear / 32];
}

inline void cp_async_16(const void* dst_shared, const void* src_global, bool full, const char* file, int line) {
  Launch& l = launch_state();
  Lane& lane = me();
  bool inside = false;
  std::size_t offset = shared_offset(l, dst_shared, 16, &inside);
  if (reinterpret_cast<uintptr_t>(dst_shared) % 16 != 0 || !inside)
    throw Error("cp_async_16 at " + where(file, line) + ": shared destination " +
                (inside ? "offset " + std::to_string(offset) + " is not 16-byte aligned"
                        : "is outside the block's " + std::to_string(l.shared_bytes) + " bytes of dynamic shared memory"));
  // The device faults on a misaligned source even when it reads nothing (full == false).
  if (reinterpret_cast<uintptr_t>(src_global) % 16 != 0)
    throw Error("cp_async_16 at " + where(file, line) + ": global source address is not 16-byte aligned");
  // Write after read: another warp's ldmatrix of this chunk since the last sync_block is not
  // ordered before this copy, which on the device may land before that read. (Within one warp
  // the ldmatrix, executed by every lane, precedes the lane's copy in program order.) A read
  // that the scheduler runs after the issue is caught at the read, as in flight or as landed
  // without a barrier, so neither order of the two goes unnoticed.
  Chunk& target = l.chunks[offset / 16];
  const unsigned warp = lane.linear / 32;
  if (target.read_epoch == l.block_epoch) {
    const Read* read = target.first_read.thread / 32 != warp ? &target.first_read
                       : target.other_warp_read              ? &target.other_read
                                                             : nullptr;
    if (read != nullptr)
      throw Error("cp_async_16 at " + where(file, line) + " (thread " + std::to_string(lane.linear) + ", warp " +
                  std::to_string(warp) + ") writes shared offset " + std::to_string(offset) + ", which " +
                  op_name(read->op) + " at " + where(read->file, read->line) + " (warp " +
                  std::to_string(read->thread / 32) + ", row address of thread " + std::to_string(read->thread) +
                  ") read with no sync_block since: a write-after-read race (on the device the copy may land "
                  "before that read)");
  }
  PendingCopy copy{static_cast<unsigned char*>(const_cast<void*>(dst_shared)), {}, -1, file, line};
  if (full) {
    if (!l.globals.empty()) {
      uintptr_t a = reinterpret_cast<uintptr_t>(src_global);
      bool ok = false;
      for (const auto& [start, size] : l.globals) ok = ok || (a >= start && a + 16 <= start + size);
      if (!ok)
        throw Error("cp_async_16 at " + where(file, line) +
                    ": global source is outside every buffer given to xk_sim::register_global");
    }
    std::memcpy(copy.bytes, src_global, 16);
  } else {
    std::memset(copy.bytes, 0, 16);
  }
  std::memset(copy.dst, 0xFF, 16);
  ++target.pending;
  target.issuer = lane.linear;
  target.issue_file = file;
  target.issue_line = line;
  lane.pending.push_back(copy);
}

inline void cp_async_commit() {
  Lane& lane = me();
  for (PendingCopy& copy : lane.pending)
    if (copy.group < 0) copy.group = lane.committed_groups;
  ++lane.committed_groups;
}

// Lands this thread's copies of every committed group but the newest `pending_groups`.
inline void cp_async_wait(int pending_groups) {
  Launch& l = launch_state();
  Lane& lane = me();
  long done_below = lane.committed_groups - pending_groups;
  std::vector<PendingCopy> still;
  for (const PendingCopy& copy : lane.pending) {
    if (copy.group >= 0 && copy.group < done_below)
      land(l, copy, lane);
    else
      still.push_back(copy);
  }
  lane.pending.swap(still);
}

// ---- rendezvous --------------------------------------------------------------------------------

// Waits at warp collective `op` until the whole warp is there and the scheduler has computed
// this lane's result.
inline void arrive_warp(Op op, const char* file, int line) {
  Lane& lane = me();
  lane.op = op;
  lane.file = file;
  lane.line = line;
  lane.state = State::AtWarp;
  park(lane);
}

inline void sync_block(const char* file, int line) {
  Lane& lane = me();
  lane.file = file;
  lane.line = line;
  lane.state = State::AtBlock;
  park(lane);
}

inline uint16_t shared_u16(const unsigned char* row, int column) {
  uint16_t v;
  std::memcpy(&v, row + 2 * column, 2);
  return v;
}

// ldmatrix over lanes[first .. first + 32): matrices j < count, row r of matrix j at the address
// of lane 8j + r.
inline void run_ldmatrix(Launch& l, unsigned first, int count, bool trans) {
  uint16_t m[4][8][8];
  for (int j = 0; j < count; ++j)
    for (int r = 0; r < 8; ++r) {
      const Lane& src = l.lanes[first + 8 * j + r];
      bool inside = false;
      std::size_t offset = shared_offset(l, src.address, 16, &inside);
      auto what = [&] {
        return std::string(op_name(src.op)) + " at " + where(src.file, src.line) + " (" + block_name(l) + ", lane " +
               std::to_string(8 * j + r) + " of warp " + std::to_string(first / 32) + ")";
      };
      if (!inside)
        throw Error(what() + ": row address is outside the block's " + std::to_string(l.shared_bytes) +
                    " bytes of dynamic shared memory");
      if (reinterpret_cast<uintptr_t>(src.address) % 16 != 0)
        throw Error(what() + ": row address (shared offset " + std::to_string(offset) + ") is not 16-byte aligned");
      Chunk& chunk = l.chunks[offset / 16];
      if (chunk.pending != 0)
        throw Error(what() + ": reads shared offset " + std::to_string(offset) + " while a cp_async_16 into it (thread " +
                    std::to_string(chunk.issuer) + ", warp " + std::to_string(chunk.issuer / 32) + ", at " +
                    where(chunk.issue_file, chunk.issue_line) +
                    ") is still in flight: no cp_async_wait covering its group (and sync_block) came before");
      // Another thread's landed copy is visible after a barrier that follows the issuer's wait.
      bool ordered = !chunk.landed || chunk.issuer == src.linear || l.block_epoch > chunk.landed_block_epoch ||
                     (chunk.issuer / 32 == src.linear / 32 && l.warp_epochs[src.linear / 32] > chunk.landed_warp_epoch);
      if (!ordered)
        throw Error(what() + ": reads shared offset " + std::to_string(offset) + ", which thread " +
                    std::to_string(chunk.issuer) + "'s cp_async_16 landed at its cp_async_wait with no sync_block since "
                    "(a read-after-write race on the device; the copy: warp " + std::to_string(chunk.issuer / 32) +
                    ", " + where(chunk.issue_file, chunk.issue_line) + ")");
      // The read, for the write-after-read check of later copies into this chunk.
      const Read read{src.linear, src.op, src.file, src.line};
      if (chunk.read_epoch != l.block_epoch) {
        chunk.read_epoch = l.block_epoch;
        chunk.first_read = read;
        chunk.other_warp_read = false;
      } else if (read.thread / 32 != chunk.first_read.thread / 32) {
        chunk.other_read = read;
        chunk.other_warp_read = true;
      }
      const unsigned char* row = static_cast<const unsigned char*>(src.address);
      for (int c = 0; c < 8; ++c) m[j][r][c] = shared_u16(row, c);
    }
  for (unsigned lane = 0; lane < 32; ++lane) {
    unsigned g = lane / 4, t = lane % 4;
    for (int j = 0; j < count; ++j) {
      uint16_t lo = trans ? m[j][2 * t][g] : m[j][g][2 * t];
      uint16_t hi = trans ? m[j][2 * t + 1][g] : m[j][g][2 * t + 1];
      l.lanes[first + lane].regs_out[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

float f16_to_float(uint16_t h);
float bf16_to_float(uint16_t h);

// d = a b + c for the m16n8k16 shape. Each d[i][j] is c[i][j] + sum_k a[i][k] b[k][j] summed in
// fp32 left to right (c first, then k = 0..15); the products of 16-bit values are exact in fp32.
// (Optimised beyond the harness's -O1: this loop is most of the model's time on a tensor-core kernel.)
__attribute__((optimize("O2", "tree-vectorize"))) inline void run_mma(Launch& l, unsigned first, bool bf16) {
  auto conv = [bf16](uint16_t bits) { return bf16 ? bf16_to_float(bits) : f16_to_float(bits); };
  float a[16][16], b[16][8], c[16][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const Lane& s = l.lanes[first + lane];
    unsigned g = lane / 4, t = lane % 4;
    for (int half = 0; half < 2; ++half) {
      unsigned shift = 16 * half;
      a[g][2 * t + half] = conv(static_cast<uint16_t>(s.a[0] >> shift));
      a[g + 8][2 * t + half] = conv(static_cast<uint16_t>(s.a[1] >> shift));
      a[g][2 * t + 8 + half] = conv(static_cast<uint16_t>(s.a[2] >> shift));
      a[g + 8][2 * t + 8 + half] = conv(static_cast<uint16_t>(s.a[3] >> shift));
      b[2 * t + half][g] = conv(static_cast<uint16_t>(s.b[0] >> shift));
      b[2 * t + 8 + half][g] = conv(static_cast<uint16_t>(s.b[1] >> shift));
    }
    c[g][2 * t] = s.c[0];
    c[g][2 * t + 1] = s.c[1];
    c[g + 8][2 * t] = s.c[2];
    c[g + 8][2 * t + 1] = s.c[3];
  }
  // k outermost keeps each element's order (c, then k = 0..15) and lets the 8 columns vectorise.
  float d[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) d[i][j] = c[i][j];
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k)
      for (int j = 0; j < 8; ++j) d[i][j] += a[i][k] * b[k][j];  // the product is exact: <= 22 significant bits
  // Written only now: d may be the same array as c in the caller.
  for (unsigned lane = 0; lane < 32; ++lane) {
    Lane& s = l.lanes[first + lane];
    unsigned g = lane / 4, t = lane % 4;
    s.d[0] = d[g][2 * t];
    s.d[1] = d[g][2 * t + 1];
    s.d[2] = d[g + 8][2 * t];
    s.d[3] = d[g + 8][2 * t + 1];
  }
}

inline std::string state_groups(const Launch& l, unsigned first, unsigned count) {
  // "lanes 0-15 at ldmatrix_x4 (k.cuh:12); lanes 16-31 have exited" for the message.
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (unsigned i = 0; i < count; ++i) {
    const Lane& s = l.lanes[first + i];
    std::string what;
    switch (s.state) {
      case State::Runnable: what = "are running"; break;
      case State::Done: what = "have exited"; break;
      case State::AtBlock: what = "wait at sync_block (" + where(s.file, s.line) + ")"; break;
      case State::AtWarp: what = std::string("wait at ") + op_name(s.op) + " (" + where(s.file, s.line) + ")"; break;
    }
    auto it = groups.begin();
    while (it != groups.end() && it->first != what) ++it;
    if (it == groups.end()) groups.push_back({what, {i}});
    else it->second.push_back(i);
  }
  std::string out;
  for (const auto& [what, members] : groups) {
    if (!out.empty()) out += "; ";
    out += "lanes " + lane_list(members) + " " + what;
  }
  return out;
}

// Completes the warp's collective once every lane has arrived; throws when the lanes cannot
// all arrive at the same one.
inline void try_warp(Launch& l, unsigned warp) {
  unsigned n = static_cast<unsigned>(l.lanes.size());
  unsigned first = warp * 32, count = std::min(32u, n - first);
  if (l.warp_stopped[warp] < count) return;
  bool any_at_warp = false, all_at_warp = true;
  for (unsigned i = 0; i < count; ++i) {
    State s = l.lanes[first + i].state;
    if (s == State::Runnable) return;
    any_at_warp = any_at_warp || s == State::AtWarp;
    all_at_warp = all_at_warp && s == State::AtWarp;
  }
  if (!any_at_warp) return;
  auto head = [&] { return block_name(l) + ", warp " + std::to_string(warp) + ": "; };
  if (!all_at_warp) throw Error(head() + "a warp collective not reached by every lane: " + state_groups(l, first, count));
  const Lane& lead = l.lanes[first];
  for (unsigned i = 1; i < count; ++i) {
    const Lane& s = l.lanes[first + i];
    if (s.op != lead.op || (op_is_aligned(lead.op) && (s.line != lead.line || std::strcmp(s.file, lead.file) != 0)))
      throw Error(head() + "lanes wait at different warp collectives: " + state_groups(l, first, count));
  }
  if (count < 32)
    throw Error(head() + op_name(lead.op) + " at " + where(lead.file, lead.line) + " needs 32 lanes, the warp has " +
                std::to_string(count) + " (blockDim is not a multiple of 32)");
  switch (lead.op) {
    case Op::LdmatrixX4: run_ldmatrix(l, first, 4, false); break;
    case Op::LdmatrixX4Trans: run_ldmatrix(l, first, 4, true); break;
    case Op::LdmatrixX2: run_ldmatrix(l, first, 2, false); break;
    case Op::LdmatrixX2Trans: run_ldmatrix(l, first, 2, true); break;
    case Op::MmaF16: run_mma(l, first, false); break;
    case Op::MmaBF16: run_mma(l, first, true); break;
    case Op::ShflXor:
      for (unsigned i = 0; i < 32; ++i) {
        Lane& s = l.lanes[first + i];
        unsigned source = i ^ static_cast<unsigned>(s.shfl_mask);
        // __shfl_xor_sync over the full warp: a source lane past the warp gives the own value.
        s.shfl_result = source < 32 ? l.lanes[first + source].shfl_value : s.shfl_value;
      }
      break;
    case Op::SyncWarp: ++l.warp_epochs[warp]; break;
  }
  for (unsigned i = 0; i < count; ++i) l.lanes[first + i].state = State::Runnable;
  l.warp_stopped[warp] = 0;
  l.block_stopped -= count;
}

inline void try_block(Launch& l) {
  if (l.block_stopped < l.lanes.size()) return;
  bool any_done = false;
  for (const Lane& s : l.lanes) {
    if (s.state == State::Runnable || s.state == State::AtWarp) return;
    any_done = any_done || s.state == State::Done;
  }
  bool any_waiting = false;
  for (const Lane& s : l.lanes) any_waiting = any_waiting || s.state == State::AtBlock;
  if (!any_waiting) return;
  if (any_done) {
    std::vector<unsigned> exited, waiting;
    const Lane* first_waiting = nullptr;
    for (const Lane& s : l.lanes) {
      if (s.state == State::Done) exited.push_back(s.linear);
      else {
        waiting.push_back(s.linear);
        if (first_waiting == nullptr) first_waiting = &s;
      }
    }
    throw Error(block_name(l) + ": sync_block at " + where(first_waiting->file, first_waiting->line) +
                " not reached by every thread: threads " + lane_list(waiting) + " wait, threads " + lane_list(exited) +
                " have exited");
  }
  ++l.block_epoch;
  for (Lane& s : l.lanes) s.state = State::Runnable;
  std::fill(l.warp_stopped.begin(), l.warp_stopped.end(), 0u);
  l.block_stopped = 0;
}

inline void fiber_main() {
  Launch& l = *t_launch;
  Lane& lane = l.lanes[l.current];
  try {
    l.body();
  } catch (const std::exception& e) {
    l.error = block_name(l) + ", thread " + std::to_string(lane.linear) + ": " + e.what();
  } catch (...) {
    l.error = block_name(l) + ", thread " + std::to_string(lane.linear) + ": unknown exception";
  }
  // Copies still in flight at exit land (a GPU completes them too).
  if (l.error.empty())
    for (const PendingCopy& copy : lane.pending) land(l, copy, lane);
  lane.pending.clear();
  lane.state = State::Done;
  switch_context(lane.context, l.scheduler);  // never resumed
}

inline void run_block(Launch& l) {
  std::memset(l.shared, 0xFF, l.shared_bytes);
  std::fill(l.chunks.begin(), l.chunks.end(), Chunk{});
  l.block_epoch = 0;
  std::fill(l.warp_epochs.begin(), l.warp_epochs.end(), 0L);
  std::fill(l.warp_stopped.begin(), l.warp_stopped.end(), 0u);
  l.block_stopped = 0;
  unsigned n = static_cast<unsigned>(l.lanes.size());
  for (unsigned i = 0; i < n; ++i) {
    Lane& s = l.lanes[i];
    s.state = State::Runnable;
    s.pending.clear();
    s.committed_groups = 0;
    make_context(s.context, s.stack, kFiberStackBytes, fiber_main);
  }
  unsigned done = 0;
  while (done < n) {
    bool progressed = false;
    for (unsigned i = 0; i < n; ++i) {
      if (l.lanes[i].state != State::Runnable) continue;
      progressed = true;
      l.current = i;
      switch_context(l.scheduler, l.lanes[i].context);
      if (!l.error.empty()) throw Error(l.error);
      State s = l.lanes[i].state;
      ++l.warp_stopped[i / 32];
      ++l.block_stopped;
      if (s == State::Done) ++done;
      try_warp(l, i / 32);  // also when it stopped at sync_block: the warp may wait for it
      if (s == State::AtBlock || s == State::Done) try_block(l);
    }
    if (!progressed && done < n) {
      std::string states;
      for (unsigned w = 0; w * 32 < n; ++w)
        states += (states.empty() ? "" : " | ") + ("warp " + std::to_string(w) + ": ") +
                  state_groups(l, w * 32, std::min(32u, n - w * 32));
      throw Error(block_name(l) + ": deadlock: " + states);
    }
  }
}

// Scope of one launch: owns the fibers' stacks and the shared memory, resets the thread_local
// state however the launch ends.
struct LaunchScope {
  Launch launch;
  explicit LaunchScope(Launch** slot) : slot_(slot) {}
  ~LaunchScope() {
    for (Lane& s : launch.lanes)
      if (s.stack != nullptr) t_stacks.give(s.stack);
    std::free(launch.shared);
    *slot_ = nullptr;
    t_globals.clear();
  }

 private:
  Launch** slot_;
};

// ---- 16-bit conversions, bit-exact round to nearest even -------------------------------------

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    float v = static_cast<float>(mantissa) * bits_float(0x33800000u);  // 2^-24
    return sign ? -v : v;
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // Inf, NaN (payload kept)
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Rounds the integer significand `s` right by `shift` bits to nearest, ties to even.
inline uint32_t round_shift(uint32_t s, unsigned shift) {
  if (shift == 0) return s;
  if (shift > 31) return 0;
  uint32_t kept = s >> shift, rest = s & ((1u << shift) - 1), half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

inline uint16_t float_to_f16(float x) {
  uint32_t u = float_bits(x);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u)  // NaN: quiet, top payload bits kept
    return static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  // 65520 (half-way between 65504, the largest half, and 2^16) and above round to infinity.
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (magnitude < 0x00800000u) return sign;  // fp32 subnormals are far below half's smallest subnormal
  uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;  // 24 bits, value significand * 2^(exponent-23)
  if (exponent >= -14) {
    // Normal half: 10 mantissa bits; a carry out of the rounding moves into the exponent field.
    uint32_t h = (static_cast<uint32_t>(exponent + 15) << 10) | ((magnitude >> 13) & 0x3FFu);
    uint32_t rest = magnitude & 0x1FFFu;
    h += (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ? 1u : 0u;
    return static_cast<uint16_t>(sign | h);
  }
  // Subnormal half: value / 2^-24 = significand * 2^(exponent + 1); 1024 becomes the smallest normal.
  return static_cast<uint16_t>(sign | round_shift(significand, static_cast<unsigned>(-(exponent + 1))));
}

inline uint16_t float_to_bf16(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);  // ties to even; overflow reaches Inf
  return static_cast<uint16_t>(rounded >> 16);
}

}  // namespace detail

// ---- the host's API ------------------------------------------------------------------------------

// Allows cp_async_16 to read [ptr, ptr + bytes) in the next launch. Once any range is registered,
// a source outside all of them is an error; the list is cleared when that launch ends.
inline void register_global(const void* ptr, std::size_t bytes) {
  detail::t_globals.emplace_back(reinterpret_cast<uintptr_t>(ptr), bytes);
}

// Runs `kernel(args...)` on a grid x block launch with `dynamic_shared_bytes` of dynamic shared
// memory: blocks in order (x fastest), threads of a block as fibers. Throws Error on a bad launch
// configuration or a kernel bug the model detects.
template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "xk_sim::launch: wrong number of kernel arguments");
  if (detail::t_launch != nullptr) throw Error("xk_sim::launch: a launch is already running on this thread");
  detail::LaunchScope scope(&detail::t_launch);  // from here on, the registrations end with this launch
  unsigned long threads = static_cast<unsigned long>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    throw Error("xk_sim::launch: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                std::to_string(grid.z) + ") outside CUDA's limits");
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw Error("xk_sim::launch: block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                std::to_string(block.z) + ") outside CUDA's limits (at most 1024 threads)");
  if (dynamic_shared_bytes > kMaxDynamicSharedBytes)
    throw Error("xk_sim::launch: " + std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory, sm_80 allows " +
                std::to_string(kMaxDynamicSharedBytes));
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  detail::Launch& l = scope.launch;
  l.grid = grid;
  l.block = block;
  l.globals = detail::t_globals;
  l.shared_bytes = dynamic_shared_bytes;
  std::size_t allocated = (dynamic_shared_bytes + 127) / 128 * 128 + 128;
  l.shared = static_cast<unsigned char*>(std::aligned_alloc(128, allocated));
  if (l.shared == nullptr) throw Error("xk_sim::launch: cannot allocate shared memory");
  l.chunks.assign(allocated / 16, detail::Chunk{});
  l.warp_epochs.assign((threads + 31) / 32, 0L);
  l.warp_stopped.assign((threads + 31) / 32, 0u);
  l.body = [&params, kernel] { std::apply(kernel, params); };
  l.lanes.resize(threads);
  for (unsigned i = 0; i < threads; ++i) {
    detail::Lane& s = l.lanes[i];
    s.linear = i;
    s.thread_idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    s.stack = detail::t_stacks.take();
  }
  detail::t_launch = &l;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        l.block_idx = {x, y, z};
        detail::run_block(l);
      }
}

// Runs an entry point's body: 0 when it returns, 1 with the message kept for xk_last_error when
// it throws (exceptions must not cross the extern "C" boundary into ctypes).
template <class Body>
int run_entry(Body&& body) noexcept {
  try {
    body();
    detail::t_last_error.clear();
    return 0;
  } catch (const std::exception& e) {
    detail::t_last_error = e.what();
  } catch (...) {
    detail::t_last_error = "unknown exception";
  }
  return 1;
}

}  // namespace xk_sim

// The message of the calling OS thread's last failed entry point ("" after a success).
extern "C" inline __attribute__((used, visibility("default"))) const char* xk_last_error() {
  return xk_sim::detail::t_last_error.c_str();
}
