// A CUDA runtime on the host, for tests: csrc/dense_cuda.cu compiled by the
// host compiler against this header (found as <cuda_runtime.h>, ahead of any
// toolkit) runs its kernels on CPU memory, so that their indexing, vector
// plans, reductions and launches are checked against eager PyTorch on a
// machine without a GPU (tests/emulated_cuda.py builds it).
//
// A launch runs its blocks one after another. A block's threads are fibers
// (a stack each), switched only where CUDA threads meet: __syncthreads and the
// warp shuffles. Between two such points a thread runs alone, so a missing
// barrier shows as a result that depends on the order the threads run in:
// FASTRES_EMULATOR_ORDER=reverse runs them last to first. When the first
// block meets neither, the other blocks' threads run as plain calls (a
// kernel that then reaches a barrier fails its launch: never a wrong result).
//
// What a GPU would fault on is a launch error (cudaGetLastError): a 16- or
// 8-byte vector access that is not aligned to its size, a barrier or a
// full-warp shuffle that some thread of the block (warp) never reaches, an
// invalid launch configuration. The device is one GPU with
// FASTRES_EMULATOR_SMS multiprocessors (default 1: small grids, so
// that small tests take several iterations of the grid-stride loops).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

// ---- the runtime API's types ----

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace fastres_emulator {
inline void check_aligned(const void* p, std::size_t bytes);
}

// The vector types that move 8 and 16 bytes in one access: a copy from
// memory (how dense_cuda.cu loads them) checks the address's alignment.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) {
    fastres_emulator::check_aligned(&o, sizeof o);
    std::memcpy(static_cast<void*>(this), &o, sizeof o);
  }
  uint4& operator=(const uint4& o) {
    std::memcpy(static_cast<void*>(this), &o, sizeof o);
    return *this;
  }
};

struct alignas(8) uint2 {
  unsigned x, y;
  uint2() = default;
  uint2(const uint2& o) {
    fastres_emulator::check_aligned(&o, sizeof o);
    std::memcpy(static_cast<void*>(this), &o, sizeof o);
  }
  uint2& operator=(const uint2& o) {
    std::memcpy(static_cast<void*>(this), &o, sizeof o);
    return *this;
  }
};

// ---- the emulated device ----

