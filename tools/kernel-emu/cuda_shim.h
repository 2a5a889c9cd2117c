// CPU emulation of the CUDA features kernels/*.cu use, so a harness can #include "../X.cu" and
// run the real kernel source with g++ (see README.md). Header-only; include it in ONE translation
// unit (it defines the context-switch routine). x86-64 Linux, GNU ld (for emu.ld).
//
// Execution model: every CUDA thread of a block is a fiber (its own stack) on one OS thread. A
// fiber runs until it reaches a barrier (__syncthreads, or a warp collective: shuffles and the
// WMMA *_sync calls), then yields; a barrier releases when every thread of the block (or lane of
// the warp) has arrived. Blocks run one after another. Between barriers the threads of a block
// run one at a time, in an order that changes from block to block (threads ascending or
// descending; warp by warp, each running ahead to its next __syncthreads, ascending or
// descending; random), so a missing barrier shows up as a wrong or NaN result under some order.
//
// Checks done here (a failure prints the kernel, block and thread, and aborts):
//   - deadlock: some threads wait at a barrier that others never reach (a thread exited, or
//     threads disagree on the number of barriers, or a shuffle inside divergent code);
//   - the lanes of a warp calling different collectives, or a WMMA call with different
//     pointers/ldm across lanes, a pointer not 32-byte aligned or an ldm not a multiple of 16
//     bytes, or a shuffle with a mask other than all 32 lanes;
//   - shared memory (static __shared__ and the launch's dynamic shared memory) is filled with
//     0xFF bytes (NaN as float and bf16) at the start of every block, so reads of shared memory
//     not written by this block give NaN;
//   - the tensor-core instructions of kernels/tensorcore.cuh (mma.sync, ldmatrix, cp.async; see
//     the section "tensor-core instructions" below and README.md) check what the hardware
//     requires: all 32 lanes, the same instruction at the same place on every lane, 16-byte
//     aligned shared-memory rows and copies, and a cp.async copy lands only at its wait_group.
#pragma once
// Kernel headers test this to pick the emulated side of an instruction (kernels/tensorcore.cuh).
#define FINCH_EMULATOR 1
#if !defined(__x86_64__) || !defined(__linux__)
#error "tools/kernel-emu: the fiber switch is written for x86-64 Linux"
#endif
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

// ---- CUDA qualifiers ---------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Block-shared variables become function statics: one copy, reused by each block in turn. emu.ld
// gathers all function statics (.bss._ZZ*, with -fdata-sections) into one range, which the
// launcher fills with 0xFF before every block. So harness code must not use function statics.
#define __shared__ static

// ---- built-in variables and vector types -------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline uint3 threadIdx, blockIdx;  // set by the scheduler before it resumes a fiber
inline dim3 blockDim, gridDim;
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// CUDA's min/max overloads for mixed integer types (the usual arithmetic conversions).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    using T = std::common_type_t<A, B>;
    return (T)a < (T)b ? (T)a : (T)b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    using T = std::common_type_t<A, B>;
    return (T)a < (T)b ? (T)b : (T)a;
}

