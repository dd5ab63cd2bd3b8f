// The scheduler behind cuda_emu.h: grids of blocks on a few OS threads, a block's CUDA threads
// as fibers (own stacks, switched by a few instructions of x86-64 assembly) on one of them,
// barriers and warp collectives as scheduling points,
// per-block shared memory, device profiles, and a log of launches for the tests.
#include "cuda_emu.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FVDM_EMU_ASAN 1
#endif

// Fiber switch: saves the callee-saved registers on the current stack, stores the stack
// pointer to *save_sp, and continues on new_sp. A few instructions, against ucontext's
// swapcontext which makes a system call (the signal mask) on every switch.
extern "C" void fvdm_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl fvdm_emu_switch
.hidden fvdm_emu_switch
.type fvdm_emu_switch,@function
fvdm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size fvdm_emu_switch,.-fvdm_emu_switch
)");

namespace fvdm::emu {

thread_local const ThreadDims* tl_dims = nullptr;

namespace {

// ---------------------------------------------------------------------------------------------
// profiles and settings

const Profile kProfiles[] = {
    // name, SMs, shared-memory opt-in per block (bytes), compute capability
    {"sm_75", 40, 64 * 1024, 7, 5},           // T4: no mma.sync m16n8k16 -> generic kernels
    {"sm_80", 108, 163 * 1024, 8, 0},         // A100
    {"sm_90", 132, 227 * 1024, 9, 0},         // H100 / H200
    {"sm_80_small", 2, 48 * 1024, 8, 0},      // tiny GPU: few chunks per reduction, smem-limited tiles
};

struct Settings {
  const Profile* profile = &kProfiles[2];
  int order = 0;  // 0 forward, 1 reverse, >= 2: warps shuffled with this seed
  int workers = 2;
};
Settings g_settings;
std::mutex g_log_mutex;
std::vector<std::string> g_log;

// ---------------------------------------------------------------------------------------------
// fibers

constexpr size_t kStackBytes = 256 * 1024;

enum class State { Ready, AtWarp, AtBlock, Done };

struct Lane {
  void* sp = nullptr;  // saved stack pointer while switched out
  char* stack = nullptr;
  State state = State::Ready;
  unsigned mask = 0;          // mask of the collective the lane waits at
  const char* what = nullptr; // which collective
  unsigned seq = 0;           // collectives this lane has completed
  ThreadDims dims;
#ifdef FVDM_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Block {
  std::vector<Lane> lanes;
  int nwarps = 0;
  // Two generations of warp-collective slots: a lane can be at most one collective ahead of
  // the slowest lane of its mask, so the slot it writes is never one still being read.
  std::vector<uint32_t> slots;  // [parity][warp][lane][kWords]
  std::vector<std::pair<const void*, void*>> shared;
  std::vector<size_t> shared_bytes;
  void* dynamic = nullptr;
  KernelBody body{};
  void* sched_sp = nullptr;
  Lane* current = nullptr;
  std::string error;
#ifdef FVDM_EMU_ASAN
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

thread_local Block* tl_block = nullptr;

void switch_to_scheduler(Lane& lane, bool dying) {
  Block& blk = *tl_block;
#ifdef FVDM_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &lane.fake_stack, blk.sched_stack_bottom, blk.sched_stack_size);
#else
  (void)dying;
#endif
  fvdm_emu_switch(&lane.sp, blk.sched_sp);
#ifdef FVDM_EMU_ASAN
  __sanitizer_finish_switch_fiber(lane.fake_stack, &blk.sched_stack_bottom, &blk.sched_stack_size);
#endif
}

void lane_main() {
  Block& blk = *tl_block;
  Lane& lane = *blk.current;
#ifdef FVDM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &blk.sched_stack_bottom, &blk.sched_stack_size);
#endif
  try {
    blk.body.call(blk.body.obj);
  } catch (const std::exception& e) {
    if (blk.error.empty()) {
      std::ostringstream os;
      os << "thread (" << lane.dims.thread_idx.x << "," << lane.dims.thread_idx.y << "," << lane.dims.thread_idx.z
         << "): " << e.what();
      blk.error = os.str();
    }
  }
  lane.state = State::Done;
  switch_to_scheduler(lane, /*dying=*/true);
  std::abort();  // a finished lane is never resumed
}

void resume(Block& blk, Lane& lane) {
  blk.current = &lane;
  tl_dims = &lane.dims;
#ifdef FVDM_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, lane.stack, kStackBytes);
#endif
  fvdm_emu_switch(&blk.sched_sp, lane.sp);
#ifdef FVDM_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  tl_dims = nullptr;
}

// The lanes of warp `w` whose collective can complete: every lane of the mask waits at a
// collective with the same mask. Throws on lanes that diverged into different collectives or
// left the kernel while the others wait for them.
bool release_warp(Block& blk, int w) {
  bool released = false;
  const int first = w * 32, n = std::min<int>(32, static_cast<int>(blk.lanes.size()) - first);
  for (int i = 0; i < n; ++i) {
    Lane& l = blk.lanes[first + i];
    if (l.state != State::AtWarp) continue;
    bool ready = true;
    for (int j = 0; j < 32; ++j) {
      if (!(l.mask >> j & 1u)) continue;
      if (j >= n) throw EmuError(std::string(l.what) + " with lane " + std::to_string(j) + " in its mask, but the warp has " + std::to_string(n) + " lanes");
      Lane& o = blk.lanes[first + j];
      if (o.state == State::Done)
        throw EmuError(std::string(l.what) + " waits for lane " + std::to_string(j) + ", which has left the kernel");
      if (o.state != State::AtWarp) {
        ready = false;
        break;
      }
      if (o.mask != l.mask || o.what != l.what || o.seq != l.seq)
        throw EmuError("warp " + std::to_string(w) + " diverged: lane " + std::to_string(i) + " at " + l.what +
                       " while lane " + std::to_string(j) + " is at " + o.what);
    }
    if (!ready) continue;
    for (int j = 0; j < 32; ++j)
      if (l.mask >> j & 1u) blk.lanes[first + j].state = State::Ready;
    released = true;
  }
  return released;
}

std::vector<int> warp_order(int nwarps, int order, uint64_t block_id) {
  std::vector<int> o(nwarps);
  std::iota(o.begin(), o.end(), 0);
  if (order == 1) std::reverse(o.begin(), o.end());
  if (order >= 2) {
    std::mt19937_64 rng(static_cast<uint64_t>(order) * 0x9e3779b97f4a7c15ull + block_id);
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

// Runs the block to completion; returns an error message or "".
void run_block(Block& blk, int order, uint64_t block_id) {
  const auto warps = warp_order(blk.nwarps, order, block_id);
  const bool reverse_lanes = order == 1;
  const int nlanes = static_cast<int>(blk.lanes.size());
  while (true) {
    bool progressed = false;
    for (int w : warps) {
      // One warp as far as it goes: its lanes to their next synchronisation point, then its
      // completed collectives, until every lane waits at __syncthreads or has finished.
      while (true) {
        bool ran = false;
        const int first = w * 32, n = std::min(32, nlanes - first);
        for (int i = 0; i < n; ++i) {
          Lane& l = blk.lanes[first + (reverse_lanes ? n - 1 - i : i)];
          if (l.state != State::Ready) continue;
          resume(blk, l);
          ran = true;
          if (!blk.error.empty()) return;
        }
        const bool released = release_warp(blk, w);
        progressed |= ran || released;
        if (!ran && !released) break;
      }
    }
    bool all_done = true, all_at_barrier = true;
    for (auto& l : blk.lanes) {
      all_done &= l.state == State::Done;
      all_at_barrier &= l.state == State::Done || l.state == State::AtBlock;
    }
    if (all_done) return;
    if (all_at_barrier) {
      for (auto& l : blk.lanes)
        if (l.state == State::AtBlock) l.state = State::Ready;
      continue;
    }
    if (!progressed) {
      std::ostringstream os;
      os << "deadlock: no thread can go on (";
      int shown = 0;
      for (int i = 0; i < nlanes && shown < 4; ++i) {
        const auto& l = blk.lanes[i];
        if (l.state == State::AtWarp || l.state == State::AtBlock) {
          os << (shown++ ? ", " : "") << "thread " << i << " at "
             << (l.state == State::AtBlock ? "__syncthreads" : l.what);
        }
      }
      os << "); a barrier or warp collective is reached by only some of the threads it waits for";
      throw EmuError(os.str());
    }
  }
}

struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem;
  KernelBody body;
  std::atomic<uint64_t> next{0};
  std::mutex err_mutex;
  std::string error;
};

void poison(void* p, size_t bytes) { std::memset(p, 0xff, bytes); }

void worker(Launch& L) {
  const uint64_t nblocks = static_cast<uint64_t>(L.grid.x) * L.grid.y * L.grid.z;
  const int nthreads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  char* stacks = static_cast<char*>(mmap(nullptr, kStackBytes * nthreads, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) {
    std::lock_guard<std::mutex> g(L.err_mutex);
    L.error = "could not map fiber stacks";
    return;
  }
  Block blk;
  blk.lanes.resize(nthreads);
  blk.nwarps = (nthreads + 31) / 32;
  blk.slots.assign(2 * static_cast<size_t>(blk.nwarps) * 32 * kWords, 0);
  blk.body = L.body;
  tl_block = &blk;
  while (true) {
    const uint64_t id = L.next.fetch_add(1);
    if (id >= nblocks) break;
    {
      std::lock_guard<std::mutex> g(L.err_mutex);
      if (!L.error.empty()) break;
    }
    const uint3 bidx{static_cast<unsigned>(id % L.grid.x), static_cast<unsigned>(id / L.grid.x % L.grid.y),
                     static_cast<unsigned>(id / (static_cast<uint64_t>(L.grid.x) * L.grid.y))};
    for (int i = 0; i < nthreads; ++i) {
      Lane& l = blk.lanes[i];
      l.state = State::Ready;
      l.seq = 0;
      l.mask = 0;
      l.what = nullptr;
      l.stack = stacks + static_cast<size_t>(i) * kStackBytes;
      l.dims = {{static_cast<unsigned>(i % L.block.x), static_cast<unsigned>(i / L.block.x % L.block.y),
                 static_cast<unsigned>(i / (L.block.x * L.block.y))},
                bidx,
                {L.block.x, L.block.y, L.block.z},
                {L.grid.x, L.grid.y, L.grid.z}};
#ifdef FVDM_EMU_ASAN
      // A lane abandoned after an error may have left poisoned frames on this stack.
      ASAN_UNPOISON_MEMORY_REGION(l.stack, kStackBytes);
      l.fake_stack = nullptr;
#endif
      // The first switch to the lane pops six zero registers and "returns" into lane_main,
      // entered with the stack alignment of a call.
      auto* top = reinterpret_cast<uintptr_t*>(l.stack + kStackBytes);
      top[-1] = 0;
      top[-2] = reinterpret_cast<uintptr_t>(&lane_main);
      for (int r = 3; r <= 8; ++r) top[-r] = 0;
      l.sp = top - 8;
    }
    if (L.smem > 0) {
      blk.dynamic = std::malloc(L.smem);
      poison(blk.dynamic, L.smem);
    }
    std::string err;
    try {
      run_block(blk, g_settings.order, id);
      err = blk.error;
    } catch (const EmuError& e) {
      err = e.what();
    }
    for (auto& s : blk.shared) std::free(s.second);
    blk.shared.clear();
    blk.shared_bytes.clear();
    std::free(blk.dynamic);
    blk.dynamic = nullptr;
    if (!err.empty()) {
      std::ostringstream os;
      os << "block (" << bidx.x << "," << bidx.y << "," << bidx.z << "): " << err;
      std::lock_guard<std::mutex> g(L.err_mutex);
      if (L.error.empty()) L.error = os.str();
      blk.error.clear();
      break;
    }
  }
  tl_block = nullptr;
#ifdef FVDM_EMU_ASAN
  // A finished lane never returns from its first frame, whose redzones stay poisoned; clear
  // them before the pages go back to the system (and perhaps to another allocator).
  ASAN_UNPOISON_MEMORY_REGION(stacks, kStackBytes * nthreads);
#endif
  munmap(stacks, kStackBytes * nthreads);
}

Lane& current_lane(const char* what) {
  if (tl_block == nullptr || tl_block->current == nullptr)
    throw std::logic_error(std::string(what) + " called outside an emulated kernel");
  return *tl_block->current;
}

}  // namespace

const Profile& profile() { return *g_settings.profile; }

int lane_id() {
  const auto& d = dims();
  const unsigned linear = d.thread_idx.x + d.block_dim.x * (d.thread_idx.y + d.block_dim.y * d.thread_idx.z);
  return static_cast<int>(linear % 32);
}

void syncthreads() {
  Lane& l = current_lane("__syncthreads");
  l.state = State::AtBlock;
  switch_to_scheduler(l, false);
}

const uint32_t* warp_collective(unsigned mask, const uint32_t* words, int n, const char* what) {
  Lane& l = current_lane(what);
  Block& blk = *tl_block;
  const int idx = static_cast<int>(&l - blk.lanes.data());
  const int warp = idx / 32, lane = idx % 32;
  if (!(mask >> lane & 1u)) trap("a warp collective called by a lane that is not in its mask");
  const size_t gen = static_cast<size_t>(blk.nwarps) * 32 * kWords;
  uint32_t* base = blk.slots.data() + (l.seq & 1u) * gen + static_cast<size_t>(warp) * 32 * kWords;
  std::memcpy(base + lane * kWords, words, sizeof(uint32_t) * n);
  l.mask = mask;
  l.what = what;
  l.state = State::AtWarp;
  switch_to_scheduler(l, false);
  ++l.seq;
  return base;
}

void trap(const char* why) { throw EmuError(why); }

void* shared_array(const void* tag, size_t bytes) {
  Block& blk = *tl_block;
  for (size_t i = 0; i < blk.shared.size(); ++i) {
    if (blk.shared[i].first != tag) continue;
    if (blk.shared_bytes[i] != bytes) trap("a __shared__ array declared with different sizes by different threads");
    return blk.shared[i].second;
  }
  void* p = std::malloc(bytes);
  poison(p, bytes);
  blk.shared.emplace_back(tag, p);
  blk.shared_bytes.push_back(bytes);
  return p;
}

void* dynamic_shared() {
  Block& blk = *tl_block;
  if (blk.dynamic == nullptr) trap("extern __shared__ memory used by a kernel launched with 0 bytes of it");
  return blk.dynamic;
}

void* device_alloc(size_t bytes) {
  void* p = std::malloc(std::max<size_t>(bytes, 1));
  poison(p, bytes);
  return p;
}
void device_free(void* p) { std::free(p); }

void launch(const char* name, dim3 grid, dim3 block, size_t smem, KernelBody body) {
  const Profile& prof = profile();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "CUDA emulation: ", name, ": invalid block (",
              block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "CUDA emulation: ", name, ": invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(static_cast<int64_t>(smem) <= prof.smem_optin, "CUDA emulation: ", name, ": ", smem,
              " bytes of dynamic shared memory exceed the ", prof.smem_optin, " a block may opt in to on ", prof.name);
  {
    std::lock_guard<std::mutex> g(g_log_mutex);
    std::ostringstream os;
    os << name << " grid=" << grid.x << "," << grid.y << "," << grid.z << " block=" << block.x << "," << block.y
       << "," << block.z << " smem=" << smem;
    g_log.push_back(os.str());
  }
  Launch L{name, grid, block, smem, body};
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const int nworkers = static_cast<int>(std::min<uint64_t>(std::max(1, g_settings.workers), nblocks));
  if (nworkers == 1) {
    worker(L);
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < nworkers; ++i) pool.emplace_back([&L] { worker(L); });
    for (auto& t : pool) t.join();
  }
  TORCH_CHECK(L.error.empty(), "CUDA emulation: ", name, ": ", L.error);
}

// ---------------------------------------------------------------------------------------------
// control, for the tests

void set_profile(const std::string& name) {
  for (const auto& p : kProfiles) {
    if (name == p.name) {
      g_settings.profile = &p;
      return;
    }
  }
  std::string known;
  for (const auto& p : kProfiles) known += std::string(known.empty() ? "" : ", ") + p.name;
  TORCH_CHECK_VALUE(false, "CUDA emulation: unknown device profile '", name, "' (known: ", known, ")");
}
std::vector<std::string> profiles() {
  std::vector<std::string> out;
  for (const auto& p : kProfiles) out.emplace_back(p.name);
  return out;
}
void set_schedule(int64_t order, int64_t workers) {
  TORCH_CHECK_VALUE(order >= 0 && workers >= 1, "CUDA emulation: order must be >= 0 and workers >= 1");
  g_settings.order = static_cast<int>(order);
  g_settings.workers = static_cast<int>(workers);
}
std::vector<std::string> take_launches() {
  std::lock_guard<std::mutex> g(g_log_mutex);
  std::vector<std::string> out;
  out.swap(g_log);
  return out;
}

}  // namespace fvdm::emu