namespace fastres_emulator {

// Switching between a block's threads: a few instructions on x86-64 (callee-
// saved registers and the stack pointer; a fiber switch through ucontext
// costs two system calls), ucontext elsewhere.
#if defined(__x86_64__)
// switch_stack(&save, load): saves this context's stack pointer in *save and resumes load's.
asm(R"(
  .text
  .p2align 4
fastres_emulator_switch_stack:
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
)");
extern "C" void fastres_emulator_switch_stack(void** save, void* load) asm("fastres_emulator_switch_stack");

struct Context {
  void* sp = nullptr;
};

// A context that starts fn() on stack [base, base + bytes); fn must not return.
inline void start(Context& c, char* base, std::size_t bytes, void (*fn)()) {
  auto top = reinterpret_cast<std::uintptr_t>(base + bytes) & ~std::uintptr_t(15);
  auto* slot = reinterpret_cast<std::uint64_t*>(top);
  *--slot = 0;                                     // fn's return address (never used): fn enters 16n+8 aligned
  *--slot = reinterpret_cast<std::uint64_t>(fn);   // where switch_stack returns to
  for (int r = 0; r < 6; ++r) *--slot = 0;         // rbp rbx r12 r13 r14 r15
  *--slot = 0x1F80 | (std::uint64_t(0x037F) << 32);  // MXCSR and the x87 control word at reset
  c.sp = slot;
}

inline void swap(Context& from, Context& to) { fastres_emulator_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

inline void start(Context& c, char* base, std::size_t bytes, void (*fn)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
}

inline void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 256 * 1024;

struct Thread {
  Context context;
  uint3 index;
  bool done;
  std::uint64_t barriers, shuffles;  // how many of each this thread has passed or entered
};

// Per OS thread: the launch being run, one block at a time.
struct Device {
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  std::vector<std::uint64_t> lanes;  // shuffle slots: [warps][2][kWarp], by parity of the shuffle
  Context scheduler;
  const std::function<void()>* body = nullptr;
  dim3 grid, block;
  uint3 block_index{};
  int current = -1;
  bool progressed = false;
  bool synced = false;  // the block met a barrier or a shuffle
  int arrived[2] = {0, 0};  // threads at the block's barriers (syncthreads)
  bool direct = false;  // threads run as plain calls (no fibers): faults leave through escape
  jmp_buf escape;
  cudaError_t error = cudaSuccess;  // the launch's fault (sticky until cudaGetLastError)
  std::string detail;               // what faulted, for cudaGetErrorString
};

inline Device& device() {
  static thread_local Device d;
  return d;
}

inline int sm_count() {
  const char* env = std::getenv("FASTRES_EMULATOR_SMS");
  const int sms = env ? std::atoi(env) : 1;
  return sms > 0 ? sms : 1;
}

inline bool reverse_order() {
  const char* env = std::getenv("FASTRES_EMULATOR_ORDER");
  return env != nullptr && std::strcmp(env, "reverse") == 0;
}

// Ends the launch with err: the faulting thread is abandoned, as the GPU abandons a faulting grid.
[[noreturn]] inline void fault(cudaError_t err, const std::string& what) {
  Device& d = device();
  if (d.current < 0) {
    std::fprintf(stderr, "cuda emulator: %s outside a kernel\n", what.c_str());
    std::abort();
  }
  d.error = err;
  d.detail = what;
  if (d.direct) longjmp(d.escape, 1);
  swap(d.threads[d.current].context, d.scheduler);
  std::abort();  // never resumed
}

inline void meet(const char* what) {
  Device& d = device();
  if (d.direct)
    fault(cudaErrorLaunchFailure,
          std::string("emulator: a thread of a later block reached ") + what +
              ", which no thread of the first block did");
  d.synced = true;
}

inline void check_aligned(const void* p, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    char what[160];
    std::snprintf(what, sizeof what, "misaligned address: a %zu-byte access at %p", bytes, p);
    fault(cudaErrorMisalignedAddress, what);
  }
}

inline Thread& self() { return device().threads[device().current]; }

// Back to the scheduler until it resumes this thread.
inline void yield() {
  Device& d = device();
  const int me = d.current;
  swap(d.threads[me].context, d.scheduler);
}

inline int linear(const uint3& t, const dim3& b) { return int(t.x + b.x * (t.y + b.y * t.z)); }

inline void syncthreads() {
  meet("__syncthreads");
  Device& d = device();
  Thread& t = self();
  // Arrivals counted per barrier, in two slots by parity: the last to arrive
  // clears the other slot, which no thread can reach before this barrier opens.
  const int slot = int(++t.barriers % 2);
  if (++d.arrived[slot] == int(d.threads.size())) d.arrived[1 - slot] = 0;
  d.progressed = true;
  while (d.arrived[slot] < int(d.threads.size())) yield();  // a thread that exited: no progress
  d.progressed = true;
}

// Every lane of the warp writes its value, then reads lane src(lane)'s.
template <typename T, class Src>
T shuffle(unsigned mask, T v, Src src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a shuffle moves <= 8 bytes");
  if (mask != 0xffffffffu) fault(cudaErrorLaunchFailure, "shuffle: only full-warp masks are emulated");
  meet("a warp shuffle");
  Device& d = device();
  Thread& t = self();
  const int id = linear(t.index, d.block), warp = id / kWarp, lane = id % kWarp;
  const int first = warp * kWarp;
  if (first + kWarp > int(d.threads.size()))
    fault(cudaErrorLaunchFailure, "shuffle: the block's last warp is partial");
  std::uint64_t* slots = &d.lanes[(std::size_t(warp) * 2 + t.shuffles % 2) * kWarp];
  std::uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof v);
  slots[lane] = raw;
  const std::uint64_t target = ++t.shuffles;
  d.progressed = true;
  for (;;) {
    bool all = true;
    for (int i = first; i < first + kWarp; ++i) {
      if (d.threads[i].shuffles >= target) continue;
      if (d.threads[i].done)
        fault(cudaErrorLaunchFailure, "shuffle (full mask): a lane of the warp exited before it");
      all = false;
    }
    if (all) break;
    yield();
  }
  d.progressed = true;
  const int from = src(lane);
  T out;
  std::memcpy(&out, &slots[from >= 0 && from < kWarp ? from : lane], sizeof out);
  return out;
}

inline void entry() {
  Device& d = device();
  (*d.body)();
  Thread& t = d.threads[d.current];
  t.done = true;
  d.progressed = true;
  swap(t.context, d.scheduler);  // never resumed
  std::abort();
}

