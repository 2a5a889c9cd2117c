// Device memory for the fake driver: host memory laid out so that out-of-bounds accesses fault,
// and the SIGSEGV reporter that names the kernel, block, thread and allocation when one does.
//
// Each allocation is its own mapping:
//
//     [guard page][padding][data: size bytes][slack][guard page]
//
// The data starts 256-byte aligned (cuMemAlloc's alignment, which kernels may rely on) and its
// 256-byte-rounded end touches the trailing guard page, so an access past the end faults unless it
// falls in the < 256 bytes of slack. Padding and slack hold a canary pattern that the driver
// checks after every launch, which catches writes there (reads of it give NaN as f32 and bf16).
// Freed allocations become inaccessible and their addresses stay reserved for a while, so a
// kernel reading through a stale pointer faults too. With ASan (FAKE_SAN=address) allocations
// come from the ASan heap instead, which checks every byte.
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <deque>
#include <map>
#include <string>

#include "fake.h"

#if defined(__SANITIZE_ADDRESS__)
#define FAKE_ASAN 1
#endif
#ifdef FAKE_SANITIZER  // set by build.sh when FAKE_SAN is
#include <sanitizer/common_interface_defs.h>
#endif

namespace fake {
namespace {

constexpr size_t kAlign = 256;             // cuMemAlloc's alignment
constexpr size_t kQuarantine = 1024;       // freed allocations kept inaccessible before reuse
constexpr size_t kSignalStack = 64 << 10;  // for the reporter, which runs while a fiber faults
// Canary by address mod 4: as f32 (0xffbfffff) and as bf16 pairs (0xffff, 0xffbf) a NaN.
constexpr unsigned char kCanary[4] = {0xff, 0xff, 0xbf, 0xff};

struct Memory {
    std::map<uintptr_t, Allocation> live, freed;  // by start
    std::deque<uintptr_t> freed_order;
    uint64_t next_id = 1;
    size_t live_bytes = 0;
};
// Never destroyed: Rust threads may still free buffers while the process exits.
Memory* const g_memory = new Memory;
Memory& mem() { return *g_memory; }

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

#ifndef FAKE_ASAN
size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }
void fill_canary(char* from, char* to) {
    for (char* p = from; p < to; p++) *p = (char)kCanary[(uintptr_t)p % 4];
}
// The first byte in [from, to) that is not the canary, or nullptr.
const char* canary_broken(const char* from, const char* to) {
    for (const char* p = from; p < to; p++)
        if ((unsigned char)*p != kCanary[(uintptr_t)p % 4]) return p;
    return nullptr;
}
#endif

const Allocation* holding(const std::map<uintptr_t, Allocation>& m, uintptr_t p, size_t n, bool end_ok) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return nullptr;
    --it;
    const Allocation& a = it->second;
    const uintptr_t end = a.start + a.size;
    if (p >= a.start && (p + n < end || (p + n == end && (n > 0 || end_ok)))) return &a;
    return nullptr;
}

}  // namespace

size_t charged(size_t bytes) { return round_up(bytes, kAlign); }

const Allocation* allocate(size_t bytes, size_t limit, std::string* why) {
    Memory& m = mem();
    const size_t cost = charged(bytes);
    if (m.live_bytes + cost > limit) {
        char b[160];
        snprintf(b, sizeof b, "%zu bytes in use + %zu asked > %zu bytes of device memory", m.live_bytes, cost, limit);
        *why = b;
        return nullptr;
    }
    Allocation a;
    a.id = m.next_id;
    a.size = bytes;
#ifdef FAKE_ASAN
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, bytes) != 0) {
        *why = "the host is out of memory";
        return nullptr;
    }
    a.start = (uintptr_t)p;
#else
    const size_t page = page_size(), data = round_up(cost, page);
    a.region_size = data + 2 * page;
    void* r = mmap(nullptr, a.region_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED || mprotect((char*)r + page, data, PROT_READ | PROT_WRITE) != 0) {
        if (r != MAP_FAILED) munmap(r, a.region_size);
        *why = "the host could not map that much memory";
        return nullptr;
    }
    a.region = (char*)r;
    a.start = (uintptr_t)(a.region + page + data - cost);
    fill_canary(a.region + page, (char*)a.start);
    fill_canary((char*)a.start + bytes, (char*)a.start + cost);
