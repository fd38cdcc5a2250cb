// SIMT emulator: lets g++ compile unchanged CUDA kernel bodies (.cuh) and run a launch on the CPU.
//
// Both compilers include this header, so kernels and launchers have one spelling:
//   * FASTAR_DYNAMIC_SMEM(type, name) declares the block's dynamic shared memory as `type* name`;
//   * fastar::launch_kernel(name, kernel, grid, block, smem, stream, args...) launches a kernel
//     (a no-op when any grid dimension is 0, which launchers use for empty batches).
// Under nvcc nothing else is defined. Under g++ this header is the emulator:
//   * one OS thread runs the blocks one after another; inside a block every CUDA thread is a ucontext
//     fiber with its own stack, run until it blocks (barrier, warp intrinsic) or returns. The schedule is
//     deterministic, so a missing __syncthreads gives a reproducible wrong answer.
//   * __syncthreads is a gate over the block's live threads; warp intrinsics are gates over the lanes
//     named in their mask, so divergent warp code behaves as on a GPU. The warp-collective matrix
//     instructions (mma.sync m16n8k16, ldmatrix) are gates over all 32 lanes at one call site.
//   * cp.async copies wait in a per-thread queue and land in shared memory only at the cp.async.wait_group
//     that covers their group, so a missing wait reads stale data.
//   * divergent barriers, deadlocks, bad warp masks and __trap() print a diagnosis naming the kernel to
//     stderr and abort; an exception thrown by a kernel comes out of the launch as std::runtime_error.
//   * launches are serialised by a process-wide mutex (static __shared__ arrays are shared state).
//   * set_schedule / FASTAR_SIMT_SCHEDULE=forward|reverse|shuffle:<seed> change which ready fiber runs at every
//     scheduling decision; a race-free kernel gives bit-identical results under each (forward is the default).
//   * set_race_check / FASTAR_SIMT_RACECHECK=1 (x86-64 Linux): every shared-memory access is recorded (the
//     dynamic region and every __shared__ variable, which live in one page-aligned linker section): the pages are
//     PROT_NONE while the block's threads run, and each access faults, is charged to the running thread and is
//     single-stepped. A launch in which two threads touch one 4-byte word, one of them writing, with no
//     __syncthreads between (nor a __syncwarp over both, for lanes of one warp), or in which a thread touches a
//     word before the cp.async.wait_group that lands a copy into it, throws naming the kernel, the word, the threads
//     and the barrier that opened the interval. A direct access is charged to the word at its address (the first
//     word of a wider load; a wider store is seen by the bytes it changed); ldmatrix rows and cp.async copies are
//     charged exactly. Atomics are exempt. Slow (a few microseconds an access); both modes are off by default and
//     cost the default mode one branch per emulated instruction that touches shared memory.
#pragma once

#include <cstddef>
#include <utility>

#ifdef __CUDACC__

#include <stdexcept>
#include <string>

#define FASTAR_DYNAMIC_SMEM(type, name)                             \
  extern __shared__ __align__(16) unsigned char fastar_dyn_smem_[]; \
  type* name = reinterpret_cast<type*>(fastar_dyn_smem_)

namespace fastar {
template <typename... KArgs, typename... Args>
void launch_kernel(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  // A bad launch configuration is reported here, as a Python RuntimeError through torch.
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastar: launch of ") + name + " failed: " + cudaGetErrorString(err));
}
}  // namespace fastar

#else  // g++: the emulator

// NVIDIA's own headers compile as host code, so dim3, float4, __half, __nv_bfloat16 and their
// conversions are the real ones; driver_types.h gives cudaStream_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// The CUDA headers give these keywords their host meaning; replace it with the emulator's.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
// nvcc's __forceinline__ implies `inline`; keeping it lets a .cuh define helpers used by several TUs.
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another and launches are serialised, so a function-local static is a valid
// home for a block's shared memory. It is NOT reset between blocks (it keeps the previous block's data).
// The section gathers every __shared__ variable of the library between __start_/__stop_fastar_simt_shared,
// where the race check finds them.
#define __shared__ static __attribute__((section("fastar_simt_shared")))
// The built-in variables are defined below; keep CUDA's extern declarations of them out.
#define __DEVICE_LAUNCH_PARAMETERS_H__

#define FASTAR_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(fastar::simt::dynamic_smem())

// Built-in variables. The scheduler writes threadIdx on every fiber switch and blockIdx per block.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline constexpr int warpSize = 32;

namespace fastar::simt {

// Largest dynamic shared memory a launch may ask for (an H100's opt-in maximum per block).
inline constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;

namespace detail {

inline constexpr int kMaxThreads = 1024;
inline constexpr size_t kDefaultStackKiB = 128;

enum class Op : uint8_t {
  SyncWarp,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  AddI,
  MinI,
  MaxI,
  MinU,
  MaxU,
  And,
  Or,
  Xor,
  // Warp-collective matrix instructions (.aligned: all 32 lanes, one call site); the value is a pointer.
  MmaBf16,
  MmaF16,
  Ldmatrix1,
  Ldmatrix2,
  Ldmatrix4,
  Ldmatrix1T,
  Ldmatrix2T,
  Ldmatrix4T,
};

inline bool is_matrix_op(Op op) { return op >= Op::MmaBf16; }

inline const char* op_name(Op op) {
  switch (op) {
    case Op::SyncWarp:
      return "__syncwarp";
    case Op::ShflIdx:
      return "__shfl_sync";
    case Op::ShflUp:
      return "__shfl_up_sync";
    case Op::ShflDown:
      return "__shfl_down_sync";
    case Op::ShflXor:
      return "__shfl_xor_sync";
    case Op::Ballot:
      return "__ballot_sync";
    case Op::Any:
      return "__any_sync";
    case Op::All:
      return "__all_sync";
    case Op::AddI:
      return "__reduce_add_sync";
    case Op::MinI:
    case Op::MinU:
      return "__reduce_min_sync";
    case Op::MaxI:
    case Op::MaxU:
      return "__reduce_max_sync";
    case Op::And:
      return "__reduce_and_sync";
    case Op::Or:
      return "__reduce_or_sync";
    case Op::Xor:
      return "__reduce_xor_sync";
    case Op::MmaBf16:
      return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    case Op::MmaF16:
      return "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32";
    case Op::Ldmatrix1:
      return "ldmatrix.sync.aligned.m8n8.x1.shared.b16";
    case Op::Ldmatrix2:
      return "ldmatrix.sync.aligned.m8n8.x2.shared.b16";
    case Op::Ldmatrix4:
      return "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
    case Op::Ldmatrix1T:
      return "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16";
    case Op::Ldmatrix2T:
      return "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16";
    case Op::Ldmatrix4T:
      return "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
  }
  return "?";
}

enum class State : uint8_t { Ready, AtBarrier, InWarpOp, Done };

// The order in which a block's ready fibers run: forward takes the longest-waiting one, reverse the most
// recently released one, shuffle a pseudo-random one (seeded per launch).
enum class Schedule : uint8_t { Forward, Reverse, Shuffle };

// Emulator settings, read from FASTAR_SIMT_SCHEDULE / FASTAR_SIMT_RACECHECK at the first launch unless set
// before by set_schedule / set_race_check.
struct Config {
  bool loaded = false;
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  bool race_check = false;
};
inline Config g_config;

// Linker-made bounds of the __shared__ section (null when the library has no __shared__ variable).
extern "C" __attribute__((weak, visibility("hidden"))) unsigned char __start_fastar_simt_shared[];
extern "C" __attribute__((weak, visibility("hidden"))) unsigned char __stop_fastar_simt_shared[];

// The race check's record of one 4-byte word of watched shared memory in the running block (see note_access).
struct WordAccess {
  uint32_t write_epoch = 0;  // barrier interval of the last write (0: no write yet in this block)
  uint32_t read_epoch = 0;   // barrier interval of the reads below (0: none since the last write)
  int writer = -1;
  uint32_t write_stamp = 0;            // the writer's warp's __syncwarp count at the write
  int reader = -1, other_reader = -1;  // the first two distinct readers of read_epoch
  int read_warp = -1;                  // the readers' warp; -1 when they span several
  unsigned read_lanes = 0;             // lanes of read_warp that read it
  uint32_t read_stamp = 0;             // read_warp's __syncwarp count at the latest read
  int pending = -1;                    // thread whose cp.async into this word has not landed
};

// A shared-memory region watched by the race check: whole pages, one WordAccess per 4-byte word.
struct WatchedRegion {
  const char* what = "";
  unsigned char* base = nullptr;
  size_t bytes = 0;
  std::vector<WordAccess> words;
};

// The faulting access being single-stepped: the pages made accessible for it and the bytes it may change.
struct Step {
  WatchedRegion* region = nullptr;
  unsigned char* addr = nullptr;
  bool write = false;         // the page fault's error code says write
  unsigned char* pages[4]{};  // pages lifted for this instruction (it may touch several)
  int npages = 0;
  unsigned char before[64]{};  // the bytes from addr on (to the end of its page), to see what a store changed
  size_t window = 0;
};

// A cp.async in flight: the source bytes (read at issue, zero-filled past src-size) and the group it belongs to.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
  int size;
  int group;
};

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  uint3 tid{};
  State state = State::Done;
  uint64_t value = 0;                   // operand deposited in a warp intrinsic
  int arg = 0;                          // shuffle source lane / delta / lane mask
  int width = 32;                       // shuffle width
  uint64_t result = 0;                  // what the pending barrier / warp intrinsic returns to this thread
  std::vector<AsyncCopy> async_copies;  // issue order; emptied at the start of every block
  int async_groups = 0;                 // committed cp.async groups; uncommitted copies belong to group async_groups
  uint32_t sync_seq = 0;                // race check: its warp's __syncwarp count after the last one it took part in
  unsigned sync_mask = 0;               // ... and that __syncwarp's mask
};