// IEEE single-precision add and multiply, rounded to nearest, never fused into an FMA: on the
// host that is what plain float arithmetic does (the harnesses are built without -mfma).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// ---- bf16 (what cuda_bf16.h provides and the kernels use) --------------------------------------
// Only explicit conversions, so kernel code that leans on cuda_bf16.h's implicit ones fails here.
struct __nv_bfloat16 {
    uint16_t __x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// Round to nearest, ties to even; any NaN gives the canonical NaN 0x7fff (as cvt.rn.bf16.f32);
// values that round past the largest finite bf16 give inf.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)0x7fffu};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---- the fiber scheduler -----------------------------------------------------------------------
extern "C" void emu_switch_context(void** save_sp, void* new_sp);
// Saves the callee-saved registers on the current stack, stores its sp in *save_sp, switches to
// new_sp and restores the registers saved there (System V x86-64).
asm(R"(
    .pushsection .text
    .globl emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
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
    .size emu_switch_context, .-emu_switch_context
    .popsection
)");

extern "C" char __emu_shared_start[] __attribute__((weak)), __emu_shared_end[] __attribute__((weak));

namespace emu {

[[noreturn]] inline void die(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Schedules: how the threads of a block take turns between barriers. A thread runs until it must
// wait at a barrier (or exits); then the next one in the current group runs. A group is run over
// and over until none of its threads can move, then the next group runs.
//   0: one group, threads ascending       1: one group, threads descending
//   2: one group per warp, warps ascending (a warp runs ahead to its next __syncthreads)
//   3: one group per warp, warps descending
//   4: one group, a fresh random order on every pass
constexpr int kSchedules = 5;
inline int schedule = 0;  // of the block running now
inline constexpr const char* kScheduleNames[kSchedules] = {"threads ascending", "threads descending",
                                                           "warps ascending", "warps descending", "random"};
inline const char* schedule_name(int mode) { return kScheduleNames[mode]; }

struct Ctx {
    void* sp = nullptr;
    void* fake = nullptr;  // ASan fake-stack bookkeeping
    const void* bottom = nullptr;
    size_t size = 0;
};
struct Fiber {
    Ctx ctx;
    char* stack = nullptr;
    bool done = false;
    const char* waiting = nullptr;  // the barrier it waits at, for deadlock reports
};
struct Barrier {
    unsigned expected = 0, count = 0;
    uint64_t gen = 0;
    // The collective the current phase is for, and its arguments (all lanes must agree); for the
    // tensor-core instructions, the source line that calls it (file nullptr for the others).
    const char* op = nullptr;
    const void* p = nullptr;
    long long q = 0;
    const char* file = nullptr;
    int line = 0;
};

constexpr size_t kStack = 256 * 1024, kGuard = 4096;
inline Ctx sched;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline unsigned nthreads = 0;
inline uint64_t progress = 0;  // bumped by every arrival at a barrier and every thread exit
inline Barrier block_bar;
inline std::vector<Barrier> warp_bars;
inline const char* kernel_name = "";
inline const std::function<void()>* kernel_body = nullptr;
inline uint64_t launches = 0;
inline uint64_t fiber_switches = 0;
// Per warp: shuffle slots and the WMMA operand buffer, double-buffered by barrier phase (a lane
// can run at most one phase ahead of the slowest lane of its warp).
constexpr int kMaxWarps = 32;
inline float shfl_slot[kMaxWarps][2][32];
inline double shfl_slot_d[kMaxWarps][2][32];
inline float wmma_buf[kMaxWarps][2][3][256];

// The launch's dynamic shared memory (FINCH_DYNAMIC_SMEM): `dyn_smem_bytes` bytes at dyn_smem,
// allocated by launch() and refilled with 0xFF before every block. It starts 128 bytes past a
// 256-byte boundary: exactly the __align__(128) that kernels/tensorcore.cuh declares, no more.
// 227 KiB (sm_90's opt-in maximum) is the most any GPU finch supports gives a block.
constexpr size_t kMaxDynamicSmem = 232448;
inline char* dyn_smem = nullptr;
inline size_t dyn_smem_bytes = 0;
inline void* dyn_smem_alloc = nullptr;
inline size_t last_dynamic_smem = 0;  // the size the last launch allocated (the fake driver's counters)

// cp.async copies not yet landed, per thread of the block (see "tensor-core instructions").
struct CpAsyncCopy {
    char* dst;
    const char* src;
    unsigned char data[16];  // the source bytes, read at issue (zeros when not valid)
    bool valid;
    uint64_t group;  // the thread's commit-group number; kUncommitted until cp.async.commit_group
    const char* file;
    int line;
};
constexpr uint64_t kUncommitted = ~0ull;
struct CpAsyncThread {
    std::vector<CpAsyncCopy> pending;  // in issue order
    uint64_t committed = 0;            // groups committed so far
};
inline std::vector<CpAsyncThread> cp_async_threads;
inline void cp_async_thread_exit();

inline void die(const char* fmt, ...) {
    fflush(stdout);
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "\nEMU FAILURE in %s, block (%u,%u,%u), thread %u (schedule: %s): ", kernel_name, blockIdx.x,
            blockIdx.y, blockIdx.z, threadIdx.x, schedule_name(schedule));
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

inline void switch_ctx(Ctx& from, Ctx& to, bool from_dies) {
    ++fiber_switches;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(from_dies ? nullptr : &from.fake, to.bottom, to.size);
#else
    (void)from_dies;
#endif
    emu_switch_context(&from.sp, to.sp);
#ifdef EMU_ASAN
    // Back in `from`: the stack we came from is always the scheduler's or a fiber's; remember
    // the scheduler's (reported the first time a fiber starts).
    const void* b;
    size_t s;
    __sanitizer_finish_switch_fiber(from.fake, &b, &s);
#endif
}

inline void yield() { switch_ctx(fibers[current].ctx, sched, false); }

// Thread entry: run the kernel, mark the thread done, return to the scheduler for good.
inline void fiber_entry() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &sched.bottom, &sched.size);
#endif
    (*kernel_body)();
    cp_async_thread_exit();  // a copy still in flight when the thread ends is reported
    fibers[current].done = true;
    ++progress;
    switch_ctx(fibers[current].ctx, sched, true);
    __builtin_unreachable();
}

inline void prepare_fiber(Fiber& f) {
    if (f.stack == nullptr) {
        void* m = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) die("mmap of a fiber stack failed");
        mprotect(m, kGuard, PROT_NONE);  // stack overflow faults instead of corrupting
        f.stack = (char*)m + kGuard;
    }
#ifdef EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStack);
#endif
    void** sp = (void**)(f.stack + kStack);
    *--sp = nullptr;               // fiber_entry's return address (never used): rsp % 16 == 8 at entry
    *--sp = (void*)&fiber_entry;   // where emu_switch_context's ret goes
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    f.ctx.sp = sp;
    f.ctx.fake = nullptr;
    f.ctx.bottom = f.stack;
    f.ctx.size = kStack;
    f.done = false;
    f.waiting = nullptr;
}

