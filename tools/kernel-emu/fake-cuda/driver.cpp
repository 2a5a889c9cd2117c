// The CUDA driver API entry points of the fake libcuda (see README.md): the part cudarc reaches
// for finch, plus cheap likely-next ones. Device memory is host memory (memory.cpp); modules are
// PTX texts whose entries must match the kernels compiled into the library (ptx.cpp,
// kernels.cpp); cuLaunchKernel runs the kernel on the CPU, synchronously, after checking the
// launch against what real hardware accepts. Knobs (FAKE_CUDA_*), the call log and the counters
// printed at exit live here too.
//
// Every entry point takes one process-wide lock: the emulator is single-threaded (global thread
// indices, fibers, shared-memory statics), and finch uses one stream, which orders all work anyway.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "fake.h"

#define API extern "C" __attribute__((visibility("default")))

struct FakeContext {
    int unused;
};
struct FakeFunction {
    const fake::KernelEntry* kernel;
    fake::PtxEntry ptx;
    int max_dynamic_smem;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    int carveout;          // CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
    int ptx_arch;          // the module's .target as major * 10 + minor (CU_FUNC_ATTRIBUTE_PTX_VERSION)
};
struct FakeModule {
    std::map<std::string, std::unique_ptr<FakeFunction>> functions;
    std::string target;
};
struct FakeStream {
    unsigned flags;
};
struct FakeEvent {
    unsigned flags;
    bool recorded;
    double ms;  // host time when recorded: execution is synchronous
};