// One warp intrinsic in progress: the lanes of `mask` deposit, the last one computes every lane's result.
// Results go to each lane's own Fiber::result, so the group is freed at once and the deposit slots can be
// reused by the next intrinsic without a second gate.
struct Group {
  unsigned mask;
  unsigned arrived;
  Op op;
  unsigned size;  // operand bytes, to catch lanes shuffling different types
  std::source_location site;
};

struct Warp {
  Group groups[32];  // disjoint masks, so at most 32
  int ngroups = 0;
  unsigned exist = 0;  // lanes present in the block; mask bits of absent lanes (partial warp) are ignored
  uint32_t syncs = 0;  // completed __syncwarp calls, for the race check
};

struct Barrier {
  int waiting = 0;
  int count = 0;  // predicates that were non-zero, for __syncthreads_count/and/or
  std::source_location site;
};

struct Sched {
  bool running = false;
  const char* kernel = "";
  const std::function<void()>* body = nullptr;
  Fiber* fibers = nullptr;  // kMaxThreads entries, never moved (ucontext_t points into itself)
  int stacks = 0;           // fibers that own a stack
  size_t stack_bytes = 0;
  int n = 0, live = 0, cur = 0;
  int ready[kMaxThreads];  // FIFO ring of runnable fibers
  int head = 0, queued = 0;
  Barrier bar;
  Warp warps[kMaxThreads / 32];
  ucontext_t main_ctx;
  std::exception_ptr error;
  uint3 error_tid{};
  unsigned char* dyn_smem = nullptr;
  Schedule order = Schedule::Forward;
  uint64_t rng = 0;
  // Race check (off: race == false and nothing below is touched).
  bool race = false;
  WatchedRegion regions[2];  // the dynamic shared memory, the __shared__ section
  uint32_t epoch = 0;        // barrier interval: 1 at every block start, bumped at every __syncthreads release
  std::source_location interval_site;
  bool guarded = false;  // the regions are PROT_NONE
  Step step;
  struct sigaction saved_segv{};
  struct sigaction saved_trap{};
  char race_report[1024] = "";  // the first race of the block, thrown by launch(); written in a signal handler