inline void set_thread_index(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = t / blockDim.x % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}
inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Arrive at b and wait for its phase to complete; returns the phase number.
inline uint64_t arrive_and_wait(Barrier& b, const char* what) {
    const uint64_t g = b.gen;
    ++progress;
    if (++b.count == b.expected) {
        b.count = 0;
        b.op = nullptr;
        ++b.gen;
        return g;
    }
    fibers[current].waiting = what;
    while (b.gen == g) yield();
    fibers[current].waiting = nullptr;
    return g;
}

// "op(p, q)", or "op at file:line" for a collective that names its call site.
inline void describe_collective(char* buf, size_t n, const char* op, const void* p, long long q, const char* file,
                                int line) {
    if (file) snprintf(buf, n, "%s at %s:%d", op, file, line);
    else snprintf(buf, n, "%s(%p, %lld)", op, p, q);
}

// The warp's barrier for collective `op` with arguments (p, q), called from file:line (nullptr
// when not tracked), all of which every lane must pass alike.
inline Barrier& warp_phase(const char* op, const void* p, long long q, const char* file, int line) {
    Barrier& b = warp_bars[linear_tid() / 32];
    if (b.count == 0) {
        b.op = op;
        b.p = p;
        b.q = q;
        b.file = file;
        b.line = line;
    } else if (strcmp(b.op, op) != 0 || b.p != p || b.q != q || (b.file == nullptr) != (file == nullptr) ||
               (file && (b.line != line || strcmp(b.file, file) != 0))) {
        char mine[512], theirs[512];
        describe_collective(mine, sizeof mine, op, p, q, file, line);
        describe_collective(theirs, sizeof theirs, b.op, b.p, b.q, b.file, b.line);
        die("lanes of warp %u disagree: this lane (%u) calls %s, an earlier one %s", linear_tid() / 32,
            linear_tid() % 32, mine, theirs);
    }
    return b;
}
inline Barrier& warp_barrier(const char* op, const void* p, long long q) { return warp_phase(op, p, q, nullptr, 0); }

// Set false by a launcher that knows the kernel declares no __shared__ memory (the fake driver
// reads that from the PTX): then the refill below only costs time.
inline bool refill_shared = true;

__attribute__((no_sanitize_address)) inline void poison_shared() {
    if (__emu_shared_start == nullptr) die("link with -Wl,-T,emu.ld (and compile with -fdata-sections)");
    if (!refill_shared) return;
#ifdef EMU_ASAN
    // Byte by byte: ASan's memset would object to the redzones between the statics.
    for (char* p = __emu_shared_start; p < __emu_shared_end; ++p) *(volatile char*)p = (char)0xff;
#else
    // The range holds every kernel's statics (~290 KB with all families in one library): memset
    // makes a many-block launch of a small kernel ~10x faster than a byte loop.
    memset(__emu_shared_start, 0xff, (size_t)(__emu_shared_end - __emu_shared_start));
#endif
}

[[noreturn]] inline void deadlock() {
    fflush(stdout);
    fprintf(stderr, "\nEMU FAILURE in %s, block (%u,%u,%u) (schedule: %s): deadlock; threads and where they wait:\n",
            kernel_name, blockIdx.x, blockIdx.y, blockIdx.z, schedule_name(schedule));
    // Print runs of threads in the same state.
    unsigned t = 0;
    while (t < nthreads) {
        auto state = [&](unsigned i) { return fibers[i].done ? "exited" : fibers[i].waiting ? fibers[i].waiting : "?"; };
        unsigned e = t;
        while (e + 1 < nthreads && strcmp(state(e + 1), state(t)) == 0) ++e;
        fprintf(stderr, "  threads %u..%u: %s\n", t, e, state(t));
        t = e + 1;
    }
    abort();
}