// Runs every thread of the current block to its end (or to a fault).
inline void run_block() {
  Device& d = device();
  const int n = int(d.threads.size());
  const bool reverse = reverse_order();
  for (int i = 0; i < n; ++i) {
    Thread& t = d.threads[i];
    t.done = false;
    t.barriers = t.shuffles = 0;
    t.index = uint3{unsigned(i) % d.block.x, (unsigned(i) / d.block.x) % d.block.y,
                    unsigned(i) / (d.block.x * d.block.y)};
  }
  d.arrived[0] = d.arrived[1] = 0;
  if (d.direct) {
    for (int k = 0; k < n && d.error == cudaSuccess; ++k) {
      d.current = reverse ? n - 1 - k : k;
      if (setjmp(d.escape) == 0) (*d.body)();
    }
    d.current = -1;
    return;
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = d.threads[i];
    start(t.context, d.stacks[i].data(), d.stacks[i].size(), entry);
  }
  for (;;) {
    bool live = false;
    d.progressed = false;
    for (int k = 0; k < n && d.error == cudaSuccess; ++k) {
      const int i = reverse ? n - 1 - k : k;
      if (d.threads[i].done) continue;
      live = true;
      d.current = i;
      swap(d.scheduler, d.threads[i].context);
    }
    d.current = -1;
    if (d.error != cudaSuccess || !live) return;
    if (!d.progressed) {  // every running thread waits at a barrier or a shuffle
      bool exited = false;
      for (const Thread& t : d.threads) exited = exited || t.done;
      d.error = cudaErrorLaunchFailure;
      d.detail = exited ? "__syncthreads: a thread of the block exited before it"  // (shuffles check)
                        : "deadlock: every running thread waits at a barrier or a shuffle";
      return;
    }
  }
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  Device& d = device();
  if (d.error != cudaSuccess) return;  // a fault is sticky: later launches do not run
  const unsigned long threads = (unsigned long)block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > 1024) {
    d.error = cudaErrorInvalidConfiguration;
    d.detail = "invalid configuration argument (grid or block size)";
    return;
  }
  d.threads.resize(threads);
  if (d.stacks.size() < threads) d.stacks.resize(threads, std::vector<char>(kStackBytes));
  d.lanes.assign((threads + kWarp - 1) / kWarp * 2 * kWarp, 0);
  d.grid = grid;
  d.block = block;
  d.body = &body;
  d.direct = d.synced = false;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x && d.error == cudaSuccess; ++x) {
        d.block_index = uint3{x, y, z};
        run_block();
        d.direct = !d.synced;  // after the first block: fibers only where threads meet
      }
  d.body = nullptr;
  d.direct = false;
}

// kernel<<<grid, block>>>(args...): FASTRES_LAUNCH(kernel, grid, block, stream)(args...).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... args) const {
    const std::function<void()> body = [&] { kernel(args...); };
    launch(grid, block, body);
  }
};

template <typename... P>
Launch<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block) {
  return {kernel, grid, block};
}

}  // namespace fastres_emulator

#define FASTRES_LAUNCH(kernel, grid, block, stream) ::fastres_emulator::launcher(kernel, grid, block)

// ---- what kernels see ----

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one block runs at a time per OS thread

#define threadIdx (::fastres_emulator::self().index)
#define blockIdx (::fastres_emulator::device().block_index)
#define blockDim (::fastres_emulator::device().block)
#define gridDim (::fastres_emulator::device().grid)

inline void __syncthreads() { fastres_emulator::syncthreads(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  return fastres_emulator::shuffle(mask, v, [delta](int lane) { return lane + int(delta); });
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return fastres_emulator::shuffle(mask, v, [lane_mask](int lane) { return lane ^ lane_mask; });
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((std::uint64_t(a) * std::uint64_t(b)) >> 32);
}

template <typename R>
void __stwb(R* p, R v) {
  fastres_emulator::check_aligned(p, sizeof(R));
  std::memcpy(static_cast<void*>(p), &v, sizeof(R));
}

// ---- the runtime API ----

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = fastres_emulator::sm_count();
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  fastres_emulator::Device& d = fastres_emulator::device();
  const cudaError_t err = d.error;
  d.error = cudaSuccess;
  return err;
}

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: {
      const std::string& detail = fastres_emulator::device().detail;
      return detail.empty() ? "unspecified launch failure" : detail.c_str();
    }
  }
}