  void push(int i) {
    ready[(head + queued) % kMaxThreads] = i;
    ++queued;
  }
  uint64_t next_random() {  // splitmix64
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int pop() {
    if (queued == 0) return -1;
    if (order == Schedule::Reverse) {
      --queued;
      return ready[(head + queued) % kMaxThreads];
    }
    if (order == Schedule::Shuffle)
      std::swap(ready[head], ready[(head + int(next_random() % unsigned(queued))) % kMaxThreads]);
    const int i = ready[head];
    head = (head + 1) % kMaxThreads;
    --queued;
    return i;
  }
};

inline Sched g_sched;
inline std::mutex g_launch_mutex;
inline std::map<std::string, int64_t> g_launches;  // launches per kernel name (launch_counts)
inline thread_local bool tl_launching = false;

[[noreturn]] __attribute__((format(printf, 1, 2))) inline void die(const char* fmt, ...) {
  const Sched& s = g_sched;
  if (s.running)
    std::fprintf(stderr, "fastar simt: kernel '%s', block (%u,%u,%u), thread (%u,%u,%u): ", s.kernel, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  else
    std::fprintf(stderr, "fastar simt: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::abort();
}

// Called when a thread blocks or exits and no fiber is runnable although some are still live.
[[noreturn]] inline void deadlock() {
  const Sched& s = g_sched;
  std::fprintf(stderr,
               "fastar simt: deadlock in kernel '%s', block (%u,%u,%u) of grid (%u,%u,%u), blockDim (%u,%u,%u): "
               "%d of %d threads are blocked and none can proceed\n",
               s.kernel, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y,
               blockDim.z, s.live, s.n);
  if (s.bar.waiting > 0)
    std::fprintf(stderr, "  %d threads wait at __syncthreads (%s:%u:%u)\n", s.bar.waiting, s.bar.site.file_name(),
                 s.bar.site.line(), s.bar.site.column());
  for (int w = 0; w * 32 < s.n; ++w) {
    for (int gi = 0; gi < s.warps[w].ngroups; ++gi) {
      const Group& g = s.warps[w].groups[gi];
      unsigned exited = 0, at_barrier = 0;
      for (int l = 0; l < 32; ++l) {
        if (!(g.mask >> l & 1)) continue;
        const State st = s.fibers[w * 32 + l].state;
        if (st == State::Done) exited |= 1u << l;
        if (st == State::AtBarrier) at_barrier |= 1u << l;
      }
      std::fprintf(stderr,
                   "  warp %d: lanes 0x%08x wait in %s(mask=0x%08x) at %s:%u:%u; lanes 0x%08x of the mask never "
                   "arrived (exited: 0x%08x, at __syncthreads: 0x%08x)\n",
                   w, g.arrived, op_name(g.op), g.mask, g.site.file_name(), g.site.line(), g.site.column(),
                   g.mask & ~g.arrived, exited, at_barrier);
    }
  }
  std::fflush(stderr);
  std::abort();
}

inline void check_running(const char* what) {
  if (!g_sched.running) die("%s called outside a kernel launch", what);
}

// ---- Race check -------------------------------------------------------------------------------------------------

inline const char* tid_str(const Sched& s, int t, char (&buf)[40]) {
  const uint3 v = s.fibers[t].tid;
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", v.x, v.y, v.z);
  return buf;
}

// Keeps the block's first race: thread a's earlier access and thread b's current one to `word` of r.
inline void report_race(Sched& s, const WatchedRegion& r, size_t word, int a, const char* a_did, int b,
                        const char* b_did, const char* why) {
  if (s.race_report[0]) return;
  char ta[40], tb[40], interval[512];
  if (s.epoch == 1)
    std::snprintf(interval, sizeof interval, "since the start of the block");
  else
    std::snprintf(interval, sizeof interval, "since the __syncthreads at %s:%u:%u", s.interval_site.file_name(),
                  s.interval_site.line(), s.interval_site.column());
  std::snprintf(s.race_report, sizeof s.race_report,
                "fastar simt: shared-memory race in kernel '%s', block (%u,%u,%u): thread %s %s word %zu (byte offset "
                "%zu, address %p) of %s and thread %s %s it %s, %s",
                s.kernel, blockIdx.x, blockIdx.y, blockIdx.z, tid_str(s, a, ta), a_did, word, 4 * word,
                static_cast<void*>(r.base + 4 * word), r.what, tid_str(s, b, tb), b_did, interval, why);
}

// Whether a __syncwarp over both threads completed after thread a's access at warp count `stamp` (b runs now).
inline bool warp_ordered(const Sched& s, int a, uint32_t stamp, int b) {
  const Fiber& f = s.fibers[b];
  return a / 32 == b / 32 && f.sync_seq > stamp && (f.sync_mask >> (a % 32) & 1);
}

// Records thread t's read or write of `word` of r. Two accesses of different threads, one a write, conflict
// unless a __syncthreads (a new epoch) or a __syncwarp over both lies between them; any access to a word with a
// cp.async in flight conflicts.
inline void note_access(Sched& s, WatchedRegion& r, size_t word, int t, bool write) {
  static constexpr char kNoBarrier[] = "with no __syncthreads (or __syncwarp over both) between";
  WordAccess& w = r.words[word];
  const char* did = write ? "wrote" : "read";
  if (w.pending >= 0)
    report_race(s, r, word, w.pending, "issued a cp.async into", t, did,
                "before the cp.async.wait_group that lands the copy");
  const uint32_t stamp = s.warps[t / 32].syncs;
  if (w.write_epoch == s.epoch && w.writer != t && !warp_ordered(s, w.writer, w.write_stamp, t))
    report_race(s, r, word, w.writer, "wrote", t, did, kNoBarrier);
  const int warp = t / 32;
  const unsigned lane = 1u << (t % 32);
  if (write) {
    const int other = w.reader != t ? w.reader : w.other_reader;
    const bool ordered = w.read_warp == warp && s.fibers[t].sync_seq > w.read_stamp &&
                         (w.read_lanes & ~lane & ~s.fibers[t].sync_mask) == 0;
    if (w.read_epoch == s.epoch && other >= 0 && !ordered) report_race(s, r, word, other, "read", t, did, kNoBarrier);
    w.write_epoch = s.epoch;
    w.writer = t;
    w.write_stamp = stamp;
    w.read_epoch = 0;
    return;
  }
  if (w.read_epoch != s.epoch) {
    w.read_epoch = s.epoch;
    w.reader = t;
    w.other_reader = -1;
    w.read_warp = warp;
    w.read_lanes = 0;
  } else if (t != w.reader && w.other_reader < 0) {
    w.other_reader = t;
  }
  if (w.read_warp != warp) w.read_warp = -1;
  w.read_lanes |= lane;
  w.read_stamp = stamp;
}

inline WatchedRegion* region_of(Sched& s, const void* p) {
  const auto* a = static_cast<const unsigned char*>(p);
  for (WatchedRegion& r : s.regions)
    if (r.bytes && a >= r.base && a < r.base + r.bytes) return &r;
  return nullptr;
}

// Records an access the emulator makes for thread t (ldmatrix rows, cp.async copies): every word it covers.
inline void note_range(Sched& s, const void* p, size_t bytes, int t, bool write) {
  WatchedRegion* r = region_of(s, p);
  if (!r) return;
  const size_t first = size_t(static_cast<const unsigned char*>(p) - r->base) / 4;
  const size_t last =
      std::min(r->words.size(), (size_t(static_cast<const unsigned char*>(p) - r->base) + bytes + 3) / 4);
  for (size_t w = first; w < last; ++w) note_access(s, *r, w, t, write);
}

// Sets (thread t) or clears (-1) the in-flight cp.async of every word of [p, p + bytes).
inline void mark_pending(Sched& s, const void* p, size_t bytes, int t) {
  WatchedRegion* r = region_of(s, p);
  if (!r) return;
  const size_t first = size_t(static_cast<const unsigned char*>(p) - r->base) / 4;
  for (size_t w = first; w < std::min(r->words.size(), first + (bytes + 3) / 4); ++w) r->words[w].pending = t;
}

inline size_t page_bytes() {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return page;
}

// Makes the watched regions inaccessible (on) or readable and writable again (off).
inline void set_guard(Sched& s, bool on) {
  for (const WatchedRegion& r : s.regions)
    if (r.bytes && mprotect(r.base, r.bytes, on ? PROT_NONE : PROT_READ | PROT_WRITE) != 0)
      die("race check: mprotect of %s failed (errno %d)", r.what, errno);
  s.guarded = on;
}

// The emulator's own shared-memory accesses (which it records exactly, if at all) run with the regions open.
struct Unguarded {
  bool was = g_sched.guarded;
  Unguarded() {
    if (was) set_guard(g_sched, false);
  }
  ~Unguarded() {
    if (was) set_guard(g_sched, true);
  }
  Unguarded(const Unguarded&) = delete;
  Unguarded& operator=(const Unguarded&) = delete;
};

#if defined(__x86_64__) && defined(__linux__)
inline constexpr bool kRaceCheckSupported = true;
inline constexpr greg_t kTrapFlag = 0x100;  // EFLAGS.TF: trap after the next instruction
inline constexpr greg_t kPageFaultWrite = 0x2;

// SIGSEGV on a guarded page: opens the page and single-steps the access; on_step records it.
inline void on_fault(int, siginfo_t* info, void* context) {
  Sched& s = g_sched;
  auto* a = static_cast<unsigned char*>(info->si_addr);
  WatchedRegion* r = s.guarded ? region_of(s, a) : nullptr;
  Step& st = s.step;
  if (!r || st.npages == 4) {  // not ours: the previous handler meets the fault when the instruction runs again
    sigaction(SIGSEGV, &s.saved_segv, nullptr);
    return;
  }
  const size_t page = page_bytes();
  auto* p = reinterpret_cast<unsigned char*>(reinterpret_cast<uintptr_t>(a) & ~uintptr_t(page - 1));
  mprotect(p, page, PROT_READ | PROT_WRITE);
  st.pages[st.npages++] = p;
  auto* uc = static_cast<ucontext_t*>(context);
  if (!st.region) {  // the instruction's first fault names the access
    st.region = r;
    st.addr = a;
    st.write = uc->uc_mcontext.gregs[REG_ERR] & kPageFaultWrite;
    st.window = std::min<size_t>({sizeof st.before, size_t(p + page - a), size_t(r->base + r->bytes - a)});
    std::memcpy(st.before, a, st.window);
  }
  uc->uc_mcontext.gregs[REG_EFL] |= kTrapFlag;
}

// SIGTRAP after the single-stepped instruction: charges its access to the running thread and closes the pages.
inline void on_step(int, siginfo_t*, void* context) {
  Sched& s = g_sched;
  Step& st = s.step;
  if (!st.region) {
    sigaction(SIGTRAP, &s.saved_trap, nullptr);
    return;
  }
  auto* uc = static_cast<ucontext_t*>(context);
  uc->uc_mcontext.gregs[REG_EFL] &= ~kTrapFlag;
  WatchedRegion& r = *st.region;
  const size_t first = size_t(st.addr - r.base) / 4;
  bool wrote = st.write;
  for (size_t b = 0; b < st.window; ++b)
    if (st.addr[b] != st.before[b]) {
      wrote = true;
      const size_t w = size_t(st.addr + b - r.base) / 4;
      if (w != first) note_access(s, r, w, s.cur, true);
    }
  note_access(s, r, first, s.cur, wrote);
  for (int i = 0; i < st.npages; ++i) mprotect(st.pages[i], page_bytes(), PROT_NONE);
  st = Step{};
}

inline void install_fault_handlers(Sched& s) {
  struct sigaction sa{};
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sa.sa_sigaction = on_fault;
  sigaction(SIGSEGV, &sa, &s.saved_segv);
  sa.sa_sigaction = on_step;
  sigaction(SIGTRAP, &sa, &s.saved_trap);
}
inline void restore_fault_handlers(Sched& s) {
  sigaction(SIGSEGV, &s.saved_segv, nullptr);
  sigaction(SIGTRAP, &s.saved_trap, nullptr);
}
#else
inline constexpr bool kRaceCheckSupported = false;
inline void install_fault_handlers(Sched&) {}
inline void restore_fault_handlers(Sched&) {}
#endif

// Makes fiber `next` current. With `save`, the running context is stored there to be resumed later.
inline void switch_to(Sched& s, int next, ucontext_t* save) {
  s.cur = next;
  threadIdx = s.fibers[next].tid;
  if (save)
    swapcontext(save, &s.fibers[next].ctx);
  else
    setcontext(&s.fibers[next].ctx);
}

// The current fiber has recorded why it waits; run the next ready one. Returns once someone releases us.
// Under a schedule other than forward the releasing fiber is queued with the rest and may pop itself.
inline void block_current(Sched& s) {
  const int me = s.cur;
  const int next = s.pop();
  if (next < 0) deadlock();
  if (next != me) switch_to(s, next, &s.fibers[me].ctx);
}

// Releasing threads from a gate; the running one joins the queue unless the schedule is forward.
inline void make_ready(Sched& s, int i) {
  if (i != s.cur || s.order != Schedule::Forward) s.push(i);
}

inline void release_barrier(Sched& s) {
  if (s.race) {
    ++s.epoch;
    s.interval_site = s.bar.site;
  }
  const uint64_t res = uint64_t(uint32_t(s.bar.count)) << 32 | uint32_t(s.bar.waiting);
  for (int i = 0; i < s.n; ++i) {
    Fiber& f = s.fibers[i];
    if (f.state != State::AtBarrier) continue;
    f.result = res;
    f.state = State::Ready;
    make_ready(s, i);
  }
  s.bar.waiting = 0;
}

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

// Returns (number of non-zero predicates) << 32 | (number of participating threads).
inline uint64_t block_barrier(int pred, const std::source_location& site) {
  check_running("__syncthreads");
  Sched& s = g_sched;
  Barrier& b = s.bar;
  if (b.waiting == 0) {
    b.site = site;
    b.count = 0;
  } else if (!same_site(b.site, site)) {
    die("divergent __syncthreads: this thread waits at %s:%u:%u while %d threads of the block wait at %s:%u:%u",
        site.file_name(), site.line(), site.column(), b.waiting, b.site.file_name(), b.site.line(), b.site.column());
  }
  Fiber& f = s.fibers[s.cur];
  f.state = State::AtBarrier;
  b.count += pred != 0;
  if (++b.waiting == s.live) {
    release_barrier(s);
    if (s.order != Schedule::Forward) block_current(s);
  } else {
    block_current(s);
  }
  return f.result;
}

inline uint64_t shuffle_result(const Group& g, const Fiber* lanes, int lane) {
  const Fiber& f = lanes[lane];
  // PTX shfl.sync semantics: c[12:8] = 32 - width marks the segment, c[4:0] the clamp lane.
  const int seg = 32 - f.width;
  const int min_lane = lane & seg;
  const int max_lane = min_lane | ((g.op == Op::ShflUp ? 0 : 31) & ~seg);
  const int b = f.arg & 31;
  int j = lane;
  bool ok = false;
  switch (g.op) {
    case Op::ShflUp:
      j = lane - b;
      ok = j >= max_lane;
      break;
    case Op::ShflDown:
      j = lane + b;
      ok = j <= max_lane;
      break;
    case Op::ShflXor:
      j = lane ^ b;
      ok = j <= max_lane;
      break;
    default:
      j = min_lane | (b & ~seg);
      ok = j <= max_lane;
      break;
  }
  if (!ok) j = lane;
  // Reading a lane outside the mask is undefined on a GPU; all-ones bits (NaN, -1) make it visible.
  if (!(g.mask >> j & 1)) return ~uint64_t(0);
  return lanes[j].value;
}

// Fragment layouts of mma.m16n8k16 (PTX ISA), lane -> (row, col) of element i of its fragment, with
// g = lane >> 2, t = lane & 3. Element i of a .b32-packed fragment is the low (even i) or high half of register i / 2.
struct RowCol {
  int row, col;
};
// A, 16x16 (m, k), 8 halves: rows g (a0, a1, a4, a5) and g + 8; cols 2t + (i & 1), + 8 for a4..a7.
inline RowCol mma_a_elem(int lane, int i) {
  return {(lane >> 2) + 8 * (i >> 1 & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
}
// B, 16x8 (k, n), 4 halves: k = 2t + (i & 1), + 8 for b2, b3; n = g.
inline RowCol mma_b_elem(int lane, int i) { return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2}; }
// C and D, 16x8 (m, n), 4 floats: rows g (c0, c1) and g + 8; cols 2t + (i & 1).
inline RowCol mma_c_elem(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }

// What each lane deposits in an mma / ldmatrix gate (a pointer to it: a blocked fiber's stack stays valid).
struct MmaOperands {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};
struct LdmatrixOperands {
  const void* row;  // the row this lane addresses (lanes 8j..8j+7 give matrix j's rows 0..7)
  uint32_t* r;
};

inline float b16_to_float(Op op, uint32_t bits) {
  if (op == Op::MmaBf16) return std::bit_cast<float>(bits << 16);
  __half_raw raw;
  raw.x = uint16_t(bits);
  return __half2float(__half(raw));
}

// D = A * B + C for the warp: products of two 16-bit floats are exact in float (barring overflow and
// underflow); each D element adds them to C in k order, rounding to float after each addition (the hardware's
// order and rounding may differ within fp32 accumulation error). C is gathered from every lane before any D
// is written (d may alias c).
inline void run_mma(Op op, Fiber* lanes) {
  float a[16][16], b[16][8], acc[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto* o = reinterpret_cast<const MmaOperands*>(lanes[l].value);
    for (int i = 0; i < 8; ++i) {
      const RowCol e = mma_a_elem(l, i);
      a[e.row][e.col] = b16_to_float(op, o->a[i / 2] >> 16 * (i & 1) & 0xffff);
    }
    for (int i = 0; i < 4; ++i) {
      const RowCol e = mma_b_elem(l, i);
      b[e.row][e.col] = b16_to_float(op, o->b[i / 2] >> 16 * (i & 1) & 0xffff);
      const RowCol ec = mma_c_elem(l, i);
      acc[ec.row][ec.col] = o->c[i];
    }
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) acc[m][n] += a[m][k] * b[k][n];
  for (int l = 0; l < 32; ++l) {
    const auto* o = reinterpret_cast<const MmaOperands*>(lanes[l].value);
    for (int i = 0; i < 4; ++i) {
      const RowCol e = mma_c_elem(l, i);
      o->d[i] = acc[e.row][e.col];
    }
  }
}

// ldmatrix .m8n8.b16: matrix j's row r (8 halves, 16 bytes) is at lane 8j + r's address; lane l receives in
// register j the halves at row l >> 2, cols 2(l & 3) and 2(l & 3) + 1 of matrix j (.trans: of its transpose).
inline void run_ldmatrix(Op op, Fiber* lanes) {
  const int count = op == Op::Ldmatrix1 || op == Op::Ldmatrix1T   ? 1
                    : op == Op::Ldmatrix2 || op == Op::Ldmatrix2T ? 2
                                                                  : 4;
  const bool trans = op >= Op::Ldmatrix1T;
  Sched& s = g_sched;
  const Unguarded open;
  uint16_t m[4][8][8];
  for (int j = 0; j < count; ++j)
    for (int r = 0; r < 8; ++r) {
      const void* row = reinterpret_cast<const LdmatrixOperands*>(lanes[8 * j + r].value)->row;
      std::memcpy(m[j][r], row, 16);
      if (s.race) note_range(s, row, 16, int(lanes + 8 * j + r - s.fibers), false);
    }
  for (int l = 0; l < 32; ++l) {
    uint32_t* out = reinterpret_cast<const LdmatrixOperands*>(lanes[l].value)->r;
    const int g = l >> 2, c = 2 * (l & 3);
    for (int j = 0; j < count; ++j) {
      const uint16_t lo = trans ? m[j][c][g] : m[j][g][c];
      const uint16_t hi = trans ? m[j][c + 1][g] : m[j][g][c + 1];
      out[j] = uint32_t(hi) << 16 | lo;
    }
  }
}

inline void complete_group(Sched& s, int warp, int gi) {
  Warp& w = s.warps[warp];
  const Group g = w.groups[gi];
  w.groups[gi] = w.groups[--w.ngroups];
  Fiber* lanes = s.fibers + warp * 32;
  if (is_matrix_op(g.op)) {
    if (g.op == Op::MmaBf16 || g.op == Op::MmaF16)
      run_mma(g.op, lanes);
    else
      run_ldmatrix(g.op, lanes);
    for (int l = 0; l < 32; ++l) {
      const int idx = warp * 32 + l;
      lanes[l].state = State::Ready;
      make_ready(s, idx);
    }
    return;
  }

  if (g.op == Op::SyncWarp) ++w.syncs;
  unsigned ballot = 0;
  uint32_t sum = 0, band = ~0u, bor = 0, bxor = 0;
  int32_t mini = std::numeric_limits<int32_t>::max(), maxi = std::numeric_limits<int32_t>::min();
  uint32_t minu = ~0u, maxu = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(g.mask >> l & 1)) continue;
    const uint32_t v = uint32_t(lanes[l].value);
    if (v) ballot |= 1u << l;
    sum += v;
    band &= v;
    bor |= v;
    bxor ^= v;
    mini = std::min(mini, int32_t(v));
    maxi = std::max(maxi, int32_t(v));
    minu = std::min(minu, v);
    maxu = std::max(maxu, v);
  }
  for (int l = 0; l < 32; ++l) {
    if (!(g.mask >> l & 1)) continue;
    Fiber& f = lanes[l];
    switch (g.op) {
      case Op::SyncWarp:
        f.result = 0;
        f.sync_seq = w.syncs;
        f.sync_mask = g.mask;
        break;
      case Op::ShflIdx:
      case Op::ShflUp:
      case Op::ShflDown:
      case Op::ShflXor:
        f.result = shuffle_result(g, lanes, l);
        break;
      case Op::Ballot:
        f.result = ballot;
        break;
      case Op::Any:
        f.result = ballot != 0;
        break;
      case Op::All:
        f.result = ballot == g.mask;
        break;
      case Op::AddI:
        f.result = sum;
        break;
      case Op::MinI:
        f.result = uint32_t(mini);
        break;
      case Op::MaxI:
        f.result = uint32_t(maxi);
        break;
      case Op::MinU:
        f.result = minu;
        break;
      case Op::MaxU:
        f.result = maxu;
        break;
      case Op::And:
        f.result = band;
        break;
      case Op::Or:
        f.result = bor;
        break;
      case Op::Xor:
        f.result = bxor;
        break;
      default:  // matrix ops returned above
        break;
    }
    const int idx = warp * 32 + l;
    f.state = State::Ready;
    make_ready(s, idx);
  }
}

inline uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg, int width, unsigned size,
                        const std::source_location& site) {
  check_running(op_name(op));
  Sched& s = g_sched;
  const int me = s.cur;
  const int warp = me / 32, lane = me % 32;
  const unsigned bit = 1u << lane;
  if (!(mask & bit))
    die("%s(mask=0x%08x) at %s:%u:%u: the mask does not include the calling lane %d", op_name(op), mask,
        site.file_name(), site.line(), site.column(), lane);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    die("%s at %s:%u:%u: width %d is not a power of 2 in [1, 32]", op_name(op), site.file_name(), site.line(),
        site.column(), width);
  Warp& w = s.warps[warp];
  const unsigned eff = mask & w.exist;
  int gi = 0;
  for (; gi < w.ngroups; ++gi) {
    const Group& g = w.groups[gi];
    if (!(g.mask & eff)) continue;
    if (is_matrix_op(op) && g.op == op && !same_site(g.site, site))
      die("lane %d of warp %d calls %s at %s:%u:%u while lanes 0x%08x of the warp wait in it at %s:%u:%u; an "
          ".aligned instruction must be executed by all 32 lanes at the same call site (warp-uniform control flow)",
          lane, warp, op_name(op), site.file_name(), site.line(), site.column(), g.arrived, g.site.file_name(),
          g.site.line(), g.site.column());
    if (g.mask != eff || g.op != op || g.size != size)
      die("lane %d of warp %d calls %s(mask=0x%08x, %u-byte value) at %s:%u:%u while lanes 0x%08x of the warp "
          "wait in %s(mask=0x%08x, %u-byte value) at %s:%u:%u; lanes whose masks overlap must call the same "
          "intrinsic with the same mask",
          lane, warp, op_name(op), eff, size, site.file_name(), site.line(), site.column(), g.arrived, op_name(g.op),
          g.mask, g.size, g.site.file_name(), g.site.line(), g.site.column());
    break;
  }
  if (gi == w.ngroups) w.groups[w.ngroups++] = Group{eff, 0, op, size, site};
  Fiber& f = s.fibers[me];
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.state = State::InWarpOp;
  Group& g = w.groups[gi];
  g.arrived |= bit;
  if (g.arrived == g.mask) {
    complete_group(s, warp, gi);
    if (s.order != Schedule::Forward) block_current(s);
  } else {
    block_current(s);
  }
  return f.result;
}

template <class T>
concept WarpValue = sizeof(T) <= 8 && std::is_copy_constructible_v<T>;

// Byte copies through void* because __half2/__nv_bfloat162 are not trivially copyable.
template <class T>
uint64_t to_bits(const T& v) {
  uint64_t b = 0;
  std::memcpy(&b, static_cast<const void*>(&v), sizeof(T));
  return b;
}

template <class T>
T from_bits(uint64_t b, T proto) {
  std::memcpy(static_cast<void*>(&proto), &b, sizeof(T));
  return proto;
}

// The fiber's whole life: run the kernel body once, then hand the CPU to the next ready fiber.
inline void fiber_main() {
  Sched& s = g_sched;
  bool threw = false;
  try {
    (*s.body)();
  } catch (...) {
    s.error = std::current_exception();
    s.error_tid = threadIdx;
    threw = true;
  }
  // Left outside the handler so the C++ runtime's record of the caught exception is closed first.
  if (threw) setcontext(&s.main_ctx);  // abandon the block; launch() rethrows
  s.fibers[s.cur].state = State::Done;
  --s.live;
  // Exited threads no longer count for __syncthreads.
  if (s.bar.waiting > 0 && s.bar.waiting == s.live) release_barrier(s);
  const int next = s.pop();
  if (next >= 0) switch_to(s, next, nullptr);
  if (s.live == 0) setcontext(&s.main_ctx);
  deadlock();
}

inline size_t stack_bytes_from_env() {
  size_t kib = kDefaultStackKiB;
  if (const char* env = std::getenv("FASTAR_SIMT_STACK_KB")) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(env, &end, 10);
    if (end == env || *end != '\0' || v < 16 || v > (1u << 20))
      throw std::runtime_error(std::string("fastar simt: FASTAR_SIMT_STACK_KB='") + env +
                               "' is not an integer in [16, 1048576]");
    kib = size_t(v);
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return (kib * 1024 + page - 1) / page * page;
}

// Stacks are allocated once, on demand, and reused by every later launch.
inline void ensure_fibers(Sched& s, int n) {
  if (!s.fibers) {
    s.stack_bytes = stack_bytes_from_env();
    s.fibers = new Fiber[kMaxThreads];
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (; s.stacks < n; ++s.stacks) {
    // A PROT_NONE guard page below each stack turns an overflow into a SIGSEGV instead of corruption.
    void* mem = mmap(nullptr, s.stack_bytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("fastar simt: cannot allocate a fiber stack");
    mprotect(mem, page, PROT_NONE);
    Fiber& f = s.fibers[s.stacks];
    f.stack = static_cast<unsigned char*>(mem) + page;
    getcontext(&f.ctx);
  }
}

inline void run_block(Sched& s) {
  for (int i = 0; i < s.n; ++i) {
    Fiber& f = s.fibers[i];
    f.state = State::Ready;
    f.async_copies.clear();
    f.async_groups = 0;
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = s.stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (int w = 0; w * 32 < s.n; ++w) {
    const int lanes = std::min(32, s.n - w * 32);
    s.warps[w].exist = lanes == 32 ? ~0u : (1u << lanes) - 1;
    s.warps[w].ngroups = 0;
  }
  s.bar.waiting = 0;
  s.live = s.n;
  s.head = s.queued = 0;
  if (s.race) {
    for (WatchedRegion& r : s.regions) std::fill(r.words.begin(), r.words.end(), WordAccess{});
    s.epoch = 1;
    s.race_report[0] = '\0';
    set_guard(s, true);
  }
  for (int i = 0; i < s.n; ++i) s.push(i);
  switch_to(s, s.pop(), &s.main_ctx);  // returns when every thread has exited or one has thrown
  if (s.race) set_guard(s, false);
}

inline Schedule parse_schedule(const std::string& spec, uint64_t* seed) {
  if (spec == "forward") return Schedule::Forward;
  if (spec == "reverse") return Schedule::Reverse;
  if (spec.rfind("shuffle:", 0) == 0 && spec.size() > 8) {
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = std::strtoull(spec.c_str() + 8, &end, 10);
    if (*end == '\0' && errno == 0 && spec[8] != '-') {
      *seed = v;
      return Schedule::Shuffle;
    }
  }
  throw std::invalid_argument("fastar simt: schedule '" + spec +
                              "' is not 'forward', 'reverse' or 'shuffle:<seed>' (seed a non-negative integer)");
}

// Fills g_config from the environment once; an invalid value throws (std::invalid_argument) at the launch.
inline Config& config() {
  Config& c = g_config;
  if (c.loaded) return c;
  if (const char* env = std::getenv("FASTAR_SIMT_SCHEDULE"); env && *env) c.schedule = parse_schedule(env, &c.seed);
  if (const char* env = std::getenv("FASTAR_SIMT_RACECHECK"); env && *env) {
    const std::string v = env;
    if (v != "0" && v != "1")
      throw std::invalid_argument("fastar simt: FASTAR_SIMT_RACECHECK='" + v + "' is not 0 or 1");
    if (v == "1" && !kRaceCheckSupported)
      throw std::runtime_error("fastar simt: FASTAR_SIMT_RACECHECK=1 needs x86-64 Linux");
    c.race_check = v == "1";
  }
  c.loaded = true;
  return c;
}

inline void watch(WatchedRegion& r, const char* what, unsigned char* base, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(base) % page_bytes() != 0 || bytes % page_bytes() != 0)
    throw std::runtime_error(
        std::string("fastar simt: the race check needs ") + what +
        " to fill whole pages (the __shared__ section is laid out by csrc/simt/shared_section.ld)");
  r.what = what;
  r.base = base;
  r.bytes = bytes;
  r.words.assign(bytes / 4, WordAccess{});
}

inline std::string dim_str(dim3 d) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", d.x, d.y, d.z);
  return buf;
}

inline void validate(const char* name, dim3 grid, dim3 block, size_t smem) {
  const std::string where = std::string("fastar simt: invalid launch of kernel '") + name + "': ";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw std::runtime_error(where + "grid " + dim_str(grid) + " has a zero dimension");
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error(where + "grid " + dim_str(grid) + " exceeds (2^31-1, 65535, 65535)");
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      uint64_t(block.x) * block.y * block.z > uint64_t(kMaxThreads))
    throw std::runtime_error(where + "block " + dim_str(block) +
                             " is invalid (each of x, y <= 1024, z <= 64, 1 to 1024 threads in all)");
  if (smem > kMaxDynamicSmemBytes)
    throw std::runtime_error(where + std::to_string(smem) + " bytes of dynamic shared memory exceed the " +
                             std::to_string(kMaxDynamicSmemBytes) + "-byte limit");
}

}  // namespace detail