inline void run_block(int mode, std::mt19937& rng) {
    poison_shared();
    if (dyn_smem_bytes) memset(dyn_smem, 0xff, dyn_smem_bytes);
    if (cp_async_threads.size() < nthreads) cp_async_threads.resize(nthreads);
    for (unsigned i = 0; i < nthreads; i++) {
        cp_async_threads[i].pending.clear();
        cp_async_threads[i].committed = 0;
    }
    block_bar = Barrier{};
    block_bar.expected = nthreads;
    const unsigned nwarps = (nthreads + 31) / 32;
    warp_bars.assign(nwarps, Barrier{});
    for (unsigned w = 0; w < nwarps; w++) warp_bars[w].expected = std::min(32u, nthreads - 32 * w);
    for (unsigned i = 0; i < nthreads; i++) prepare_fiber(fibers[i]);
    std::vector<std::vector<unsigned>> groups;
    if (mode == 2 || mode == 3) {
        for (unsigned w = 0; w < nwarps; w++) {
            groups.emplace_back();
            for (unsigned t = 32 * w; t < std::min(nthreads, 32 * w + 32); t++) groups.back().push_back(t);
        }
        if (mode == 3) std::reverse(groups.begin(), groups.end());
    } else {
        groups.emplace_back(nthreads);
        std::iota(groups[0].begin(), groups[0].end(), 0u);
        if (mode == 1) std::reverse(groups[0].begin(), groups[0].end());
    }
    unsigned live = nthreads;
    while (live > 0) {
        const uint64_t before_all = progress;
        for (auto& g : groups) {
            for (;;) {
                if (mode == 4) std::shuffle(g.begin(), g.end(), rng);
                const uint64_t before = progress;
                for (unsigned i : g) {
                    if (fibers[i].done) continue;
                    current = (int)i;
                    set_thread_index(i);
                    switch_ctx(sched, fibers[i].ctx, false);
                    if (fibers[i].done) --live;
                }
                current = -1;
                if (progress == before) break;
            }
        }
        if (live > 0 && progress == before_all) deadlock();
    }
}

// Allocates the launch's dynamic shared memory (see dyn_smem), or frees it (bytes ~0).
inline void set_dynamic_smem(size_t bytes) {
    if (dyn_smem_alloc) {
#ifdef EMU_ASAN
        ASAN_UNPOISON_MEMORY_REGION(dyn_smem_alloc, 128);
#endif
        free(dyn_smem_alloc);
    }
    dyn_smem_alloc = nullptr;
    dyn_smem = nullptr;
    dyn_smem_bytes = 0;
    if (bytes == ~(size_t)0) return;
    // Exactly `bytes` after the 128-byte lead-in, so ASan reports an access past the end (and,
    // with the lead-in poisoned, one before the start), as it does for static __shared__ arrays.
    if (posix_memalign(&dyn_smem_alloc, 256, 128 + bytes) != 0)
        die("cannot allocate %zu bytes of dynamic shared memory", bytes);
#ifdef EMU_ASAN
    ASAN_POISON_MEMORY_REGION(dyn_smem_alloc, 128);
#endif
    dyn_smem = (char*)dyn_smem_alloc + 128;
    dyn_smem_bytes = bytes;
}

// The launch's dynamic shared memory, for FINCH_DYNAMIC_SMEM (kernels/tensorcore.cuh).
inline void* dynamic_smem() {
    if (!dyn_smem) die("FINCH_DYNAMIC_SMEM outside a kernel launch");
    return dyn_smem;
}

// Launches `body` (which calls the extern "C" kernel with its arguments) on grid × block, with
// `dynamic_smem_bytes` of dynamic shared memory (cuLaunchKernel's sharedMemBytes, CUDA's
// <<<grid, block, bytes>>>).
inline void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body) {
    kernel_name = name;
    kernel_body = &body;
    gridDim = grid;
    blockDim = block;
    nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535)
        die("invalid launch: grid (%u,%u,%u), block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x, block.y, block.z);
    if (dynamic_smem_bytes > kMaxDynamicSmem)
        die("invalid launch: %zu bytes of dynamic shared memory (no GPU gives a block more than %zu)", dynamic_smem_bytes,
            kMaxDynamicSmem);
    set_dynamic_smem(dynamic_smem_bytes);
    last_dynamic_smem = dynamic_smem_bytes;
    if (fibers.size() < nthreads) fibers.resize(nthreads);
    std::mt19937 rng((unsigned)launches * 2654435761u + 1);
    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    for (uint64_t n = 0; n < nblocks; n++) {
        // Blocks in reverse order on odd launches; the schedule changes from block to block.
        const uint64_t lin = (launches & 1) ? nblocks - 1 - n : n;
        blockIdx.x = (unsigned)(lin % grid.x);
        blockIdx.y = (unsigned)(lin / grid.x % grid.y);
        blockIdx.z = (unsigned)(lin / ((uint64_t)grid.x * grid.y));
        schedule = (int)((launches + n) % kSchedules);
        run_block(schedule, rng);
    }
    ++launches;
    kernel_body = nullptr;
    set_dynamic_smem(~(size_t)0);
}
inline void launch(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
    launch(name, grid, block, 0, body);
}

}  // namespace emu