#endif
    // Fresh device memory holds garbage; 0xFF bytes (NaN, or -1) make reads of it show.
    memset((void*)a.start, 0xff, bytes);
    m.freed.erase(a.start);  // the ASan heap may hand out a freed address again
    m.next_id++;
    m.live_bytes += cost;
    return &(m.live[a.start] = a);
}

const Allocation* live_at(uintptr_t p) {
    auto it = mem().live.find(p);
    return it == mem().live.end() ? nullptr : &it->second;
}
const Allocation* live_holding(uintptr_t p, size_t n) { return holding(mem().live, p, n, true); }
const Allocation* freed_holding(uintptr_t p) { return holding(mem().freed, p, 1, false); }
size_t live_bytes() { return mem().live_bytes; }

void release(const Allocation* a) {
    Memory& m = mem();
    Allocation f = *a;
    m.live.erase(f.start);
    m.live_bytes -= charged(f.size);
    f.freed = true;
#ifdef FAKE_ASAN
    free((void*)f.start);  // ASan keeps it poisoned in its own quarantine
#else
    // Drop the pages but keep the addresses reserved and inaccessible.
    mmap(f.region, f.region_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
#endif
    // Remembered for messages (use after free, double free) while quarantined.
    m.freed[f.start] = f;
    m.freed_order.push_back(f.start);
    if (m.freed_order.size() > kQuarantine) {
        auto it = m.freed.find(m.freed_order.front());
        if (it != m.freed.end()) {
            if (it->second.region) munmap(it->second.region, it->second.region_size);
            m.freed.erase(it);
        }
        m.freed_order.pop_front();
    }
}

bool check_canaries(std::string* report) {
#ifndef FAKE_ASAN
    const size_t page = page_size();
    for (auto& [start, a] : mem().live) {
        const char* s = (const char*)a.start;
        const char* after = canary_broken(s + a.size, s + charged(a.size));
        const char* before = canary_broken(a.region + page, s);
        if (!after && !before) continue;
        // Report the furthest damaged byte, which bounds how far the access went.
        char b[256];
        if (after) {
            const char* last = after;
            for (const char* p = after; p < s + charged(a.size); p++)
                if ((unsigned char)*p != kCanary[(uintptr_t)p % 4]) last = p;
            snprintf(b, sizeof b, "bytes %zu..%zu past the end of allocation #%llu (%zu bytes at %#lx) were written",
                     (size_t)(after - s) - a.size, (size_t)(last - s) - a.size, (unsigned long long)a.id, a.size,
                     (unsigned long)a.start);
        } else {
            snprintf(b, sizeof b, "bytes up to %zu before the start of allocation #%llu (%zu bytes at %#lx) were written",
                     (size_t)(s - before), (unsigned long long)a.id, a.size, (unsigned long)a.start);
        }
        *report = b;
        return false;
    }
#else
    (void)report;
#endif
    return true;
}

// ---- the SIGSEGV reporter -------------------------------------------------------------------------
namespace {

struct sigaction g_previous;
bool g_installed = false;
thread_local char* t_signal_stack = nullptr;

// Where addr lies relative to the allocations, fiber stacks, or nothing we know (returns false).
bool describe(uintptr_t addr, bool in_launch, char* out, size_t n) {
    Memory& m = mem();
    if (in_launch && in_fiber_stack_guard(addr)) {
        snprintf(out, n, "address %#lx is the guard page below a CUDA thread's stack: a stack overflow (local arrays too big?)",
                 (unsigned long)addr);
        return true;
    }
    auto describe_near = [&](const Allocation& a, const char* state, char* o, size_t on) {
        const uintptr_t end = a.start + a.size;
        if (addr >= end)
            snprintf(o, on, "address %#lx is %lu bytes past the end of %sallocation #%llu (%zu bytes at %#lx)",
                     (unsigned long)addr, (unsigned long)(addr - end), state, (unsigned long long)a.id, a.size,
                     (unsigned long)a.start);
        else if (addr < a.start)
            snprintf(o, on, "address %#lx is %lu bytes before the start of %sallocation #%llu (%zu bytes at %#lx)",
                     (unsigned long)addr, (unsigned long)(a.start - addr), state, (unsigned long long)a.id, a.size,
                     (unsigned long)a.start);
        else
            snprintf(o, on, "address %#lx is byte %lu of %sallocation #%llu (%zu bytes at %#lx)", (unsigned long)addr,
                     (unsigned long)(addr - a.start), state, (unsigned long long)a.id, a.size, (unsigned long)a.start);
    };
    for (auto* map : {&m.live, &m.freed})
        for (auto& [start, a] : *map)
            if (addr >= (uintptr_t)a.region && addr < (uintptr_t)a.region + a.region_size) {
                describe_near(a, a.freed ? "the FREED (use after free) " : "", out, n);
                return true;
            }
    if (!in_launch) return false;
    // A wild address: name the nearest live allocation, by distance to its data.
    const Allocation* best = nullptr;
    uintptr_t best_d = UINTPTR_MAX;
    for (auto& [start, a] : m.live) {
        const uintptr_t d = addr < a.start ? a.start - addr : addr >= a.start + a.size ? addr - (a.start + a.size) : 0;
        if (d < best_d) best_d = d, best = &a;
    }
    char near[240] = "no allocation is live";
    if (best) describe_near(*best, "", near, sizeof near);
    snprintf(out, n, "address %#lx is inside no allocation%s (nearest: %s)", (unsigned long)addr,
             addr < 4096 ? ", a NULL pointer" : "", near);
    return true;
}

void on_segv(int sig, siginfo_t* info, void* context) {
    const uintptr_t addr = (uintptr_t)info->si_addr;
    const bool is_write = (((ucontext_t*)context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
    const LaunchInfo& l = current_launch();
    char where[400], line[1024];
    const bool in_launch = l.kernel != nullptr && l.thread == pthread_self();
    if (!describe(addr, in_launch, where, sizeof where)) {
        // Not ours: hand the fault to whoever had SIGSEGV before (Rust's stack-overflow reporter,
        // or the default action once we return and the access faults again).
        if ((g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_sigaction) {
            g_previous.sa_sigaction(sig, info, context);
        } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
            g_previous.sa_handler(sig);
        } else {
            signal(SIGSEGV, SIG_DFL);
        }
        return;
    }
    if (in_launch) {
        Dims b, t;
        current_position(&b, &t);
        snprintf(line, sizeof line,
                 "[fake-cuda] out-of-bounds %s in kernel %s (grid (%u,%u,%u), block (%u,%u,%u), smem %u) at block "
                 "(%u,%u,%u), thread (%u,%u,%u): %s\n",
                 is_write ? "write" : "read", l.kernel, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z,
                 l.smem, b.x, b.y, b.z, t.x, t.y, t.z, where);
    } else {
        snprintf(line, sizeof line,
                 "[fake-cuda] host %s of device memory outside any kernel launch: %s (host code must not dereference "
                 "device pointers)\n",
                 is_write ? "write" : "read", where);
    }
    ssize_t ignored = write(2, line, strlen(line));
    (void)ignored;
    abort();
}

#ifdef FAKE_SANITIZER
// ASan and UBSan report an error themselves (with the kernel's source line); add where in the
// launch it happened.
void on_sanitizer_death() {
    const LaunchInfo& l = current_launch();
    if (!l.kernel || l.thread != pthread_self()) return;
    Dims b, t;
    current_position(&b, &t);
    fprintf(stderr,
            "[fake-cuda] the error above happened in kernel %s (grid (%u,%u,%u), block (%u,%u,%u), smem %u) at block "
            "(%u,%u,%u), thread (%u,%u,%u)\n",
            l.kernel, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z, l.smem, b.x, b.y, b.z, t.x, t.y,
            t.z);
}
#endif

}  // namespace

void ensure_signal_stack() {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE) && cur.ss_size >= kSignalStack) return;
    if (!t_signal_stack) {
        void* p = mmap(nullptr, kSignalStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return;
        t_signal_stack = (char*)p;
    }
    stack_t ss{};
    ss.ss_sp = t_signal_stack;
    ss.ss_size = kSignalStack;
    sigaltstack(&ss, nullptr);
}

void install_fault_handler() {
    if (g_installed) return;
    g_installed = true;
    struct sigaction sa{};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous);
#ifdef FAKE_SANITIZER
    __sanitizer_set_death_callback(on_sanitizer_death);
#endif
}

}  // namespace fake