// The block's dynamic shared memory: a 16-byte aligned buffer of the launch's size, filled with 0xFF bytes at
// the start of every block so that reading unwritten shared memory shows (NaN for float, -1 for int).
// nullptr when the launch asked for none.
inline void* dynamic_smem() { return detail::g_sched.dyn_smem; }

// The schedule of later launches: "forward" (the default), "reverse" or "shuffle:<seed>"; std::invalid_argument
// for anything else. A kernel without a race gives bit-identical results under every schedule.
inline void set_schedule(const std::string& spec) {
  detail::Config& c = detail::config();
  c.schedule = detail::parse_schedule(spec, &c.seed);
}
inline std::string schedule() {
  const detail::Config& c = detail::config();
  return c.schedule == detail::Schedule::Forward   ? "forward"
         : c.schedule == detail::Schedule::Reverse ? "reverse"
                                                   : "shuffle:" + std::to_string(c.seed);
}

// The race check of later launches (x86-64 Linux; std::runtime_error elsewhere): a launch in which two threads
// access one 4-byte word of shared memory (dynamic or __shared__), one of them writing, with no __syncthreads
// between (nor a __syncwarp over both), or in which a word is accessed while a cp.async into it has not landed,
// throws std::runtime_error naming the kernel, the word, the two threads and the interval. With it on, a
// cp.async also fills its destination with 0xFF at issue.
inline void set_race_check(bool on) {
  if (on && !detail::kRaceCheckSupported)
    throw std::runtime_error("fastar simt: the race check single-steps shared-memory accesses and needs x86-64 Linux");
  detail::config().race_check = on;
}
inline bool race_check() { return detail::config().race_check; }