// ---- block and warp primitives -----------------------------------------------------------------
inline void __syncthreads() { emu::arrive_and_wait(emu::block_bar, "__syncthreads"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu::die("__syncwarp with a partial mask is not emulated");
    emu::arrive_and_wait(emu::warp_barrier("__syncwarp", nullptr, 0), "__syncwarp");
}

namespace emu {
template <typename T>
inline T shfl(const char* op, unsigned mask, T v, int src_of_lane_fn(int, int, int), int arg, int width) {
    if (mask != 0xffffffffu) die("%s with mask %#x: the emulator (and these kernels) assume all 32 lanes", op, mask);
    if (width != 32) die("%s with width %d is not emulated", op, width);
    const unsigned t = linear_tid(), w = t / 32, lane = t % 32;
    Barrier& b = warp_barrier(op, nullptr, 0);
    const int slot = (int)(b.gen & 1);
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit shuffles only");
    if constexpr (sizeof(T) == 4) memcpy(&shfl_slot[w][slot][lane], &v, 4);
    else memcpy(&shfl_slot_d[w][slot][lane], &v, 8);
    arrive_and_wait(b, op);
    const int src = src_of_lane_fn((int)lane, arg, width);
    if (src < 0 || src >= 32) return v;
    T r;
    if constexpr (sizeof(T) == 4) memcpy(&r, &shfl_slot[w][slot][src], 4);
    else memcpy(&r, &shfl_slot_d[w][slot][src], 8);
    return r;
}
inline int src_xor(int lane, int m, int) { return lane ^ m; }
inline int src_idx(int, int s, int) { return s & 31; }
inline int src_down(int lane, int d, int) { return lane + d < 32 ? lane + d : lane; }
inline int src_up(int lane, int d, int) { return lane - d >= 0 ? lane - d : lane; }
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return emu::shfl("__shfl_xor_sync", mask, v, emu::src_xor, m, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::shfl("__shfl_sync", mask, v, emu::src_idx, src, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return emu::shfl("__shfl_down_sync", mask, v, emu::src_down, (int)d, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return emu::shfl("__shfl_up_sync", mask, v, emu::src_up, (int)d, width);
}

// ---- nvcuda::wmma (16×16×16, bf16 or f32 operands as used; fp32 accumulators) -----------------
// A fragment holds 8 of the tile's 256 elements in each lane (element e of lane l is tile entry
// e·32 + l, row-major), so no lane holds its tile alone. load/store_matrix_sync and mma_sync are
// warp collectives: all 32 lanes must call them with the same pointer and ldm (checked), and
// mma_sync exchanges the lanes' shares through a per-warp buffer and computes D = A·B + C in
// fp32 (products of bf16 values are exact in fp32; sums in k order, which real tensor cores need
// not follow). The real API's requirements are asserted: pointer 256-bit (32-byte) aligned, ldm
// a multiple of 8 elements for 16-bit types and of 4 for float.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 fragments are emulated");
    static constexpr int num_elements = 8;
    T x[8];
};

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
inline T from_f(float v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return __float2bfloat16_rn(v);
}
template <typename T>
inline void check_ptr(const char* op, const T* p, unsigned ldm) {
    if ((uintptr_t)p % 32 != 0) emu::die("%s: pointer %p is not 32-byte aligned", op, (const void*)p);
    const unsigned mult = sizeof(T) == 2 ? 8 : sizeof(T) == 4 ? 4 : 1;
    if (ldm % mult != 0) emu::die("%s: ldm %u is not a multiple of %u for a %zu-byte type", op, ldm, mult, sizeof(T));
    if (ldm < 16) emu::die("%s: ldm %u < 16", op, ldm);
}
inline int lane() { return (int)(emu::linear_tid() % 32); }
}  // namespace detail

template <typename Use, typename T, typename Layout, typename U>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, U v) {
    for (int e = 0; e < 8; e++) f.x[e] = detail::from_f<T>((float)v);
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads need a layout_t argument");
    const char* op = std::is_same_v<Use, matrix_a> ? "wmma::load_matrix_sync(matrix_a)" : "wmma::load_matrix_sync(matrix_b)";
    detail::check_ptr(op, p, ldm);
    emu::arrive_and_wait(emu::warp_barrier(op, p, ldm), op);
    const bool rowm = std::is_same_v<Layout, row_major>;
    const int l = detail::lane();
    for (int e = 0; e < 8; e++) {
        const int idx = e * 32 + l, r = idx / 16, c = idx % 16;
        f.x[e] = rowm ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
    }
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t layout) {
    const char* op = "wmma::load_matrix_sync(accumulator)";
    detail::check_ptr(op, p, ldm);
    emu::arrive_and_wait(emu::warp_barrier(op, p, ldm), op);
    const int l = detail::lane();
    for (int e = 0; e < 8; e++) {
        const int idx = e * 32 + l, r = idx / 16, c = idx % 16;
        f.x[e] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
    }
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
    const char* op = "wmma::store_matrix_sync";
    detail::check_ptr(op, p, ldm);
    emu::arrive_and_wait(emu::warp_barrier(op, p, ldm), op);
    const int l = detail::lane();
    for (int e = 0; e < 8; e++) {
        const int idx = e * 32 + l, r = idx / 16, c = idx % 16;
        (layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]) = f.x[e];
    }
}