namespace fake {
namespace {

constexpr size_t kDefaultSmem = 48 << 10;  // per block without opting in
// The newest PTX ISA the emulated driver (580, CUDA 13.0) compiles.
constexpr int kMaxPtxMajor = 9, kMaxPtxMinor = 0;
constexpr int kDriverVersion = 13000;

// ---- the emulated device, by compute capability (FAKE_CUDA_CC) ------------------------------------
struct DeviceModel {
    int major, minor;
    const char* like;  // the GPU whose limits these are
    int sms, smem_optin, smem_per_sm, l2_bytes, threads_per_sm, blocks_per_sm, clock_khz, mem_clock_khz, bus_bits;
};
const DeviceModel kModels[] = {
    {7, 0, "V100", 80, 98304, 98304, 6 << 20, 2048, 32, 1530000, 877000, 4096},
    {7, 5, "T4", 40, 65536, 65536, 4 << 20, 1024, 16, 1590000, 5001000, 256},
    {8, 0, "A100", 108, 166912, 167936, 40 << 20, 2048, 32, 1410000, 1215000, 5120},
    {8, 6, "A10", 72, 101376, 102400, 6 << 20, 1536, 16, 1695000, 6251000, 384},
    {8, 9, "L4", 58, 101376, 102400, 48 << 20, 1536, 24, 2040000, 6251000, 192},
    {9, 0, "H100", 132, 232448, 233472, 50 << 20, 2048, 32, 1980000, 2619000, 5120},
};

const DeviceModel* find_model(int major, int minor) {
    for (const DeviceModel& m : kModels)
        if (m.major == major && m.minor == minor) return &m;
    return nullptr;
}

struct Config {
    const DeviceModel* device = find_model(9, 0);
    std::string bad_cc;  // an unknown FAKE_CUDA_CC value, refused by cuInit
    size_t total_mem = 16ull << 30;
    std::string log;       // "" off, "1" stderr, else a file (%p: the process id)
    std::string counters;  // "" off, "1" stderr, else a JSON file (%p: the process id)
};

std::string with_pid(const std::string& path) {
    std::string out;
    for (size_t i = 0; i < path.size(); i++) {
        if (path[i] == '%' && i + 1 < path.size() && path[i + 1] == 'p') {
            out += std::to_string(getpid());
            i++;
        } else {
            out += path[i];
        }
    }
    return out;
}

Config read_config() {
    Config c;
    if (const char* s = getenv("FAKE_CUDA_CC"); s && *s) {
        int major = -1, minor = -1;
        const DeviceModel* m = sscanf(s, "%d.%d", &major, &minor) == 2 ? find_model(major, minor) : nullptr;
        if (m) c.device = m;
        else c.bad_cc = s;
    }
    if (const char* s = getenv("FAKE_CUDA_MEM_MB"); s && *s) c.total_mem = (size_t)(strtod(s, nullptr) * 1048576);
    if (const char* s = getenv("FAKE_CUDA_LOG"); s && *s && strcmp(s, "0") != 0) c.log = s;
    if (const char* s = getenv("FAKE_CUDA_COUNTERS"); s && *s && strcmp(s, "0") != 0) c.counters = s;
    return c;
}

// ---- counters ----------------------------------------------------------------------------------------
struct KernelCount {
    uint64_t launches = 0, blocks = 0, threads = 0;
    double seconds = 0;
    size_t max_dynamic_smem = 0;  // the most dynamic shared memory the emulator gave one launch
};
struct Counters {
    uint64_t launches = 0;
    std::map<std::string, KernelCount> per_kernel;
    uint64_t htod = 0, htod_bytes = 0, dtoh = 0, dtoh_bytes = 0, dtod = 0, dtod_bytes = 0;
    uint64_t memsets = 0, memset_bytes = 0;
    uint64_t stream_syncs = 0, ctx_syncs = 0, event_syncs = 0, blocking_copies = 0;
    uint64_t allocs = 0, alloc_bytes = 0, frees = 0;
    size_t peak_bytes = 0;
    uint64_t modules = 0, errors = 0;
    double launch_seconds = 0;
};

struct State {
    Config cfg = read_config();
    Counters n;
    bool initialised = false;
    bool exit_hook = false;
    int primary_refs = 0;
    std::set<FakeModule*> modules;
    std::set<FakeStream*> streams;
    std::set<FakeEvent*> events;
    CUresult sticky = CUDA_SUCCESS;  // a fault ends the context: every later call returns it
    FILE* log = nullptr;
    LaunchInfo launch{};
};
// Never destroyed (Rust threads may call in while the process exits). Read at load time: the
// knobs are environment variables set before the process starts.
State* const g = new State;
std::recursive_mutex* const g_lock = new std::recursive_mutex;
FakeContext g_primary;
thread_local CUcontext t_current = nullptr;

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const char* error_name(CUresult r) {
    switch (r) {
#define NAME(e) \
    case e: return #e;
        NAME(CUDA_SUCCESS) NAME(CUDA_ERROR_INVALID_VALUE) NAME(CUDA_ERROR_OUT_OF_MEMORY)
        NAME(CUDA_ERROR_NOT_INITIALIZED) NAME(CUDA_ERROR_INVALID_DEVICE) NAME(CUDA_ERROR_INVALID_IMAGE)
        NAME(CUDA_ERROR_INVALID_CONTEXT) NAME(CUDA_ERROR_INVALID_PTX) NAME(CUDA_ERROR_UNSUPPORTED_PTX_VERSION)
        NAME(CUDA_ERROR_INVALID_HANDLE) NAME(CUDA_ERROR_NOT_FOUND) NAME(CUDA_ERROR_NOT_READY)
        NAME(CUDA_ERROR_ILLEGAL_ADDRESS) NAME(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)
        NAME(CUDA_ERROR_MISALIGNED_ADDRESS) NAME(CUDA_ERROR_LAUNCH_FAILED) NAME(CUDA_ERROR_NOT_SUPPORTED)
#undef NAME
        default: return nullptr;
    }
}
// The real driver's wording.
const char* error_string(CUresult r) {
    switch (r) {
        case CUDA_SUCCESS: return "no error";
        case CUDA_ERROR_INVALID_VALUE: return "invalid argument";
        case CUDA_ERROR_OUT_OF_MEMORY: return "out of memory";
        case CUDA_ERROR_NOT_INITIALIZED: return "initialization error";
        case CUDA_ERROR_INVALID_DEVICE: return "invalid device ordinal";
        case CUDA_ERROR_INVALID_IMAGE: return "device kernel image is invalid";
        case CUDA_ERROR_INVALID_CONTEXT: return "invalid device context";
        case CUDA_ERROR_INVALID_PTX: return "a PTX JIT compilation failed";
        case CUDA_ERROR_UNSUPPORTED_PTX_VERSION: return "the provided PTX was compiled with an unsupported toolchain.";
        case CUDA_ERROR_INVALID_HANDLE: return "invalid resource handle";
        case CUDA_ERROR_NOT_FOUND: return "named symbol not found";
        case CUDA_ERROR_NOT_READY: return "device not ready";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "too many resources requested for launch";
        case CUDA_ERROR_MISALIGNED_ADDRESS: return "misaligned address";
        case CUDA_ERROR_LAUNCH_FAILED: return "unspecified launch failure";
        case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported";
        default: return nullptr;
    }
}

// ---- the call log and error lines ---------------------------------------------------------------------
FILE* log_file() {
    if (g->cfg.log.empty()) return nullptr;
    if (!g->log) {
        if (g->cfg.log == "1") {
            g->log = stderr;
        } else {
            g->log = fopen(with_pid(g->cfg.log).c_str(), "a");
            if (!g->log) g->log = stderr;
            setvbuf(g->log, nullptr, _IOLBF, 0);
        }
    }
    return g->log;
}

// One API call: holds the lock; ok() logs the call, fail() also prints one line on stderr.
class Call {
   public:
    explicit Call(const char* fn) : fn_(fn), guard_(*g_lock) {}
    CUresult ok(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
        if (FILE* f = log_file()) {
            va_list ap;
            va_start(ap, fmt);
            fprintf(f, "[fake-cuda] %s", fn_);
            vfprintf(f, fmt, ap);
            fprintf(f, " = CUDA_SUCCESS\n");
            va_end(ap);
        }
        return CUDA_SUCCESS;
    }
    CUresult fail(CUresult r, const char* fmt, ...) __attribute__((format(printf, 3, 4))) {
        char msg[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        fprintf(stderr, "[fake-cuda] %s: %s (%s)\n", fn_, msg, error_name(r));
        if (FILE* f = log_file(); f && f != stderr) fprintf(f, "[fake-cuda] %s: %s = %s\n", fn_, msg, error_name(r));
        g->n.errors++;
        return r;
    }
    // An error the caller expects to see now and then (logged, not printed).
    CUresult quiet(CUresult r, const char* what = "") {
        if (FILE* f = log_file()) fprintf(f, "[fake-cuda] %s%s = %s\n", fn_, what, error_name(r));
        return r;
    }
    // After a fault the context is unusable, as on a GPU: the same error from every call.
    bool dead(CUresult* r) {
        if (g->sticky == CUDA_SUCCESS) return false;
        *r = quiet(g->sticky, " (the context is dead after an earlier fault)");
        return true;
    }

   private:
    const char* fn_;
    std::lock_guard<std::recursive_mutex> guard_;
};

#define NEED_INIT \
    if (!g->initialised) return call.fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called")
#define NEED_CONTEXT                                                                   \
    NEED_INIT;                                                                         \
    if (!t_current) return call.fail(CUDA_ERROR_INVALID_CONTEXT, "no current context on this thread"); \
    if (CUresult r_; call.dead(&r_)) return r_

// ---- counters at exit ---------------------------------------------------------------------------------
std::string counters_json() {
    const Counters& n = g->n;
    std::string s;
    char b[512];
    snprintf(b, sizeof b, "{\"pid\": %d, \"compute_capability\": \"%d.%d\", \"launches\": %llu, \"per_kernel\": {",
             (int)getpid(), g->cfg.device->major, g->cfg.device->minor, (unsigned long long)n.launches);
    s += b;
    bool first = true;
    for (auto& [name, k] : n.per_kernel) {
        snprintf(b, sizeof b,
                 "%s\"%s\": {\"launches\": %llu, \"blocks\": %llu, \"threads\": %llu, \"seconds\": %.6f, "
                 "\"max_dynamic_smem\": %zu}",
                 first ? "" : ", ", name.c_str(), (unsigned long long)k.launches, (unsigned long long)k.blocks,
                 (unsigned long long)k.threads, k.seconds, k.max_dynamic_smem);
        s += b;
        first = false;
    }
    snprintf(b, sizeof b,
             "}, \"htod\": {\"count\": %llu, \"bytes\": %llu}, \"dtoh\": {\"count\": %llu, \"bytes\": %llu}, "
             "\"dtod\": {\"count\": %llu, \"bytes\": %llu}, \"memsets\": {\"count\": %llu, \"bytes\": %llu}, ",
             (unsigned long long)n.htod, (unsigned long long)n.htod_bytes, (unsigned long long)n.dtoh,
             (unsigned long long)n.dtoh_bytes, (unsigned long long)n.dtod, (unsigned long long)n.dtod_bytes,
             (unsigned long long)n.memsets, (unsigned long long)n.memset_bytes);
    s += b;
    snprintf(b, sizeof b,
             "\"syncs\": {\"total\": %llu, \"stream\": %llu, \"context\": %llu, \"event\": %llu, \"blocking_copies\": "
             "%llu}, \"memory\": {\"allocs\": %llu, \"alloc_bytes\": %llu, \"frees\": %llu, \"peak_bytes\": %zu, "
             "\"live_bytes\": %zu}, \"modules_loaded\": %llu, \"errors\": %llu, \"launch_seconds\": %.6f, "
             "\"fiber_switches\": %llu}",
             (unsigned long long)(n.stream_syncs + n.ctx_syncs + n.event_syncs + n.blocking_copies),
             (unsigned long long)n.stream_syncs, (unsigned long long)n.ctx_syncs, (unsigned long long)n.event_syncs,
             (unsigned long long)n.blocking_copies, (unsigned long long)n.allocs, (unsigned long long)n.alloc_bytes,
             (unsigned long long)n.frees, n.peak_bytes, live_bytes(), (unsigned long long)n.modules,
             (unsigned long long)n.errors, n.launch_seconds, (unsigned long long)fiber_switches());
    s += b;
    return s;
}

std::string human_bytes(uint64_t b) {
    char s[32];
    if (b < 10000) snprintf(s, sizeof s, "%llu B", (unsigned long long)b);
    else if (b < 10000000) snprintf(s, sizeof s, "%.1f KiB", b / 1024.0);
    else snprintf(s, sizeof s, "%.1f MiB", b / 1048576.0);
    return s;
}

void print_counters() {
    std::lock_guard<std::recursive_mutex> guard(*g_lock);
    const Counters& n = g->n;
    const std::string json = counters_json();
    if (g->cfg.counters != "1") {
        const std::string path = with_pid(g->cfg.counters);
        if (FILE* f = fopen(path.c_str(), "w")) {
            fprintf(f, "%s\n", json.c_str());
            fclose(f);
        } else {
            fprintf(stderr, "[fake-cuda] cannot write the counters to %s\n", path.c_str());
        }
        return;
    }
    fprintf(stderr, "[fake-cuda] counters of process %d (emulated sm_%d%d):\n", (int)getpid(), g->cfg.device->major,
            g->cfg.device->minor);
    fprintf(stderr, "  kernel launches     %8llu  (%zu kernels, %.2f s emulating)\n", (unsigned long long)n.launches,
            n.per_kernel.size(), n.launch_seconds);
    for (auto& [name, k] : n.per_kernel)
        fprintf(stderr, "    %-36s %6llu  %8.3f s\n", name.c_str(), (unsigned long long)k.launches, k.seconds);
    fprintf(stderr, "  host->device copies %8llu  (%s)\n", (unsigned long long)n.htod, human_bytes(n.htod_bytes).c_str());
    fprintf(stderr, "  device->host copies %8llu  (%s)\n", (unsigned long long)n.dtoh, human_bytes(n.dtoh_bytes).c_str());
    fprintf(stderr, "  device copies       %8llu  (%s)\n", (unsigned long long)n.dtod, human_bytes(n.dtod_bytes).c_str());
    fprintf(stderr, "  memsets             %8llu  (%s)\n", (unsigned long long)n.memsets,
            human_bytes(n.memset_bytes).c_str());
    fprintf(stderr, "  host synchronisations %6llu  (stream %llu, context %llu, event %llu, blocking copies %llu)\n",
            (unsigned long long)(n.stream_syncs + n.ctx_syncs + n.event_syncs + n.blocking_copies),
            (unsigned long long)n.stream_syncs, (unsigned long long)n.ctx_syncs, (unsigned long long)n.event_syncs,
            (unsigned long long)n.blocking_copies);
    fprintf(stderr, "  allocations         %8llu  (%s; peak %s), frees %llu\n", (unsigned long long)n.allocs,
            human_bytes(n.alloc_bytes).c_str(), human_bytes(n.peak_bytes).c_str(), (unsigned long long)n.frees);
    fprintf(stderr, "  errors returned     %8llu\n", (unsigned long long)n.errors);
    fprintf(stderr, "[fake-cuda] counters %s\n", json.c_str());
}

bool valid_stream(CUstream s) {
    // NULL, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD, or one created here.
    return s == nullptr || s == (CUstream)0x1 || s == (CUstream)0x2 || g->streams.count(s);
}
bool valid_function(CUfunction f) {
    for (FakeModule* m : g->modules)
        for (auto& [name, p] : m->functions)
            if (p.get() == f) return true;
    return false;
}

}  // namespace

const LaunchInfo& current_launch() { return g->launch; }

}  // namespace fake

using namespace fake;

// ---- initialisation and the device --------------------------------------------------------------------
API CUresult cuInit(unsigned flags) {
    Call call("cuInit");
    if (flags != 0) return call.fail(CUDA_ERROR_INVALID_VALUE, "flags %u: must be 0", flags);
    if (!g->cfg.bad_cc.empty())
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "FAKE_CUDA_CC=%s is not an emulated device (7.0, 7.5, 8.0, 8.6, 8.9 or 9.0)",
                         g->cfg.bad_cc.c_str());
    if (!g->initialised) {
        g->initialised = true;
        install_fault_handler();
        // Here rather than at load: cudarc loads and unloads the library once just to probe it.
        if (!g->cfg.counters.empty() && !g->exit_hook) {
            g->exit_hook = true;
            atexit(print_counters);
        }
    }
    return call.ok("(0)");
}
API CUresult cuDriverGetVersion(int* v) {
    Call call("cuDriverGetVersion");
    if (!v) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *v = kDriverVersion;
    return call.ok(" -> %d", *v);
}
API CUresult cuDeviceGetCount(int* n) {
    Call call("cuDeviceGetCount");
    NEED_INIT;
    if (!n) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *n = 1;
    return call.ok(" -> 1");
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    Call call("cuDeviceGet");
    NEED_INIT;
    if (!d) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (ordinal != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d: the fake has one device, 0", ordinal);
    *d = 0;
    return call.ok("(0)");
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    Call call("cuDeviceGetName");
    NEED_INIT;
    if (d != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d", d);
    if (!name || len <= 0) return call.fail(CUDA_ERROR_INVALID_VALUE, "no buffer");
    snprintf(name, (size_t)len, "Fake CUDA sm_%d%d (%s limits; kernels emulated on the CPU)", g->cfg.device->major,
             g->cfg.device->minor, g->cfg.device->like);
    return call.ok(" -> \"%s\"", name);
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    Call call("cuDeviceTotalMem_v2");
    NEED_INIT;
    if (d != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d", d);
    if (!bytes) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *bytes = g->cfg.total_mem;
    return call.ok(" -> %zu", *bytes);
}
API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) {
    Call call("cuDeviceGetUuid_v2");
    NEED_INIT;
    if (d != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d", d);
    if (!uuid) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    memcpy(uuid, "fake-cuda-dev-00", 16);
    return call.ok("()");
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    Call call("cuDeviceGetAttribute");
    NEED_INIT;
    if (d != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d", d);
    if (!v) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    const DeviceModel& m = *g->cfg.device;
    switch (attr) {
        case 1: *v = 1024; break;                  // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;          // MAX_BLOCK_DIM_X, _Y
        case 4: *v = 64; break;                    // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;            // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;         // MAX_GRID_DIM_Y, _Z
        case 8: *v = (int)kDefaultSmem; break;     // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *v = 65536; break;                 // TOTAL_CONSTANT_MEMORY
        case 10: *v = 32; break;                   // WARP_SIZE
        case 11: *v = 2147483647; break;           // MAX_PITCH
        case 12: case 82: *v = 65536; break;       // MAX_REGISTERS_PER_BLOCK, _PER_MULTIPROCESSOR
        case 13: *v = m.clock_khz; break;          // CLOCK_RATE
        case 14: *v = 512; break;                  // TEXTURE_ALIGNMENT
        case 15: case 31: *v = 1; break;           // GPU_OVERLAP, CONCURRENT_KERNELS
        case 16: *v = m.sms; break;                // MULTIPROCESSOR_COUNT
        case 17: case 18: case 20: case 35: *v = 0; break;  // KERNEL_EXEC_TIMEOUT, INTEGRATED, COMPUTE_MODE, TCC
        case 19: *v = 1; break;                    // CAN_MAP_HOST_MEMORY
        case 32: *v = 1; break;                    // ECC_ENABLED
        case 33: case 34: case 50: *v = 0; break;  // PCI bus, device, domain
        case 36: *v = m.mem_clock_khz; break;      // MEMORY_CLOCK_RATE
        case 37: *v = m.bus_bits; break;           // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = m.l2_bytes; break;           // L2_CACHE_SIZE
        case 39: *v = m.threads_per_sm; break;     // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: *v = 2; break;                    // ASYNC_ENGINE_COUNT
        case 41: *v = 1; break;                    // UNIFIED_ADDRESSING
        case 75: *v = m.major; break;              // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = m.minor; break;              // COMPUTE_CAPABILITY_MINOR
        case 78: case 79: case 80: case 83: *v = 1; break;  // stream priorities, L1 caching, managed memory
        case 81: *v = m.smem_per_sm; break;        // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 84: *v = 0; break;                    // MULTI_GPU_BOARD
        case 95: *v = 1; break;                    // COOPERATIVE_LAUNCH
        case 97: *v = m.smem_optin; break;         // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: *v = m.blocks_per_sm; break;     // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 111: *v = 1024; break;                // RESERVED_SHARED_MEMORY_PER_BLOCK
        case 115: *v = 1; break;                   // MEMORY_POOLS_SUPPORTED (cudarc then uses cuMemAllocAsync)
        default:
            return call.fail(CUDA_ERROR_INVALID_VALUE, "attribute %d is not emulated (add it to driver.cpp)", attr);
    }
    return call.ok("(%d) -> %d", attr, *v);
}

// ---- contexts: one primary context ------------------------------------------------------------------
API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    Call call("cuDevicePrimaryCtxRetain");
    NEED_INIT;
    if (d != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d", d);
    if (!ctx) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    g->primary_refs++;
    *ctx = &g_primary;
    return call.ok(" -> %d references", g->primary_refs);
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    Call call("cuDevicePrimaryCtxRelease_v2");
    NEED_INIT;
    if (d != 0) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d", d);
    if (g->primary_refs == 0) return call.fail(CUDA_ERROR_INVALID_CONTEXT, "the primary context is not retained");
    g->primary_refs--;
    return call.ok(" -> %d references", g->primary_refs);
}
API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    Call call("cuCtxGetCurrent");
    NEED_INIT;
    if (!ctx) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *ctx = t_current;
    return call.ok(" -> %p", (void*)t_current);
}
API CUresult cuCtxSetCurrent(CUcontext ctx) {
    Call call("cuCtxSetCurrent");
    NEED_INIT;
    if (ctx && ctx != &g_primary) return call.fail(CUDA_ERROR_INVALID_CONTEXT, "%p is not a context", (void*)ctx);
    t_current = ctx;
    return call.ok("(%p)", (void*)ctx);
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    Call call("cuCtxGetDevice");
    NEED_CONTEXT;
    if (!d) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *d = 0;
    return call.ok("()");
}
API CUresult cuCtxSynchronize() {
    Call call("cuCtxSynchronize");
    NEED_CONTEXT;
    g->n.ctx_syncs++;
    return call.ok("()");
}

// ---- errors -----------------------------------------------------------------------------------------
API CUresult cuGetErrorName(CUresult r, const char** s) {
    Call call("cuGetErrorName");
    if (!s) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *s = error_name(r);
    return *s ? call.ok("(%d)", r) : call.quiet(CUDA_ERROR_INVALID_VALUE, " (a code the fake never returns)");
}
API CUresult cuGetErrorString(CUresult r, const char** s) {
    Call call("cuGetErrorString");
    if (!s) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *s = error_string(r);
    return *s ? call.ok("(%d)", r) : call.quiet(CUDA_ERROR_INVALID_VALUE, " (a code the fake never returns)");
}

// ---- memory -----------------------------------------------------------------------------------------
namespace {
CUresult do_alloc(Call& call, CUdeviceptr* p, size_t bytes) {
    NEED_CONTEXT;
    if (!p) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL result pointer");
    if (bytes == 0) return call.fail(CUDA_ERROR_INVALID_VALUE, "0 bytes: the driver refuses empty allocations");
    std::string why;
    const Allocation* a = allocate(bytes, g->cfg.total_mem, &why);
    if (!a)
        return call.fail(CUDA_ERROR_OUT_OF_MEMORY, "%zu bytes: %s (FAKE_CUDA_MEM_MB sets the device's size)", bytes,
                         why.c_str());
    *p = a->start;
    g->n.allocs++;
    g->n.alloc_bytes += bytes;
    g->n.peak_bytes = std::max(g->n.peak_bytes, live_bytes());
    return call.ok("(%zu bytes) -> %#llx (#%llu)", bytes, *p, (unsigned long long)a->id);
}
CUresult do_free(Call& call, CUdeviceptr p) {
    NEED_CONTEXT;
    if (p == 0) return call.ok("(NULL)");
    const Allocation* a = live_at(p);
    if (!a) {
        if (const Allocation* f = freed_holding(p); f && f->start == p)
            return call.fail(CUDA_ERROR_INVALID_VALUE, "%#llx: double free of allocation #%llu (%zu bytes)", p,
                             (unsigned long long)f->id, f->size);
        if (const Allocation* in = live_holding(p, 1))
            return call.fail(CUDA_ERROR_INVALID_VALUE, "%#llx is inside allocation #%llu (%zu bytes at %#lx), not its start",
                             p, (unsigned long long)in->id, in->size, (unsigned long)in->start);
        return call.fail(CUDA_ERROR_INVALID_VALUE, "%#llx is not a device allocation", p);
    }
    const unsigned long long id = a->id;
    release(a);
    g->n.frees++;
    return call.ok("(%#llx, #%llu)", p, id);
}
// [p, p + n) must lie inside one live allocation.
CUresult check_range(Call& call, const char* what, CUdeviceptr p, size_t n) {
    if (n == 0 || live_holding(p, n)) return CUDA_SUCCESS;
    if (const Allocation* f = freed_holding(p))
        return call.fail(CUDA_ERROR_INVALID_VALUE, "%s %#llx is in allocation #%llu, already freed (use after free)",
                         what, p, (unsigned long long)f->id);
    if (const Allocation* a = live_holding(p, 1))
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "%s [%#llx, +%zu) runs %zu bytes past the end of allocation #%llu (%zu bytes at %#lx)", what,
                         p, n, (size_t)(p + n - (a->start + a->size)), (unsigned long long)a->id, a->size,
                         (unsigned long)a->start);
    return call.fail(CUDA_ERROR_INVALID_VALUE, "%s %#llx is not device memory", what, p);
}
CUresult do_memset(Call& call, CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    if (CUresult r = check_range(call, "destination", p, n)) return r;
    memset((void*)(uintptr_t)p, v, n);
    g->n.memsets++;
    g->n.memset_bytes += n;
    return call.ok("(%#llx, %#x, %zu bytes)", p, v, n);
}
CUresult do_htod(Call& call, CUdeviceptr dst, const void* src, size_t n, CUstream s, bool blocking) {
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    if (n && !src) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL host pointer");
    if (CUresult r = check_range(call, "destination", dst, n)) return r;
    memcpy((void*)(uintptr_t)dst, src, n);
    g->n.htod++;
    g->n.htod_bytes += n;
    g->n.blocking_copies += blocking;
    return call.ok("(%#llx, %zu bytes)", dst, n);
}
CUresult do_dtoh(Call& call, void* dst, CUdeviceptr src, size_t n, CUstream s, bool blocking) {
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    if (n && !dst) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL host pointer");
    if (CUresult r = check_range(call, "source", src, n)) return r;
    memcpy(dst, (const void*)(uintptr_t)src, n);
    g->n.dtoh++;
    g->n.dtoh_bytes += n;
    g->n.blocking_copies += blocking;
    return call.ok("(%#llx, %zu bytes)", src, n);
}
CUresult do_dtod(Call& call, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    if (CUresult r = check_range(call, "destination", dst, n)) return r;
    if (CUresult r = check_range(call, "source", src, n)) return r;
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    g->n.dtod++;
    g->n.dtod_bytes += n;
    return call.ok("(%#llx <- %#llx, %zu bytes)", dst, src, n);
}
}  // namespace

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    Call call("cuMemAlloc_v2");
    return do_alloc(call, p, bytes);
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    Call call("cuMemAllocAsync");
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    return do_alloc(call, p, bytes);
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    Call call("cuMemFree_v2");
    return do_free(call, p);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    Call call("cuMemFreeAsync");
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    return do_free(call, p);
}
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Call call("cuMemGetInfo_v2");
    NEED_CONTEXT;
    if (!free_bytes || !total) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *total = g->cfg.total_mem;
    *free_bytes = *total - std::min(*total, live_bytes());
    return call.ok(" -> %zu free of %zu", *free_bytes, *total);
}
API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    Call call("cuMemsetD8_v2");
    return do_memset(call, p, v, n, nullptr);
}
API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    Call call("cuMemsetD8Async");
    return do_memset(call, p, v, n, s);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    Call call("cuMemcpyHtoD_v2");
    return do_htod(call, dst, src, n, nullptr, true);
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    Call call("cuMemcpyHtoDAsync_v2");
    return do_htod(call, dst, src, n, s, false);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    Call call("cuMemcpyDtoH_v2");
    return do_dtoh(call, dst, src, n, nullptr, true);
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    Call call("cuMemcpyDtoHAsync_v2");
    return do_dtoh(call, dst, src, n, s, false);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    Call call("cuMemcpyDtoD_v2");
    return do_dtod(call, dst, src, n, nullptr);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    Call call("cuMemcpyDtoDAsync_v2");
    return do_dtod(call, dst, src, n, s);
}