// Launches per kernel name since the last reset, so tests can tell which kernel ran a case.
inline std::map<std::string, int64_t> launch_counts() {
  std::lock_guard<std::mutex> lock(detail::g_launch_mutex);
  return detail::g_launches;
}
inline void reset_launch_counts() {
  std::lock_guard<std::mutex> lock(detail::g_launch_mutex);
  detail::g_launches.clear();
}

// Runs `body` once per CUDA thread of every block. Throws std::runtime_error for an invalid configuration, a
// launch from inside a kernel, or when `body` throws (the block is abandoned, later launches work normally).
inline void launch(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   std::function<void()> body) {
  using namespace detail;
  validate(kernel_name, grid, block, dynamic_smem_bytes);
  if (tl_launching)
    throw std::runtime_error(std::string("fastar simt: kernel '") + kernel_name +
                             "' launched from inside a kernel; dynamic parallelism is not emulated");
  const Config& cfg = config();
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  ++g_launches[kernel_name];
  Sched& s = g_sched;
  const int n = int(block.x * block.y * block.z);
  ensure_fibers(s, n);

  struct SmemBuffer {  // whole pages, so that the race check can guard them
    size_t bytes;
    unsigned char* p;
    explicit SmemBuffer(size_t n)
        : bytes((n + page_bytes() - 1) / page_bytes() * page_bytes()),
          p(n ? static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(page_bytes()))) : nullptr) {}
    ~SmemBuffer() {
      if (p) ::operator delete(p, std::align_val_t(page_bytes()));
    }
  } smem(dynamic_smem_bytes);
  if (cfg.race_check) {
    watch(s.regions[0], "the dynamic shared memory", smem.p, smem.bytes);
    watch(s.regions[1], "the __shared__ variables", __start_fastar_simt_shared,
          size_t(__stop_fastar_simt_shared - __start_fastar_simt_shared));
  }

  struct Running {  // restores the idle state however the launch ends
    Sched& s;
    ~Running() {
      s.running = false;
      s.body = nullptr;
      s.dyn_smem = nullptr;
      s.error = nullptr;
      if (s.race) {
        if (s.guarded) set_guard(s, false);
        restore_fault_handlers(s);
        s.step = Step{};
      }
      s.race = false;
      tl_launching = false;
    }
  } running{s};
  tl_launching = true;
  s.running = true;
  s.kernel = kernel_name;
  s.body = &body;
  s.n = n;
  s.dyn_smem = smem.p;
  s.order = cfg.schedule;
  s.rng = cfg.seed;
  s.race = cfg.race_check;
  if (s.race) install_fault_handlers(s);
  gridDim = grid;
  blockDim = block;
  for (int i = 0; i < n; ++i)
    s.fibers[i].tid = uint3{unsigned(i) % block.x, unsigned(i) / block.x % block.y, unsigned(i) / (block.x * block.y)};

  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (smem.p) std::memset(smem.p, 0xFF, dynamic_smem_bytes);
        run_block(s);
        if (s.race && s.race_report[0]) throw std::runtime_error(s.race_report);
        if (!s.error) continue;
        std::string what = "a non-standard exception";
        try {
          std::rethrow_exception(s.error);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        const uint3 t = s.error_tid;
        throw std::runtime_error(std::string("fastar simt: kernel '") + kernel_name + "' threw in block " +
                                 dim_str(dim3(x, y, z)) + ", thread " + dim_str(dim3(t.x, t.y, t.z)) + ": " + what);
      }
}

}  // namespace fastar::simt