// (Not instrumented by the sanitizers: it only touches the emulator's own buffers, and it is the
// hot loop of a bf16 matmul.)
template <typename Tab, typename LA, typename LB, typename Tc>
__attribute__((no_sanitize("address", "undefined"))) inline void mma_sync(fragment<accumulator, 16, 16, 16, Tc>& d, const fragment<matrix_a, 16, 16, 16, Tab, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, Tab, LB>& b,
                     const fragment<accumulator, 16, 16, 16, Tc>& c) {
    const char* op = "wmma::mma_sync";
    emu::Barrier& bar = emu::warp_barrier(op, nullptr, 0);
    const unsigned w = emu::linear_tid() / 32;
    const int l = detail::lane(), slot = (int)(bar.gen & 1);
    float(&buf)[3][256] = emu::wmma_buf[w][slot];
    for (int e = 0; e < 8; e++) {  // deposit this lane's shares (d may alias c: read before any write)
        buf[0][e * 32 + l] = detail::to_f(a.x[e]);
        buf[1][e * 32 + l] = detail::to_f(b.x[e]);
        buf[2][e * 32 + l] = detail::to_f(c.x[e]);
    }
    emu::arrive_and_wait(bar, op);
    for (int e = 0; e < 8; e++) {
        const int idx = e * 32 + l, r = idx / 16, col = idx % 16;
        float acc = buf[2][idx];
        for (int k = 0; k < 16; k++) acc += buf[0][r * 16 + k] * buf[1][k * 16 + col];
        d.x[e] = detail::from_f<Tc>(acc);
    }
}
}  // namespace wmma
}  // namespace nvcuda