// ---- streams and events: execution is synchronous, so they only keep order and time ----------------
API CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    Call call("cuStreamCreate");
    NEED_CONTEXT;
    if (!s) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *s = new FakeStream{flags};
    g->streams.insert(*s);
    return call.ok(" -> %p", (void*)*s);
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    Call call("cuStreamDestroy_v2");
    NEED_INIT;
    if (!g->streams.erase(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    delete s;
    return call.ok("(%p)", (void*)s);
}
API CUresult cuStreamSynchronize(CUstream s) {
    Call call("cuStreamSynchronize");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    g->n.stream_syncs++;
    return call.ok("(%p)", (void*)s);
}
API CUresult cuStreamQuery(CUstream s) {
    Call call("cuStreamQuery");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    return call.ok("(%p)", (void*)s);
}
API CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    Call call("cuStreamWaitEvent");
    NEED_CONTEXT;
    if (!valid_stream(s) || !g->events.count(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "bad stream or event");
    return call.ok("()");
}
API CUresult cuEventCreate(CUevent* e, unsigned flags) {
    Call call("cuEventCreate");
    NEED_CONTEXT;
    if (!e) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *e = new FakeEvent{flags, false, 0};
    g->events.insert(*e);
    return call.ok("(flags %#x) -> %p", flags, (void*)*e);
}
API CUresult cuEventDestroy_v2(CUevent e) {
    Call call("cuEventDestroy_v2");
    NEED_INIT;
    if (!g->events.erase(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not an event", (void*)e);
    delete e;
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventRecord(CUevent e, CUstream s) {
    Call call("cuEventRecord");
    NEED_CONTEXT;
    if (!g->events.count(e) || !valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "bad event or stream");
    e->recorded = true;
    e->ms = now_ms();
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventSynchronize(CUevent e) {
    Call call("cuEventSynchronize");
    NEED_CONTEXT;
    if (!g->events.count(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not an event", (void*)e);
    g->n.event_syncs++;
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventQuery(CUevent e) {
    Call call("cuEventQuery");
    NEED_CONTEXT;
    if (!g->events.count(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not an event", (void*)e);
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    Call call("cuEventElapsedTime_v2");
    NEED_CONTEXT;
    if (!ms) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (!g->events.count(a) || !g->events.count(b)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "bad event");
    if ((a->flags | b->flags) & 0x2)
        return call.fail(CUDA_ERROR_INVALID_HANDLE, "an event created with CU_EVENT_DISABLE_TIMING");
    if (!a->recorded || !b->recorded) return call.fail(CUDA_ERROR_INVALID_HANDLE, "an event never recorded");
    *ms = (float)(b->ms - a->ms);  // host time: the emulator's, not a GPU's
    return call.ok(" -> %.3f ms", *ms);
}
API CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime_v2(ms, a, b); }

// ---- modules and functions ------------------------------------------------------------------------
namespace {
// "sm_90a" -> 9, 0, 'a'; false if not sm_NN.
bool parse_target(const std::string& t, int* major, int* minor, char* suffix) {
    if (t.rfind("sm_", 0) != 0) return false;
    char* end;
    long n = strtol(t.c_str() + 3, &end, 10);
    if (end == t.c_str() + 3) return false;
    *major = (int)(n / 10);
    *minor = (int)(n % 10);
    *suffix = *end;
    return true;
}
// Parameter lists in words, for the mismatch message: ".u64 .u32 .f32" and "ptr int32 float".
std::string ptx_params(const std::vector<PtxParam>& ps) {
    std::string s;
    for (const PtxParam& p : ps)
        s += std::string(s.empty() ? "" : " ") + "." + (p.kind == 'i' ? 'u' : p.kind) + std::to_string(p.size * 8);
    return s;
}
std::string cpp_params(const KernelEntry& k) {
    std::string s;
    for (int i = 0; i < k.nparams; i++)
        s += std::string(i ? " " : "") + (k.is_pointer[i] ? "ptr"
                                          : k.is_float[i] ? (k.size[i] == 4 ? "float" : "double")
                                                          : "int" + std::to_string(k.size[i] * 8));
    return s;
}
}  // namespace

API CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    Call call("cuModuleLoadData");
    NEED_CONTEXT;
    if (!out || !image) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    const unsigned char* bytes = (const unsigned char*)image;
    // A cubin or fatbin: machine code the fake cannot run. finch tries its cubins first and falls
    // back to the PTX, so this is expected, not a refusal worth a line (FAKE_CUDA_LOG shows it).
    if (memcmp(bytes, "\x7f" "ELF", 4) == 0 || memcmp(bytes, "\x50\xed\x55\xba", 4) == 0)
        return call.quiet(CUDA_ERROR_NOT_SUPPORTED, " (a cubin or fatbin image: the fake driver reads PTX text only)");
    PtxModule ptx;
    std::string err;
    if (!parse_ptx((const char*)image, &ptx, &err)) return call.fail(CUDA_ERROR_INVALID_PTX, "%s", err.c_str());
    const DeviceModel& dev = *g->cfg.device;
    if (ptx.version_major > kMaxPtxMajor || (ptx.version_major == kMaxPtxMajor && ptx.version_minor > kMaxPtxMinor))
        return call.fail(CUDA_ERROR_UNSUPPORTED_PTX_VERSION,
                         "PTX ISA %d.%d is newer than driver 580 (CUDA 13.0) compiles (at most %d.%d): the PTX comes "
                         "from a newer nvcc than the driver",
                         ptx.version_major, ptx.version_minor, kMaxPtxMajor, kMaxPtxMinor);
    int tmaj, tmin;
    char suffix;
    if (!parse_target(ptx.target, &tmaj, &tmin, &suffix))
        return call.fail(CUDA_ERROR_INVALID_PTX, ".target %s is not sm_NN", ptx.target.c_str());
    const bool newer = tmaj > dev.major || (tmaj == dev.major && tmin > dev.minor);
    // sm_90a: that exact device only; sm_100f: that family (same major) only.
    const bool arch_specific = (suffix == 'a' && (tmaj != dev.major || tmin != dev.minor)) ||
                               (suffix == 'f' && tmaj != dev.major);
    if (newer || arch_specific)
        return call.fail(CUDA_ERROR_INVALID_PTX, "PTX for .target %s cannot run on this sm_%d%d device%s",
                         ptx.target.c_str(), dev.major, dev.minor,
                         suffix == 'a' ? " (arch-specific PTX runs only on its exact compute capability)" : "");
    auto mod = std::make_unique<FakeModule>();
    mod->target = ptx.target;
    for (const PtxEntry& e : ptx.entries) {
        const KernelEntry* k = find_kernel(e.name.c_str());
        if (!k)
            return call.fail(CUDA_ERROR_INVALID_IMAGE,
                             "kernel %s is in the PTX but not compiled into the fake driver: rebuild it "
                             "(tools/kernel-emu/fake-cuda/build.sh) from the same kernels/*.cu",
                             e.name.c_str());
        // Sizes must agree; untyped .b* parameters may hold anything of their size, .f* ones
        // must be floating point in C++ and .u*/.s* ones must not.
        int differs = (int)e.params.size() == k->nparams ? -1 : std::min((int)e.params.size(), k->nparams);
        for (int i = 0; differs < 0 && i < k->nparams; i++)
            if (e.params[i].size != k->size[i] ||
                (e.params[i].kind != 'b' && (e.params[i].kind == 'f') != k->is_float[i]))
                differs = i;
        if (differs >= 0)
            return call.fail(CUDA_ERROR_INVALID_IMAGE,
                             "kernel %s: the PTX's parameters (%s) differ from those of the C++ source compiled into "
                             "the fake (%s), from parameter %d: the PTX and the fake come from different "
                             "kernels/*.cu; rebuild both",
                             e.name.c_str(), ptx_params(e.params).c_str(), cpp_params(*k).c_str(), differs);
        if (e.static_smem > kDefaultSmem)
            return call.fail(CUDA_ERROR_INVALID_PTX, "kernel %s declares %zu bytes of static shared memory (at most %zu)",
                             e.name.c_str(), e.static_smem, kDefaultSmem);
        if (e.maxntid > 1024)
            return call.fail(CUDA_ERROR_INVALID_PTX, "kernel %s: .maxntid %u exceeds 1024", e.name.c_str(), e.maxntid);
        mod->functions[e.name] = std::make_unique<FakeFunction>(
            FakeFunction{k, e, (int)(kDefaultSmem - e.static_smem), -1, tmaj * 10 + tmin});
    }
    *out = mod.release();
    g->modules.insert(*out);
    g->n.modules++;
    if (FILE* f = log_file())
        for (const PtxEntry& e : ptx.entries)
            fprintf(f, "[fake-cuda]   entry %s: %zu params, at most %u threads, %zu bytes static shared memory\n",
                    e.name.c_str(), e.params.size(), e.maxntid, e.static_smem);
    return call.ok(" (PTX %d.%d, %s, %zu entries) -> %p", ptx.version_major, ptx.version_minor, ptx.target.c_str(),
                   ptx.entries.size(), (void*)*out);
}
API CUresult cuModuleUnload(CUmodule m) {
    Call call("cuModuleUnload");
    NEED_INIT;
    if (!g->modules.erase(m)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a module", (void*)m);
    delete m;
    return call.ok("(%p)", (void*)m);
}
API CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    Call call("cuModuleGetFunction");
    NEED_CONTEXT;
    if (!f || !name) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (!g->modules.count(m)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a module", (void*)m);
    auto it = m->functions.find(name);
    if (it == m->functions.end())
        return call.fail(CUDA_ERROR_NOT_FOUND, "no kernel %s in this module (%zu entries, %s)", name,
                         m->functions.size(), m->target.c_str());
    *f = it->second.get();
    return call.ok("(%s) -> %p", name, (void*)*f);
}
API CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    Call call("cuFuncGetAttribute");
    NEED_CONTEXT;
    if (!v) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (!valid_function(f)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a function", (void*)f);
    const DeviceModel& dev = *g->cfg.device;
    switch (attr) {
        case 0: *v = (int)f->ptx.maxntid; break;          // MAX_THREADS_PER_BLOCK
        case 1: *v = (int)f->ptx.static_smem; break;      // SHARED_SIZE_BYTES
        case 2: case 3: case 7: *v = 0; break;            // CONST_SIZE_BYTES, LOCAL_SIZE_BYTES, CACHE_MODE_CA
        // NUM_REGS: unknown without ptxas; the most its launch bounds allow (65536 per block).
        case 4: *v = std::min(255, (int)(65536 / f->ptx.maxntid) / 8 * 8); break;
        case 5: *v = f->ptx_arch; break;                  // PTX_VERSION: the virtual architecture
        case 6: *v = dev.major * 10 + dev.minor; break;   // BINARY_VERSION: JIT-compiled for this device
        case 8: *v = f->max_dynamic_smem; break;          // MAX_DYNAMIC_SHARED_SIZE_BYTES
        case 9: *v = f->carveout; break;                  // PREFERRED_SHARED_MEMORY_CARVEOUT
        default: return call.fail(CUDA_ERROR_INVALID_VALUE, "function attribute %d is not emulated", attr);
    }
    return call.ok("(%s, %d) -> %d", f->kernel->name, attr, *v);
}
API CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    Call call("cuFuncSetAttribute");
    NEED_CONTEXT;
    if (!valid_function(f)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a function", (void*)f);
    const int optin = g->cfg.device->smem_optin;
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES: static + dynamic within the opt-in maximum
        if (v < 0 || (size_t)v + f->ptx.static_smem > (size_t)optin)
            return call.fail(CUDA_ERROR_INVALID_VALUE,
                             "%s: %d bytes of dynamic shared memory + %zu static exceed the %d bytes a block may have "
                             "on sm_%d%d",
                             f->kernel->name, v, f->ptx.static_smem, optin, g->cfg.device->major, g->cfg.device->minor);
        f->max_dynamic_smem = v;
    } else if (attr == 9) {  // PREFERRED_SHARED_MEMORY_CARVEOUT: a hint, -1 or 0..100 percent
        if (v < -1 || v > 100) return call.fail(CUDA_ERROR_INVALID_VALUE, "carveout %d: not -1 or 0..100", v);
        f->carveout = v;
    } else {
        return call.fail(CUDA_ERROR_INVALID_VALUE, "function attribute %d cannot be set (or is not emulated)", attr);
    }
    return call.ok("(%s, %d, %d)", f->kernel->name, attr, v);
}

// ---- launch -----------------------------------------------------------------------------------------
API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    Call call("cuLaunchKernel");
    NEED_CONTEXT;
    if (!valid_function(f)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a function", (void*)f);
    const KernelEntry& k = *f->kernel;
    // Every message names the kernel and the launch.
    char what[200];
    snprintf(what, sizeof what, "%s grid (%u,%u,%u) block (%u,%u,%u) smem %u", k.name, gx, gy, gz, bx, by, bz, smem);
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%s: %p is not a stream", what, (void*)s);
    if (extra) return call.fail(CUDA_ERROR_NOT_SUPPORTED, "%s: `extra` launch arguments are not emulated", what);
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "%s: the grid must be within (1..2147483647, 1..65535, 1..65535) blocks", what);
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || threads > 1024)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "%s: a block must be within (1024, 1024, 64) threads and 1024 in all", what);
    if (threads > f->ptx.maxntid)
        return call.fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                         "%s: %llu threads per block exceed the kernel's __launch_bounds__ (.maxntid %u)", what,
                         threads, f->ptx.maxntid);
    if ((size_t)smem + f->ptx.static_smem > (size_t)g->cfg.device->smem_optin)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "%s: %u bytes of dynamic + %zu of static shared memory exceed the sm_%d%d maximum of %d", what,
                         smem, f->ptx.static_smem, g->cfg.device->major, g->cfg.device->minor,
                         g->cfg.device->smem_optin);
    if ((int)smem > f->max_dynamic_smem)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "%s: %u bytes of dynamic shared memory exceed the kernel's limit of %d (%zu static; raise "
                         "it with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES))",
                         what, smem, f->max_dynamic_smem, f->ptx.static_smem);
    if (k.nparams > 0 && !params) return call.fail(CUDA_ERROR_INVALID_VALUE, "%s: kernelParams is NULL", what);
    // Pointer arguments: NULL, or inside a live allocation (its end included: an empty tensor
    // may sit there) and aligned for what they point to. On a GPU these fault inside the kernel;
    // here they are refused before it runs, with the same error, and end the context the same way.
    for (int i = 0; i < k.nparams; i++) {
        if (!params[i]) return call.fail(CUDA_ERROR_INVALID_VALUE, "%s: kernelParams[%d] is NULL", what, i);
        if (!k.is_pointer[i]) continue;
        uintptr_t p;
        memcpy(&p, params[i], sizeof p);
        if (p == 0) continue;
        CUresult r = CUDA_SUCCESS;
        if (const Allocation* fr = freed_holding(p); fr && !live_holding(p, 0))
            r = call.fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                          "%s: argument %d (%#lx) points into allocation #%llu (%zu bytes), which was freed (use "
                          "after free)",
                          what, i, (unsigned long)p, (unsigned long long)fr->id, fr->size);
        else if (!live_holding(p, 0))
            r = call.fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                          "%s: argument %d (%#lx) points into no live device allocation (a host pointer, or not a "
                          "pointer?)",
                          what, i, (unsigned long)p);
        else if (p % k.pointee_align[i])
            r = call.fail(CUDA_ERROR_MISALIGNED_ADDRESS, "%s: argument %d (%#lx) is not %zu-byte aligned for its type",
                          what, i, (unsigned long)p, k.pointee_align[i]);
        if (r) {
            g->sticky = r;
            return r;
        }
    }
    ensure_signal_stack();
    g->launch = LaunchInfo{k.name, {gx, gy, gz}, {bx, by, bz}, smem, pthread_self()};
    const double t0 = now_ms();
    run_kernel(k, params, Dims{gx, gy, gz}, Dims{bx, by, bz}, smem, f->ptx.static_smem > 0);
    const double seconds = (now_ms() - t0) / 1000;
    g->launch.kernel = nullptr;
    std::string damage;
    if (!check_canaries(&damage)) {
        fprintf(stderr,
                "[fake-cuda] out-of-bounds write in kernel %s (found after it ran, so the block and thread are "
                "unknown): %s\n",
                what, damage.c_str());
        abort();
    }
    KernelCount& kc = g->n.per_kernel[k.name];
    kc.launches++;
    kc.blocks += (unsigned long long)gx * gy * gz;
    kc.threads += (unsigned long long)gx * gy * gz * threads;
    kc.seconds += seconds;
    kc.max_dynamic_smem = std::max(kc.max_dynamic_smem, last_dynamic_smem());
    g->n.launches++;
    g->n.launch_seconds += seconds;
    return call.ok("(%s) %.3f s", what, seconds);
}

// For an in-process reader of the counters (the self-test; a later per-step measurement): writes
// the JSON object printed at exit into buf (NUL-terminated, truncated to n) and returns its length.
API size_t fake_cuda_counters_json(char* buf, size_t n) {
    std::lock_guard<std::recursive_mutex> guard(*g_lock);
    const std::string s = counters_json();
    if (buf && n) snprintf(buf, n, "%s", s.c_str());
    return s.size();
}