namespace fastar {
template <typename... KArgs, typename... Args>
void launch_kernel(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t /*stream: one CPU thread runs everything in order*/, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  // Each thread calls the kernel with its own by-value copies of the arguments, as on a GPU.
  simt::launch(name, grid, block, smem, [&] { kernel(args...); });
}
}  // namespace fastar

// ---------------------------------------------------------------------------------------------------------------
// Synchronisation. The call site is recorded to diagnose divergent barriers and deadlocks.

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  fastar::simt::detail::block_barrier(0, site);
}
inline int __syncthreads_count(int predicate, std::source_location site = std::source_location::current()) {
  return int(fastar::simt::detail::block_barrier(predicate, site) >> 32);
}
inline int __syncthreads_and(int predicate, std::source_location site = std::source_location::current()) {
  const uint64_t r = fastar::simt::detail::block_barrier(predicate, site);
  return (r >> 32) == (r & 0xffffffffu);
}
inline int __syncthreads_or(int predicate, std::source_location site = std::source_location::current()) {
  return (fastar::simt::detail::block_barrier(predicate, site) >> 32) != 0;
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location site = std::source_location::current()) {
  fastar::simt::detail::warp_op(fastar::simt::detail::Op::SyncWarp, mask, 0, 0, 32, 0, site);
}

// x86 ordering is stronger than the GPU's, so fences only have to stop compiler reordering.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

[[noreturn]] inline void __trap() { fastar::simt::detail::die("__trap() called"); }

// ---------------------------------------------------------------------------------------------------------------
// Warp intrinsics: any value of at most 8 bytes (int, unsigned, long long, float, double, __half, __half2,
// __nv_bfloat16, ...). `width` partitions the warp as on a GPU.

template <class T>
  requires fastar::simt::detail::WarpValue<T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                     std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return from_bits(warp_op(Op::ShflIdx, mask, to_bits(var), srcLane, width, sizeof(T), site), var);
}
template <class T>
  requires fastar::simt::detail::WarpValue<T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return from_bits(warp_op(Op::ShflUp, mask, to_bits(var), int(delta), width, sizeof(T), site), var);
}
template <class T>
  requires fastar::simt::detail::WarpValue<T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return from_bits(warp_op(Op::ShflDown, mask, to_bits(var), int(delta), width, sizeof(T), site), var);
}
template <class T>
  requires fastar::simt::detail::WarpValue<T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return from_bits(warp_op(Op::ShflXor, mask, to_bits(var), laneMask, width, sizeof(T), site), var);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::Ballot, mask, predicate != 0, 0, 32, 4, site));
}
inline int __any_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return int(warp_op(Op::Any, mask, predicate != 0, 0, 32, 4, site));
}
inline int __all_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return int(warp_op(Op::All, mask, predicate != 0, 0, 32, 4, site));
}