// ---- tensor-core instructions (kernels/tensorcore.cuh) -----------------------------------------
// What tensorcore.cuh's tc:: wrappers call under the emulator: mma.sync m16n8k16 (bf16 in, fp32
// accumulate), ldmatrix (.x1/.x2/.x4, optionally .trans), cp.async.cg 16-byte copies with
// commit_group / wait_group. The wrappers pass the source line of their call, so lanes that reach
// the same instruction from different places (divergent code) are caught.
//
// mma and ldmatrix are warp collectives, emulated like the WMMA calls: each lane deposits its
// operands in a per-warp buffer (double-buffered by barrier phase); the LAST lane to arrive
// performs the whole instruction at once (reads every row, computes every product) before the
// barrier releases the warp, and each lane then takes its own results. Checked, per lane, with
// the kernel, block and thread in the message:
//   - the warp has 32 threads (a block size that is not a multiple of 32 leaves a partial warp),
//     and all 32 arrive (a lane that exited or waits elsewhere is reported as a deadlock);
//   - every lane calls the same instruction (mma vs ldmatrix, .x4 vs .x2, .trans or not) from
//     the same source line;
//   - ldmatrix: each row address that the instruction uses (lanes 0-7 for .x1, 0-15 for .x2, all
//     for .x4; the others are ignored, as on sm_80 and later) is 16-byte aligned and its 16 bytes
//     lie in shared memory (static __shared__ or the launch's dynamic shared memory).
// Fragment layouts (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix"; tools/kernel-emu/tensorcore.cpp checks them element by element against CUTLASS
// CuTe's tables): with g = lane / 4 and t = lane % 4, element e = 2·i + h is half h (0 = low
// 16 bits) of register i, and
//   mma A (16×16, row-major):   row g + 8·(e ∈ {2,3,6,7}), col 2t + (e & 1) + 8·(e ≥ 4)
//   mma B (16×8, k × n, "col"): k 2t + (e & 1) + 8·(e ≥ 2), n g
//   mma C, D (16×8 fp32, e = register): row g + 8·(e ≥ 2), col 2t + (e & 1)
//   ldmatrix, matrix j = register j: row g of the matrix (the address of lane 8j + g), elements
//     2t and 2t+1; with .trans, element g of rows 2t and 2t+1 (the address of lane 8j + 2t + h).
// mma computes D = C + A·B in fp32: products of bf16 values are exact, and they are added to C
// one by one in k order, each addition rounded to nearest. Real tensor cores add in another
// order and may round differently; see README.md.
//
// cp.async is per thread. At issue, the source's 16 bytes are read (nothing is read when not
// valid: the zero-fill form, src-size 0) and the 16 destination bytes are set to 0xFF, so a read
// before the copy lands gives NaN. cp.async.commit_group closes the thread's open group;
// cp.async.wait_group N lands, in issue order, every copy of every committed group but the newest
// N. Copies not yet committed are not waited for (PTX ISA), and copies of the newest N groups stay
// pending even though hardware may have finished them (the emulator takes the latest moment the
// ISA allows). Checked: dst and src 16-byte aligned; dst's 16 bytes in shared memory; src not in
// shared memory; at landing, the destination still holds the 0xFF written at issue (else a store
// or another copy wrote it while this copy was in flight) and the source still holds the bytes
// read at issue (else it was written while the copy was in flight); and a thread that ends with
// copies not landed is an error (wait with cp_async_wait<0>() first, as CUTLASS's main loops do
// before an epilogue reuses shared memory).
namespace emu {

// Which shared memory holds [p, p + n): "static __shared__", "dynamic shared memory" or nullptr.
inline const char* shared_region(const void* p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    if (__emu_shared_start && a >= (uintptr_t)__emu_shared_start && a + n <= (uintptr_t)__emu_shared_end)
        return "static __shared__";
    if (dyn_smem && a >= (uintptr_t)dyn_smem && a + n <= (uintptr_t)dyn_smem + dyn_smem_bytes)
        return "dynamic shared memory";
    return nullptr;
}
// Whether [p, p + n) overlaps any shared memory.
inline bool overlaps_shared(const void* p, size_t n) {
    const uintptr_t a = (uintptr_t)p, e = a + n;
    if (__emu_shared_start && a < (uintptr_t)__emu_shared_end && e > (uintptr_t)__emu_shared_start) return true;
    return dyn_smem && a < (uintptr_t)dyn_smem + dyn_smem_bytes && e > (uintptr_t)dyn_smem;
}

// Per warp and barrier phase: what the lanes deposit and what the last lane computes for them.
struct TcBuf {
    const char* rows[32];  // ldmatrix: each lane's row address
    uint32_t ld[32][4];    // ldmatrix: each lane's registers
    float a[16][16], b[16][8], c[16][8], d[16][8];  // mma: A (m, k), B (k, n), C and D (m, n)
};
inline TcBuf tc_buf[kMaxWarps][2];

// The warp barrier of a tensor-core collective, after the checks every lane must pass.
inline Barrier& tc_rendezvous(const char* op, const char* file, int line) {
    const unsigned t = linear_tid(), w = t / 32;
    Barrier& b = warp_bars[w];
    if (b.expected != 32)
        die("%s at %s:%d: warp %u has %u threads (block of %u): warp-wide tensor-core instructions need all 32 lanes",
            op, file, line, w, b.expected, nthreads);
    return warp_phase(op, nullptr, 0, file, line);
}

inline float bf16_bits_to_float(uint32_t bits) {
    const uint32_t u = bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ldmatrix: lane `lane`'s registers from the rows in buf.rows (all lanes' addresses deposited).
inline void ldmatrix_exchange(TcBuf& buf, int n, bool trans) {
    for (int j = 0; j < n; j++) {
        uint16_t m[8][8];  // matrix j, as its 8 rows read at once
        for (int r = 0; r < 8; r++) memcpy(m[r], buf.rows[8 * j + r], 16);
        for (int l = 0; l < 32; l++) {
            const int g = l / 4, t = l % 4;
            const uint32_t lo = trans ? m[2 * t][g] : m[g][2 * t], hi = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
            buf.ld[l][j] = lo | hi << 16;
        }
    }
}

template <int N>
inline void ldmatrix(uint32_t (&r)[N], const void* row, bool trans, const char* file, int line) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    constexpr const char* names[2][3] = {
        {"ldmatrix.sync.aligned.m8n8.x1.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
         "ldmatrix.sync.aligned.m8n8.x4.shared.b16"},
        {"ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
         "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"}};
    const char* op = names[trans][N == 1 ? 0 : N == 2 ? 1 : 2];
    Barrier& b = tc_rendezvous(op, file, line);
    const unsigned t = linear_tid(), w = t / 32, lane = t % 32;
    if (lane < 8u * N) {
        if ((uintptr_t)row % 16 != 0)
            die("%s at %s:%d: lane %u's row address %p is not 16-byte aligned", op, file, line, lane, row);
        if (!shared_region(row, 16))
            die("%s at %s:%d: lane %u's row address %p (16 bytes) is not in shared memory (static __shared__ or the "
                "launch's dynamic shared memory)",
                op, file, line, lane, row);
    }
    TcBuf& buf = tc_buf[w][b.gen & 1];
    buf.rows[lane] = lane < 8u * N ? (const char*)row : nullptr;
    if (b.count + 1 == b.expected) ldmatrix_exchange(buf, N, trans);  // the last lane: the whole load
    arrive_and_wait(b, op);
    for (int j = 0; j < N; j++) r[j] = buf.ld[lane][j];
}