// sm_80 warp reductions.
inline int __reduce_add_sync(unsigned mask, int value, std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return int(uint32_t(warp_op(Op::AddI, mask, uint32_t(value), 0, 32, 4, site)));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned value,
                                  std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::AddI, mask, value, 0, 32, 4, site));
}
inline int __reduce_min_sync(unsigned mask, int value, std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return int(uint32_t(warp_op(Op::MinI, mask, uint32_t(value), 0, 32, 4, site)));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value,
                                  std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::MinU, mask, value, 0, 32, 4, site));
}
inline int __reduce_max_sync(unsigned mask, int value, std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return int(uint32_t(warp_op(Op::MaxI, mask, uint32_t(value), 0, 32, 4, site)));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value,
                                  std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::MaxU, mask, value, 0, 32, 4, site));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned value,
                                  std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::And, mask, value, 0, 32, 4, site));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value,
                                 std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::Or, mask, value, 0, 32, 4, site));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned value,
                                  std::source_location site = std::source_location::current()) {
  using namespace fastar::simt::detail;
  return unsigned(warp_op(Op::Xor, mask, value, 0, 32, 4, site));
}

// ---------------------------------------------------------------------------------------------------------------
// sm_80 warp-level matrix instructions and cp.async. Kernels reach them through the wrappers of
// csrc/cuda/tensor_core.cuh, which are inline PTX under nvcc; the call site names the kernel's line.

namespace fastar::simt {

namespace detail {
inline void matrix_op(Op op, const void* operands, const std::source_location& site) {
  check_running(op_name(op));
  const Sched& s = g_sched;
  const int warp = s.cur / 32;
  if (s.warps[warp].exist != ~0u)
    die("%s at %s:%u:%u needs all 32 lanes of the warp, but warp %d of this block has only %d threads", op_name(op),
        site.file_name(), site.line(), site.column(), warp, std::popcount(s.warps[warp].exist));
  warp_op(op, ~0u, reinterpret_cast<uintptr_t>(operands), 0, 32, 0, site);
}

inline Fiber& current_fiber() { return g_sched.fibers[g_sched.cur]; }
}  // namespace detail

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d = a * b + c over the warp, PTX fragment layouts.
inline void mma_m16n8k16(bool bf16, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                         const std::source_location& site) {
  using namespace detail;
  const MmaOperands o{d, a, b, c};
  matrix_op(bf16 ? Op::MmaBf16 : Op::MmaF16, &o, site);
}

// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16 into r[0..count). The rows lanes 0..8*count-1 address
// must be 16-byte aligned; the other lanes' addresses are ignored.
inline void ldmatrix(int count, bool trans, uint32_t* r, const void* row, const std::source_location& site) {
  using namespace detail;
  static constexpr Op kOps[2][3] = {{Op::Ldmatrix1, Op::Ldmatrix2, Op::Ldmatrix4},
                                    {Op::Ldmatrix1T, Op::Ldmatrix2T, Op::Ldmatrix4T}};
  const Op op = kOps[trans][count == 1 ? 0 : count == 2 ? 1 : 2];
  check_running(op_name(op));
  const int lane = g_sched.cur % 32;
  if (lane < 8 * count && reinterpret_cast<uintptr_t>(row) % 16 != 0)
    die("%s at %s:%u:%u: lane %d's row address %p is not 16-byte aligned", op_name(op), site.file_name(), site.line(),
        site.column(), lane, row);
  const LdmatrixOperands o{row, r};
  matrix_op(op, &o, site);
}

// cp.async of `size` (4, 8, 16) bytes: reads src_bytes (<= size) bytes of src now, zero-fills the rest, and
// writes dst only at the cp_async_wait that covers its group. dst and src must be aligned to `size`.
inline void cp_async(void* dst, const void* src, int size, int src_bytes, const std::source_location& site) {
  using namespace detail;
  check_running("cp.async");
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0)
    die("cp.async of %d bytes at %s:%u:%u: dst %p and src %p must both be %d-byte aligned", size, site.file_name(),
        site.line(), site.column(), dst, src, size);
  if (src_bytes < 0 || src_bytes > size)
    die("cp.async of %d bytes at %s:%u:%u: src-size %d is outside [0, %d]", size, site.file_name(), site.line(),
        site.column(), src_bytes, size);
  Sched& s = g_sched;
  Fiber& f = current_fiber();
  AsyncCopy c{dst, {}, size, f.async_groups};
  std::memcpy(c.bytes, src, size_t(src_bytes));
  f.async_copies.push_back(c);
  if (s.race) {  // the destination is written, and undefined, until the wait
    note_range(s, dst, size_t(size), s.cur, true);
    mark_pending(s, dst, size_t(size), s.cur);
    const Unguarded open;
    std::memset(dst, 0xFF, size_t(size));
  }
}

// cp.async.commit_group: the copies issued since the last commit form the next group.
inline void cp_async_commit() {
  detail::check_running("cp.async.commit_group");
  ++detail::current_fiber().async_groups;
}

// cp.async.wait_group n: lands, in issue order, every copy of all committed groups but the n most recent.
inline void cp_async_wait(int n) {
  using namespace detail;
  check_running("cp.async.wait_group");
  Sched& s = g_sched;
  Fiber& f = current_fiber();
  const int covered = f.async_groups - n;
  const Unguarded open;
  size_t kept = 0;
  for (const AsyncCopy& c : f.async_copies) {
    if (c.group >= covered) {
      f.async_copies[kept++] = c;
      continue;
    }
    if (s.race) {
      mark_pending(s, c.dst, size_t(c.size), -1);
      note_range(s, c.dst, size_t(c.size), s.cur, true);
    }
    std::memcpy(c.dst, c.bytes, size_t(c.size));
  }
  f.async_copies.resize(kept);
}

// ld.global.v4 (one 16-byte vector load from global memory): the address must be 16-byte aligned, or a GPU
// faults with a misaligned address.
inline uint4 load_global16(const void* p, const std::source_location& site) {
  using namespace detail;
  check_running("ld.global.v4");
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    die("16-byte global load at %s:%u:%u: address %p is not 16-byte aligned", site.file_name(), site.line(),
        site.column(), p);
  uint4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace fastar::simt

// ---------------------------------------------------------------------------------------------------------------
// Atomics (CUDA signatures; they return the old value).

namespace fastar::simt::detail {
template <class T, class F>
T atomic_update(T* address, F f) {
  const Unguarded open;  // atomics are exempt from the race check
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, f(old))) {
  }
  return old;
}
}  // namespace fastar::simt::detail

#define FASTAR_SIMT_ATOMIC_FETCH(fn, T, method)      \
  inline T fn(T* address, T val) {                   \
    const fastar::simt::detail::Unguarded open;      \
    return std::atomic_ref<T>(*address).method(val); \
  }
FASTAR_SIMT_ATOMIC_FETCH(atomicAdd, int, fetch_add)
FASTAR_SIMT_ATOMIC_FETCH(atomicAdd, unsigned int, fetch_add)
FASTAR_SIMT_ATOMIC_FETCH(atomicAdd, unsigned long long, fetch_add)
FASTAR_SIMT_ATOMIC_FETCH(atomicAdd, float, fetch_add)
FASTAR_SIMT_ATOMIC_FETCH(atomicAdd, double, fetch_add)
FASTAR_SIMT_ATOMIC_FETCH(atomicSub, int, fetch_sub)
FASTAR_SIMT_ATOMIC_FETCH(atomicSub, unsigned int, fetch_sub)
FASTAR_SIMT_ATOMIC_FETCH(atomicExch, int, exchange)
FASTAR_SIMT_ATOMIC_FETCH(atomicExch, unsigned int, exchange)
FASTAR_SIMT_ATOMIC_FETCH(atomicExch, unsigned long long, exchange)
FASTAR_SIMT_ATOMIC_FETCH(atomicExch, float, exchange)
FASTAR_SIMT_ATOMIC_FETCH(atomicOr, int, fetch_or)
FASTAR_SIMT_ATOMIC_FETCH(atomicOr, unsigned int, fetch_or)
FASTAR_SIMT_ATOMIC_FETCH(atomicOr, unsigned long long, fetch_or)
FASTAR_SIMT_ATOMIC_FETCH(atomicAnd, int, fetch_and)
FASTAR_SIMT_ATOMIC_FETCH(atomicAnd, unsigned int, fetch_and)
FASTAR_SIMT_ATOMIC_FETCH(atomicAnd, unsigned long long, fetch_and)
FASTAR_SIMT_ATOMIC_FETCH(atomicXor, int, fetch_xor)
FASTAR_SIMT_ATOMIC_FETCH(atomicXor, unsigned int, fetch_xor)
FASTAR_SIMT_ATOMIC_FETCH(atomicXor, unsigned long long, fetch_xor)
#undef FASTAR_SIMT_ATOMIC_FETCH

#define FASTAR_SIMT_ATOMIC_MINMAX(T)                                                                  \
  inline T atomicMin(T* address, T val) {                                                             \
    return fastar::simt::detail::atomic_update(address, [val](T old) { return std::min(old, val); }); \
  }                                                                                                   \
  inline T atomicMax(T* address, T val) {                                                             \
    return fastar::simt::detail::atomic_update(address, [val](T old) { return std::max(old, val); }); \
  }
FASTAR_SIMT_ATOMIC_MINMAX(int)
FASTAR_SIMT_ATOMIC_MINMAX(unsigned int)
FASTAR_SIMT_ATOMIC_MINMAX(long long)
FASTAR_SIMT_ATOMIC_MINMAX(unsigned long long)
#undef FASTAR_SIMT_ATOMIC_MINMAX

#define FASTAR_SIMT_ATOMIC_CAS(T)                                       \
  inline T atomicCAS(T* address, T compare, T val) {                    \
    const fastar::simt::detail::Unguarded open;                         \
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, val); \
    return compare;                                                     \
  }
FASTAR_SIMT_ATOMIC_CAS(int)
FASTAR_SIMT_ATOMIC_CAS(unsigned int)
FASTAR_SIMT_ATOMIC_CAS(unsigned long long)
FASTAR_SIMT_ATOMIC_CAS(unsigned short)
#undef FASTAR_SIMT_ATOMIC_CAS

inline unsigned int atomicInc(unsigned int* address, unsigned int val) {
  return fastar::simt::detail::atomic_update(address, [val](unsigned old) { return old >= val ? 0u : old + 1; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int val) {
  return fastar::simt::detail::atomic_update(address,
                                             [val](unsigned old) { return old == 0 || old > val ? val : old - 1; });
}
inline __half atomicAdd(__half* address, __half val) {
  return fastar::simt::detail::atomic_update(address, [val](__half old) { return __hadd(old, val); });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 val) {
  return fastar::simt::detail::atomic_update(address, [val](__nv_bfloat16 old) { return __hadd(old, val); });
}

// ---------------------------------------------------------------------------------------------------------------
// Loads and stores with cache hints: plain accesses.

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline T __ldca(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline T __ldlu(const T* p) {
  return *p;
}
template <class T>
inline T __ldcv(const T* p) {
  return *p;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stwb(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stwt(T* p, T v) {
  *p = v;
}

// ---------------------------------------------------------------------------------------------------------------
// Float intrinsics. The fast-math ones are computed exactly here; the GPU's are a few ulp off.

inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752); }
inline float sinpif(float x) { return float(std::sin(3.14159265358979323846 * double(x))); }
inline float cospif(float x) { return float(std::cos(3.14159265358979323846 * double(x))); }
inline float __saturatef(float x) { return std::isnan(x) ? 0.0f : std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// ---------------------------------------------------------------------------------------------------------------
// Conversions. Float-to-integer saturates and maps NaN to 0, as the GPU does.

namespace fastar::simt::detail {
template <class I, class F>
I saturate_to(F r) {
  if (std::isnan(r)) return 0;
  if (static_cast<long double>(r) < static_cast<long double>(std::numeric_limits<I>::min()))
    return std::numeric_limits<I>::min();
  if (static_cast<long double>(r) >= static_cast<long double>(std::numeric_limits<I>::max()) + 1.0L)
    return std::numeric_limits<I>::max();
  return static_cast<I>(r);
}
}  // namespace fastar::simt::detail

inline int __float2int_rn(float x) { return fastar::simt::detail::saturate_to<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return fastar::simt::detail::saturate_to<int>(std::trunc(x)); }
inline int __float2int_rd(float x) { return fastar::simt::detail::saturate_to<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return fastar::simt::detail::saturate_to<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return fastar::simt::detail::saturate_to<unsigned>(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return fastar::simt::detail::saturate_to<unsigned>(std::trunc(x)); }
inline long long __float2ll_rn(float x) { return fastar::simt::detail::saturate_to<long long>(std::nearbyint(x)); }
inline long long __float2ll_rz(float x) { return fastar::simt::detail::saturate_to<long long>(std::trunc(x)); }
inline int __double2int_rn(double x) { return fastar::simt::detail::saturate_to<int>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline float __double2float_rn(double x) { return float(x); }

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// ---------------------------------------------------------------------------------------------------------------
// Integer intrinsics.

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = (x >> 1 & 0x55555555u) | (x & 0x55555555u) << 1;
  x = (x >> 2 & 0x33333333u) | (x & 0x33333333u) << 2;
  x = (x >> 4 & 0x0f0f0f0fu) | (x & 0x0f0f0f0fu) << 4;
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (unsigned long long)__brev(unsigned(x)) << 32 | __brev(unsigned(x >> 32));
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline int __mulhi(int a, int b) { return int((long long)a * b >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)((unsigned __int128)a * b >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)((__int128)a * b >> 64); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long bytes = (unsigned long long)y << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned(bytes >> ((s >> (4 * i) & 7) * 8) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned(((unsigned long long)hi << 32 | lo) << (shift & 31) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned(((unsigned long long)hi << 32 | lo) >> (shift & 31));
}

// CUDA's global min/max overloads (same set as crt/math_functions.hpp: mixed signedness compares unsigned).
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(unsigned(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, unsigned(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long min(long a, unsigned long b) { return min((unsigned long)a, b); }
inline unsigned long min(unsigned long a, long b) { return min(a, (unsigned long)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long min(long long a, unsigned long long b) { return min((unsigned long long)a, b); }
inline unsigned long long min(unsigned long long a, long long b) { return min(a, (unsigned long long)b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned max(int a, unsigned b) { return max(unsigned(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, unsigned(b)); }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long max(long a, unsigned long b) { return max((unsigned long)a, b); }
inline unsigned long max(unsigned long a, long b) { return max(a, (unsigned long)b); }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long max(long long a, unsigned long long b) { return max((unsigned long long)a, b); }
inline unsigned long long max(unsigned long long a, long long b) { return max(a, (unsigned long long)b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }
inline unsigned umin(unsigned a, unsigned b) { return min(a, b); }
inline unsigned umax(unsigned a, unsigned b) { return max(a, b); }
inline long long llmin(long long a, long long b) { return min(a, b); }
inline long long llmax(long long a, long long b) { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }

// ---------------------------------------------------------------------------------------------------------------
// __half / __nv_bfloat16 math that cuda_fp16.h / cuda_bf16.h only define for device code. Computed in float and
// rounded once (the GPU's approximations can differ by an ulp). __hfma rounds a double a*b+c once, which is
// exact for __half; for __nv_bfloat16 only exponent gaps beyond 2^37 could round twice.

#define FASTAR_SIMT_LOW_PRECISION_MATH(T, to_float, from_float, from_double)             \
  inline T hexp(T x) { return from_float(std::exp(to_float(x))); }                       \
  inline T hexp2(T x) { return from_float(std::exp2(to_float(x))); }                     \
  inline T hlog(T x) { return from_float(std::log(to_float(x))); }                       \
  inline T hlog2(T x) { return from_float(std::log2(to_float(x))); }                     \
  inline T hsqrt(T x) { return from_float(std::sqrt(to_float(x))); }                     \
  inline T hrsqrt(T x) { return from_float(1.0f / std::sqrt(to_float(x))); }             \
  inline T hrcp(T x) { return from_float(1.0f / to_float(x)); }                          \
  inline T hsin(T x) { return from_float(std::sin(to_float(x))); }                       \
  inline T hcos(T x) { return from_float(std::cos(to_float(x))); }                       \
  inline T htanh(T x) { return from_float(std::tanh(to_float(x))); }                     \
  inline T hfloor(T x) { return from_float(std::floor(to_float(x))); }                   \
  inline T hceil(T x) { return from_float(std::ceil(to_float(x))); }                     \
  inline T htrunc(T x) { return from_float(std::trunc(to_float(x))); }                   \
  inline T hrint(T x) { return from_float(std::nearbyint(to_float(x))); }                \
  inline T __hfma(T a, T b, T c) {                                                       \
    return from_double(double(to_float(a)) * double(to_float(b)) + double(to_float(c))); \
  }
FASTAR_SIMT_LOW_PRECISION_MATH(__half, __half2float, __float2half_rn, __double2half)
FASTAR_SIMT_LOW_PRECISION_MATH(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn, __double2bfloat16)
#undef FASTAR_SIMT_LOW_PRECISION_MATH

inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(__hfma(__low2half(a), __low2half(b), __low2half(c)),
                        __hfma(__high2half(a), __high2half(b), __high2half(c)));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __halves2bfloat162(__hfma(__low2bfloat16(a), __low2bfloat16(b), __low2bfloat16(c)),
                            __hfma(__high2bfloat16(a), __high2bfloat16(b), __high2bfloat16(c)));
}

#endif  // __CUDACC__