// mma: D = C + A·B for the warp, in fp32, products added in k order.
__attribute__((no_sanitize("address", "undefined"))) inline void mma_compute(TcBuf& buf) {
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 8; n++) {
            float acc = buf.c[m][n];
            for (int k = 0; k < 16; k++) acc += buf.a[m][k] * buf.b[k][n];
            buf.d[m][n] = acc;
        }
}

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const char* file,
                              int line) {
    const char* op = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    Barrier& bar = tc_rendezvous(op, file, line);
    const unsigned t = linear_tid(), w = t / 32, lane = t % 32, g = lane / 4, tg = lane % 4;
    TcBuf& buf = tc_buf[w][bar.gen & 1];
    for (int e = 0; e < 8; e++) {  // A: 4 registers of 2 bf16
        const uint32_t bits = a[e / 2] >> (16 * (e % 2)) & 0xffffu;
        const int row = g + ((e / 2) % 2) * 8, col = 2 * tg + (e % 2) + (e >= 4 ? 8 : 0);
        buf.a[row][col] = bf16_bits_to_float(bits);
    }
    for (int e = 0; e < 4; e++) {  // B: 2 registers of 2 bf16
        const uint32_t bits = b[e / 2] >> (16 * (e % 2)) & 0xffffu;
        buf.b[2 * tg + (e % 2) + (e >= 2 ? 8 : 0)][g] = bf16_bits_to_float(bits);
    }
    for (int e = 0; e < 4; e++) buf.c[g + (e >= 2 ? 8 : 0)][2 * tg + (e % 2)] = d[e];
    if (bar.count + 1 == bar.expected) mma_compute(buf);  // the last lane: the whole product
    arrive_and_wait(bar, op);
    for (int e = 0; e < 4; e++) d[e] = buf.d[g + (e >= 2 ? 8 : 0)][2 * tg + (e % 2)];
}

inline CpAsyncThread& cp_async_thread() { return cp_async_threads[linear_tid()]; }

inline void cp_async_16(void* dst, const void* src, bool valid, const char* file, int line) {
    const char* op = "cp.async.cg.shared.global (16 bytes)";
    if ((uintptr_t)dst % 16 != 0) die("%s at %s:%d: destination %p is not 16-byte aligned", op, file, line, dst);
    if ((uintptr_t)src % 16 != 0) die("%s at %s:%d: source %p is not 16-byte aligned", op, file, line, src);
    if (!shared_region(dst, 16))
        die("%s at %s:%d: destination %p (16 bytes) is not in shared memory (static __shared__ or the launch's "
            "dynamic shared memory)",
            op, file, line, dst);
    if (overlaps_shared(src, 16))
        die("%s at %s:%d: source %p is in shared memory; cp.async copies global memory to shared memory", op, file,
            line, src);
    CpAsyncCopy c{(char*)dst, (const char*)src, {}, valid, kUncommitted, file, line};
    if (valid) memcpy(c.data, src, 16);  // an out-of-bounds source is reported here, at the issuing line
    else memset(c.data, 0, 16);
    memset(dst, 0xff, 16);  // NaN until the copy lands
    cp_async_thread().pending.push_back(c);
}

inline void cp_async_commit() {
    CpAsyncThread& th = cp_async_thread();
    for (CpAsyncCopy& c : th.pending)
        if (c.group == kUncommitted) c.group = th.committed;
    th.committed++;  // an empty group counts too (PTX ISA)
}

inline void cp_async_land(const CpAsyncCopy& c) {
    bool untouched = true;  // (no static array here: function statics land in the poisoned range)
    for (int i = 0; i < 16; i++) untouched &= (unsigned char)c.dst[i] == 0xff;
    if (!untouched)
        die("cp.async issued at %s:%d: its 16 destination bytes at %p were written while the copy was in flight (by a "
            "store or another cp.async), before its wait_group",
            c.file, c.line, (void*)c.dst);
    if (c.valid && memcmp(c.src, c.data, 16) != 0)
        die("cp.async issued at %s:%d: its source %p was written while the copy was in flight (between the issue and "
            "the wait_group)",
            c.file, c.line, (const void*)c.src);
    memcpy(c.dst, c.data, 16);
}

inline void cp_async_wait(int n) {
    CpAsyncThread& th = cp_async_thread();
    const uint64_t limit = th.committed > (uint64_t)n ? th.committed - (uint64_t)n : 0;
    size_t keep = 0;
    for (size_t i = 0; i < th.pending.size(); i++) {
        const CpAsyncCopy& c = th.pending[i];
        if (c.group != kUncommitted && c.group < limit) cp_async_land(c);
        else th.pending[keep++] = c;
    }
    th.pending.resize(keep);
}

inline void cp_async_thread_exit() {
    const unsigned t = linear_tid();
    if (t >= cp_async_threads.size() || cp_async_threads[t].pending.empty()) return;
    const CpAsyncThread& th = cp_async_threads[t];
    size_t uncommitted = 0;
    for (const CpAsyncCopy& c : th.pending) uncommitted += c.group == kUncommitted;
    die("the thread ends with %zu cp.async copies that never landed (%zu of them never committed; the first issued at "
        "%s:%d): wait for them (tc::cp_async_wait<0>(), after a commit) before the thread ends, and before the shared "
        "memory they target is reused",
        th.pending.size(), uncommitted, th.pending[0].file, th.pending[0].line);
}

}  // namespace emu
