// The CUDA driver API entry points of the fake libcuda (see README.md): the part cudarc reaches
// for finch, plus cheap likely-next ones. Device memory is host memory (memory.cpp); modules are
// PTX texts whose entries must match the kernels compiled into the library (ptx.cpp,
// kernels.cpp); cuLaunchKernel runs the kernel on the CPU, synchronously, after checking the
// launch against what real hardware accepts. Knobs (FAKE_CUDA_*), the call log and the counters
// printed at exit live here too.
//
// Every entry point takes one process-wide lock: the emulator is single-threaded (global thread
// indices, fibers, shared-memory statics), and finch uses one stream, which orders all work anyway.
//
// Stream capture: work issued to a capturing stream is recorded (kernel argument values copied, as
// the driver does), not run; cuGraphLaunch replays it in issue order, checking again what can have
// changed since. Page-locked host memory (cuMemHostAlloc) is tracked, because only copies from
// and to it can be captured. What CUDA refuses during a capture is refused here too, and
// invalidates the capture.
//
// Host functions (cuLaunchHostFunc): run at once outside a capture, recorded as a node (the
// function and its userData pointer) during one and called again at every replay. The fake NCCL
// (../fake-nccl) issues its collectives this way, so that a captured step replays them in order.
// A host function must not call the CUDA API (CUDA forbids it); a call from one is refused with
// CUDA_ERROR_NOT_PERMITTED.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
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
struct FakeCapture;
struct FakeStream {
    unsigned flags;             // CU_STREAM_NON_BLOCKING (1) or 0
    int priority;
    FakeCapture* capture;       // the capture this stream records into (begun on it, or joined), or nullptr
};
struct FakeEvent {
    unsigned flags;
    bool recorded = false;      // recorded outside a capture at least once
    double ms = 0;              // host time when recorded: execution is synchronous
    uint64_t captured_in = 0;   // last recorded in this capture (a "captured event"), or 0
    // For a captured event: per stream of the capture, the index of the last operation it stands for.
    std::map<CUstream, long> snapshot;
};
// One operation recorded by stream capture: a graph node, replayed by cuGraphLaunch.
struct CapturedOp {
    enum Kind { KERNEL, HTOD, DTOH, DTOD, MEMSET, WAIT_EXTERNAL, HOST_FN } kind;
    std::string what;  // the call as captured, for messages and the log
    // KERNEL: the function, the launch, and the argument VALUES copied at capture time (the
    // caller's void** points at its own stack), each at offsets[i] in args.
    FakeFunction* f = nullptr;
    const fake::KernelEntry* kernel = nullptr;
    fake::Dims grid{}, block{};
    unsigned smem = 0;
    std::vector<unsigned char> args;
    std::vector<size_t> offsets;
    // Copies and memsets: device addresses, the page-locked host address (read or written when
    // the graph runs, not when it was captured), bytes, the memset value.
    CUdeviceptr dst = 0, src = 0;
    void* host = nullptr;
    size_t n = 0;
    unsigned char value = 0;
    // HOST_FN: the function and the userData pointer given to cuLaunchHostFunc (what it points at
    // must stay valid for every replay: the caller's business, as in CUDA).
    void (*fn)(void*) = nullptr;
    void* user = nullptr;
};
// A capture sequence, from cuStreamBeginCapture_v2 to cuStreamEndCapture.
struct FakeCapture {
    uint64_t id;
    CUstream origin;
    int mode;          // CU_STREAM_CAPTURE_MODE_GLOBAL 0, THREAD_LOCAL 1, RELAXED 2
    pthread_t thread;  // the thread that began it
    bool invalidated = false;
    std::string why;   // the refusal that invalidated it
    std::vector<CapturedOp> ops;
    std::set<CUstream> members;  // the origin and the streams that joined by waiting on its events
    // Per member: the index of the last operation of each member it has waited for (itself
    // included), to find forked work never joined back to the origin.
    std::map<CUstream, std::map<CUstream, long>> known;
};
struct FakeGraph {
    uint64_t id, capture;
    std::vector<CapturedOp> ops;
};
struct FakeGraphExec {
    uint64_t id, graph;
    unsigned long long flags;
    std::vector<CapturedOp> ops;  // a snapshot: the graph may be destroyed after instantiation
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
    int devices = 1;       // FAKE_CUDA_DEVICES: identical devices; a process uses one of them
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
    if (const char* s = getenv("FAKE_CUDA_DEVICES"); s && *s) c.devices = std::clamp(atoi(s), 1, 64);
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
    // Graphs: captures begun, graphs instantiated, launched and uploaded, and the operations their
    // launches ran (also counted above, as launches, copies and memsets, when they ran).
    uint64_t captures = 0, instantiated = 0, graph_launches = 0, graph_uploads = 0;
    uint64_t replayed_launches = 0, replayed_copies = 0, replayed_memsets = 0;
    // Page-locked host memory, and host<->device copies by the kind of host memory they touch.
    uint64_t pinned_allocs = 0, pinned_alloc_bytes = 0, pinned_frees = 0;
    uint64_t pinned_copies = 0, pinned_copy_bytes = 0, pageable_copies = 0, pageable_copy_bytes = 0;
    // Host functions (cuLaunchHostFunc) that ran, directly or replayed, those graph launches
    // replayed, and the seconds spent in them (a fake NCCL collective waits for its peers there).
    uint64_t host_fns = 0, host_fns_replayed = 0;
    double host_fn_seconds = 0;
};

// A page-locked host allocation (cuMemHostAlloc).
struct Pinned {
    uint64_t id = 0;
    uintptr_t start = 0;
    size_t size = 0;    // bytes asked for
    size_t mapped = 0;  // bytes mapped (whole pages)
    unsigned flags = 0;
};
constexpr size_t kPinnedQuarantine = 1024;  // freed pinned allocations remembered for messages

struct State {
    Config cfg = read_config();
    Counters n;
    bool initialised = false;
    bool exit_hook = false;
    int primary_refs = 0;
    int device = 0;  // the device whose primary context this process uses (FAKE_CUDA_DEVICES)
    std::set<FakeModule*> modules;
    std::set<FakeStream*> streams;
    std::set<FakeEvent*> events;
    std::set<FakeCapture*> captures;  // begun and not ended (invalidated ones included)
    std::set<FakeGraph*> graphs;
    std::set<FakeGraphExec*> execs;
    uint64_t next_capture = 1, next_graph = 1, next_exec = 1;
    std::map<uintptr_t, Pinned> pinned, pinned_freed;  // by start
    std::deque<uintptr_t> pinned_freed_order;
    uint64_t next_pinned = 1;
    size_t pinned_live = 0;
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
// Set while this thread runs a host function (cuLaunchHostFunc): CUDA calls from it are refused.
thread_local const char* t_host_fn = nullptr;

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
        NAME(CUDA_ERROR_MISALIGNED_ADDRESS) NAME(CUDA_ERROR_LAUNCH_FAILED) NAME(CUDA_ERROR_NOT_PERMITTED)
        NAME(CUDA_ERROR_NOT_SUPPORTED)
        NAME(CUDA_ERROR_ILLEGAL_STATE) NAME(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
        NAME(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED) NAME(CUDA_ERROR_STREAM_CAPTURE_MERGE)
        NAME(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED) NAME(CUDA_ERROR_STREAM_CAPTURE_UNJOINED)
        NAME(CUDA_ERROR_STREAM_CAPTURE_ISOLATION) NAME(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT)
        NAME(CUDA_ERROR_CAPTURED_EVENT) NAME(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD)
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
        case CUDA_ERROR_NOT_PERMITTED: return "operation not permitted";
        case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported";
        case CUDA_ERROR_ILLEGAL_STATE: return "the operation cannot be performed in the present state";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "operation failed due to a previous error during capture";
        case CUDA_ERROR_STREAM_CAPTURE_MERGE: return "operation would result in a merge of separate capture sequences";
        case CUDA_ERROR_STREAM_CAPTURE_UNMATCHED: return "capture was not ended in the same stream as it began";
        case CUDA_ERROR_STREAM_CAPTURE_UNJOINED: return "capturing stream has unjoined work";
        case CUDA_ERROR_STREAM_CAPTURE_ISOLATION: return "dependency created on uncaptured work in another stream";
        case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
            return "operation would make the legacy stream depend on a capturing blocking stream";
        case CUDA_ERROR_CAPTURED_EVENT: return "operation not permitted on an event last recorded in a capturing stream";
        case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD:
            return "attempt to terminate a thread-local capture sequence from another thread";
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
        // CUDA invalidates a capture on any refused call inside it: the capture then only ends,
        // with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED and no graph.
        for (FakeCapture* c : invalidates_)
            if (!c->invalidated) {
                c->invalidated = true;
                c->why = std::string(fn_) + ": " + msg + " (" + error_name(r) + ")";
            }
        return r;
    }
    // A refusal of this call invalidates capture c (the call was made on a stream capturing into
    // it, or conflicts with it).
    void invalidates(FakeCapture* c) {
        if (c) invalidates_.push_back(c);
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
    std::vector<FakeCapture*> invalidates_;
};

// A host function must not call the CUDA API ("may result in CUDA_ERROR_NOT_PERMITTED", says
// CUDA's documentation of cuLaunchHostFunc; here it always does).
#define NEED_INIT                                                                                        \
    if (t_host_fn)                                                                                       \
        return call.fail(CUDA_ERROR_NOT_PERMITTED,                                                       \
                         "called from inside a host function (%s): a host function must not call the " \
                         "CUDA API",                                                                     \
                         t_host_fn);                                                                     \
    if (!g->initialised) return call.fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called")
#define NEED_CONTEXT                                                                   \
    NEED_INIT;                                                                         \
    if (!t_current) return call.fail(CUDA_ERROR_INVALID_CONTEXT, "no current context on this thread"); \
    if (CUresult r_; call.dead(&r_)) return r_

// ---- counters at exit ---------------------------------------------------------------------------------
std::string counters_json() {
    const Counters& n = g->n;
    std::string s;
    char b[1024];
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
             "\"fiber_switches\": %llu, ",
             (unsigned long long)(n.stream_syncs + n.ctx_syncs + n.event_syncs + n.blocking_copies),
             (unsigned long long)n.stream_syncs, (unsigned long long)n.ctx_syncs, (unsigned long long)n.event_syncs,
             (unsigned long long)n.blocking_copies, (unsigned long long)n.allocs, (unsigned long long)n.alloc_bytes,
             (unsigned long long)n.frees, n.peak_bytes, live_bytes(), (unsigned long long)n.modules,
             (unsigned long long)n.errors, n.launch_seconds, (unsigned long long)fiber_switches());
    s += b;
    // Added with stream capture; the keys above keep their meaning.
    snprintf(b, sizeof b,
             "\"graphs\": {\"captures\": %llu, \"instantiated\": %llu, \"launches\": %llu, \"uploads\": %llu, "
             "\"replayed_launches\": %llu, \"replayed_copies\": %llu, \"replayed_memsets\": %llu}, "
             "\"pinned\": {\"allocs\": %llu, \"alloc_bytes\": %llu, \"frees\": %llu, \"live_bytes\": %zu}, "
             "\"host_copies\": {\"pinned\": %llu, \"pinned_bytes\": %llu, \"pageable\": %llu, \"pageable_bytes\": %llu}, ",
             (unsigned long long)n.captures, (unsigned long long)n.instantiated, (unsigned long long)n.graph_launches,
             (unsigned long long)n.graph_uploads, (unsigned long long)n.replayed_launches,
             (unsigned long long)n.replayed_copies, (unsigned long long)n.replayed_memsets,
             (unsigned long long)n.pinned_allocs, (unsigned long long)n.pinned_alloc_bytes,
             (unsigned long long)n.pinned_frees, g->pinned_live, (unsigned long long)n.pinned_copies,
             (unsigned long long)n.pinned_copy_bytes, (unsigned long long)n.pageable_copies,
             (unsigned long long)n.pageable_copy_bytes);
    s += b;
    // Added with cuLaunchHostFunc; the keys above keep their meaning.
    snprintf(b, sizeof b, "\"host_functions\": {\"run\": %llu, \"replayed\": %llu, \"seconds\": %.6f}}",
             (unsigned long long)n.host_fns, (unsigned long long)n.host_fns_replayed, n.host_fn_seconds);
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
    fprintf(stderr, "  graph launches      %8llu  (%llu captures, %llu instantiated; replayed %llu launches, %llu copies, "
            "%llu memsets)\n",
            (unsigned long long)n.graph_launches, (unsigned long long)n.captures, (unsigned long long)n.instantiated,
            (unsigned long long)n.replayed_launches, (unsigned long long)n.replayed_copies,
            (unsigned long long)n.replayed_memsets);
    fprintf(stderr, "  page-locked allocs  %8llu  (%s), frees %llu\n", (unsigned long long)n.pinned_allocs,
            human_bytes(n.pinned_alloc_bytes).c_str(), (unsigned long long)n.pinned_frees);
    fprintf(stderr, "  host<->device copies: %llu page-locked (%s), %llu pageable (%s)\n",
            (unsigned long long)n.pinned_copies, human_bytes(n.pinned_copy_bytes).c_str(),
            (unsigned long long)n.pageable_copies, human_bytes(n.pageable_copy_bytes).c_str());
    fprintf(stderr, "  host functions      %8llu  (%llu replayed, %.2f s in them)\n", (unsigned long long)n.host_fns,
            (unsigned long long)n.host_fns_replayed, n.host_fn_seconds);
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

// ---- capture state ----------------------------------------------------------------------------------
constexpr int kCaptureGlobal = 0, kCaptureThreadLocal = 1, kCaptureRelaxed = 2;
const char* mode_name(int mode) {
    return mode == kCaptureGlobal ? "global" : mode == kCaptureThreadLocal ? "thread-local" : "relaxed";
}
// NULL and CU_STREAM_LEGACY: the legacy stream, which synchronises with every blocking stream.
bool is_legacy(CUstream s) { return s == nullptr || s == (CUstream)0x1; }
bool is_created(CUstream s) { return s && g->streams.count(s); }
FakeCapture* capture_of(CUstream s) { return is_created(s) ? s->capture : nullptr; }
FakeCapture* active_capture(uint64_t id) {
    for (FakeCapture* c : g->captures)
        if (c->id == id) return c;
    return nullptr;
}
// Captures with a blocking member (a stream created without CU_STREAM_NON_BLOCKING): while one
// runs, using the legacy stream would make it depend on the capture.
std::vector<FakeCapture*> blocking_captures() {
    std::vector<FakeCapture*> out;
    for (FakeCapture* c : g->captures)
        for (CUstream m : c->members)
            if (!(m->flags & 1)) {
                out.push_back(c);
                break;
            }
    return out;
}
std::string describe_capture(const FakeCapture* c) {
    char b[160];
    snprintf(b, sizeof b, "capture #%llu on stream %p, %s mode", (unsigned long long)c->id, (void*)c->origin,
             mode_name(c->mode));
    return b;
}

// Every call that enqueues work on stream s (or waits on it) passes here first. The legacy
// stream cannot be used while a blocking stream captures (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT); a
// stream in an invalidated capture takes nothing more (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED).
// *cap is the capture that s records into, or nullptr: then the work runs now. Refusals of the
// call from here on invalidate *cap.
CUresult enqueue_gate(Call& call, CUstream s, FakeCapture** cap) {
    *cap = nullptr;
    if (is_legacy(s)) {
        const std::vector<FakeCapture*> blocking = blocking_captures();
        if (blocking.empty()) return CUDA_SUCCESS;
        for (FakeCapture* c : blocking) call.invalidates(c);
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
                         "the legacy stream (%p) cannot be used while a blocking stream captures (%s): it would "
                         "depend on the capture; create streams with CU_STREAM_NON_BLOCKING",
                         (void*)s, describe_capture(blocking[0]).c_str());
    }
    FakeCapture* c = capture_of(s);
    if (!c) return CUDA_SUCCESS;
    if (c->invalidated)
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                         "stream %p is in %s, invalidated by an earlier refusal (%s): end it with cuStreamEndCapture",
                         (void*)s, describe_capture(c).c_str(), c->why.c_str());
    call.invalidates(c);
    *cap = c;
    return CUDA_SUCCESS;
}

// "Potentially unsafe" calls (synchronous allocation and free, blocking copies, cuMemFreeHost) are
// refused while a capture prohibits them for this thread: one this thread began in global or
// thread-local mode, or one another thread began in global mode (the calling thread's own mode is
// CUDA's default, global: cuThreadExchangeStreamCaptureMode is not emulated).
CUresult unsafe_gate(Call& call, const char* what) {
    std::vector<FakeCapture*> prohibiting;
    for (FakeCapture* c : g->captures) {
        const bool mine = pthread_equal(c->thread, pthread_self());
        if ((mine && c->mode != kCaptureRelaxed) || (!mine && c->mode == kCaptureGlobal)) prohibiting.push_back(c);
    }
    if (prohibiting.empty()) return CUDA_SUCCESS;
    for (FakeCapture* c : prohibiting) call.invalidates(c);
    const FakeCapture* c = prohibiting[0];
    return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                     "%s is not permitted during stream capture (%s, begun by %s thread): do it before "
                     "cuStreamBeginCapture or after cuStreamEndCapture",
                     what, describe_capture(c).c_str(), pthread_equal(c->thread, pthread_self()) ? "this" : "another");
}

// Appends an operation issued to stream s to its capture.
void record_op(FakeCapture* c, CUstream s, CapturedOp op) {
    c->known[s][s] = (long)c->ops.size();
    c->ops.push_back(std::move(op));
}

// ---- page-locked host memory ---------------------------------------------------------------------
// The page-locked allocation holding [p, p + n), or nullptr.
const Pinned* pinned_holding(const void* p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    auto it = g->pinned.upper_bound(a);
    if (it == g->pinned.begin()) return nullptr;
    --it;
    const Pinned& pin = it->second;
    return a >= pin.start && a + n <= pin.start + pin.size ? &pin : nullptr;
}
// The page-locked allocation (live or recently freed) whose start is at or below p, for messages.
const Pinned* pinned_near(const std::map<uintptr_t, Pinned>& m, const void* p) {
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return nullptr;
    --it;
    return (uintptr_t)p < it->second.start + std::max<size_t>(it->second.size, 1) ? &it->second : nullptr;
}
// Why host range [p, p + n) cannot be copied asynchronously in a capture: "" if it is page-locked.
std::string not_pinned(const void* p, size_t n) {
    if (n == 0 || pinned_holding(p, n)) return "";
    char b[300];
    if (const Pinned* pin = pinned_near(g->pinned, p))
        snprintf(b, sizeof b, "host range [%p, +%zu) runs %zu bytes past the end of page-locked allocation #%llu (%zu bytes)",
                 p, n, (size_t)((uintptr_t)p + n - (pin->start + pin->size)), (unsigned long long)pin->id, pin->size);
    else if (const Pinned* f = pinned_near(g->pinned_freed, p))
        snprintf(b, sizeof b, "host range [%p, +%zu) is in page-locked allocation #%llu, freed by cuMemFreeHost", p, n,
                 (unsigned long long)f->id);
    else
        snprintf(b, sizeof b, "host range [%p, +%zu) is pageable memory, not page-locked (cuMemHostAlloc)", p, n);
    return b;
}
void count_host_copy(const void* host, size_t n) {
    if (pinned_holding(host, n)) {
        g->n.pinned_copies++;
        g->n.pinned_copy_bytes += n;
    } else {
        g->n.pageable_copies++;
        g->n.pageable_copy_bytes += n;
    }
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
    *n = g->cfg.devices;
    return call.ok(" -> %d", *n);
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    Call call("cuDeviceGet");
    NEED_INIT;
    if (!d) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (ordinal < 0 || ordinal >= g->cfg.devices)
        return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d: the fake has %d (FAKE_CUDA_DEVICES)", ordinal,
                         g->cfg.devices);
    *d = ordinal;
    return call.ok("(%d)", ordinal);
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    Call call("cuDeviceGetName");
    NEED_INIT;
    if (d < 0 || d >= g->cfg.devices) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d of %d", d, g->cfg.devices);
    if (!name || len <= 0) return call.fail(CUDA_ERROR_INVALID_VALUE, "no buffer");
    snprintf(name, (size_t)len, "Fake CUDA sm_%d%d (%s limits; kernels emulated on the CPU)", g->cfg.device->major,
             g->cfg.device->minor, g->cfg.device->like);
    return call.ok(" -> \"%s\"", name);
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    Call call("cuDeviceTotalMem_v2");
    NEED_INIT;
    if (d < 0 || d >= g->cfg.devices) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d of %d", d, g->cfg.devices);
    if (!bytes) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    *bytes = g->cfg.total_mem;
    return call.ok(" -> %zu", *bytes);
}
API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) {
    Call call("cuDeviceGetUuid_v2");
    NEED_INIT;
    if (d < 0 || d >= g->cfg.devices) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d of %d", d, g->cfg.devices);
    if (!uuid) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    memcpy(uuid, "fake-cuda-dev-00", 16);
    return call.ok("()");
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    Call call("cuDeviceGetAttribute");
    NEED_INIT;
    if (d < 0 || d >= g->cfg.devices) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d of %d", d, g->cfg.devices);
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
    if (d < 0 || d >= g->cfg.devices) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d of %d", d, g->cfg.devices);
    if (!ctx) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    // One emulated device per process: a process (a data-parallel rank) picks any of
    // FAKE_CUDA_DEVICES, and keeps to it.
    if (g->primary_refs > 0 && d != g->device)
        return call.fail(CUDA_ERROR_NOT_SUPPORTED, "device %d: this process already uses device %d, and the fake "
                         "emulates one device per process", d, g->device);
    g->device = d;
    g->primary_refs++;
    *ctx = &g_primary;
    return call.ok(" -> %d references", g->primary_refs);
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    Call call("cuDevicePrimaryCtxRelease_v2");
    NEED_INIT;
    if (d < 0 || d >= g->cfg.devices) return call.fail(CUDA_ERROR_INVALID_DEVICE, "device %d of %d", d, g->cfg.devices);
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
    *d = g->device;
    return call.ok(" -> %d", *d);
}
API CUresult cuCtxSynchronize() {
    Call call("cuCtxSynchronize");
    NEED_CONTEXT;
    // The context encompasses every capturing stream, whatever the capture's mode.
    if (!g->captures.empty()) {
        for (FakeCapture* c : g->captures) call.invalidates(c);
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                         "a stream is capturing (%s%s): synchronising the context would wait for work that is only "
                         "recorded; synchronise after cuStreamEndCapture",
                         describe_capture(*g->captures.begin()).c_str(), g->captures.size() > 1 ? ", and others" : "");
    }
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
// The stream checks every copy and memset starts with: a valid stream and the capture gates. The
// non-Async calls use the legacy stream; those that also make the host wait (host<->device
// copies; cuMemcpyDtoD and cuMemsetD8 on device memory do not) pass the "unsafe" gate too.
CUresult copy_gate(Call& call, CUstream s, bool host_waits, FakeCapture** cap) {
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    if (CUresult r = enqueue_gate(call, s, cap)) return r;
    if (host_waits) return unsafe_gate(call, "a blocking (non-Async) host<->device copy");
    return CUDA_SUCCESS;
}
CUresult do_memset(Call& call, CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    NEED_CONTEXT;
    FakeCapture* cap;
    if (CUresult r = copy_gate(call, s, false, &cap)) return r;
    if (CUresult r = check_range(call, "destination", p, n)) return r;
    if (cap) {
        CapturedOp op{CapturedOp::MEMSET};
        char what[120];
        snprintf(what, sizeof what, "cuMemsetD8Async(%#llx, %#x, %zu bytes)", p, v, n);
        op.what = what;
        op.dst = p, op.value = v, op.n = n;
        record_op(cap, s, std::move(op));
        return call.ok("(%#llx, %#x, %zu bytes) captured in #%llu", p, v, n, (unsigned long long)cap->id);
    }
    memset((void*)(uintptr_t)p, v, n);
    g->n.memsets++;
    g->n.memset_bytes += n;
    return call.ok("(%#llx, %#x, %zu bytes)", p, v, n);
}
CUresult do_htod(Call& call, CUdeviceptr dst, const void* src, size_t n, CUstream s, bool blocking) {
    NEED_CONTEXT;
    FakeCapture* cap;
    if (CUresult r = copy_gate(call, s, blocking, &cap)) return r;
    if (n && !src) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL host pointer");
    if (CUresult r = check_range(call, "destination", dst, n)) return r;
    if (cap) {
        // The graph reads the host memory when it runs, so it must stay valid and be page-locked.
        if (std::string why = not_pinned(src, n); !why.empty())
            return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                             "a copy from pageable host memory cannot be captured (%s, into stream %p): copy from "
                             "memory allocated with cuMemHostAlloc",
                             why.c_str(), (void*)s);
        CapturedOp op{CapturedOp::HTOD};
        char what[120];
        snprintf(what, sizeof what, "cuMemcpyHtoDAsync_v2(%#llx <- host %p, %zu bytes)", dst, src, n);
        op.what = what;
        op.dst = dst, op.host = (void*)src, op.n = n;
        record_op(cap, s, std::move(op));
        return call.ok("(%#llx, %zu bytes) captured in #%llu", dst, n, (unsigned long long)cap->id);
    }
    memcpy((void*)(uintptr_t)dst, src, n);
    g->n.htod++;
    g->n.htod_bytes += n;
    g->n.blocking_copies += blocking;
    count_host_copy(src, n);
    return call.ok("(%#llx, %zu bytes)", dst, n);
}
CUresult do_dtoh(Call& call, void* dst, CUdeviceptr src, size_t n, CUstream s, bool blocking) {
    NEED_CONTEXT;
    FakeCapture* cap;
    if (CUresult r = copy_gate(call, s, blocking, &cap)) return r;
    if (n && !dst) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL host pointer");
    if (CUresult r = check_range(call, "source", src, n)) return r;
    if (cap) {
        if (std::string why = not_pinned(dst, n); !why.empty())
            return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                             "a copy to pageable host memory cannot be captured (%s, into stream %p): copy to memory "
                             "allocated with cuMemHostAlloc",
                             why.c_str(), (void*)s);
        CapturedOp op{CapturedOp::DTOH};
        char what[120];
        snprintf(what, sizeof what, "cuMemcpyDtoHAsync_v2(host %p <- %#llx, %zu bytes)", dst, src, n);
        op.what = what;
        op.src = src, op.host = dst, op.n = n;
        record_op(cap, s, std::move(op));
        return call.ok("(%#llx, %zu bytes) captured in #%llu", src, n, (unsigned long long)cap->id);
    }
    memcpy(dst, (const void*)(uintptr_t)src, n);
    g->n.dtoh++;
    g->n.dtoh_bytes += n;
    g->n.blocking_copies += blocking;
    count_host_copy(dst, n);
    return call.ok("(%#llx, %zu bytes)", src, n);
}
CUresult do_dtod(Call& call, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    NEED_CONTEXT;
    FakeCapture* cap;
    if (CUresult r = copy_gate(call, s, false, &cap)) return r;
    if (CUresult r = check_range(call, "destination", dst, n)) return r;
    if (CUresult r = check_range(call, "source", src, n)) return r;
    if (cap) {
        CapturedOp op{CapturedOp::DTOD};
        char what[120];
        snprintf(what, sizeof what, "cuMemcpyDtoDAsync_v2(%#llx <- %#llx, %zu bytes)", dst, src, n);
        op.what = what;
        op.dst = dst, op.src = src, op.n = n;
        record_op(cap, s, std::move(op));
        return call.ok("(%#llx <- %#llx, %zu bytes) captured in #%llu", dst, src, n, (unsigned long long)cap->id);
    }
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    g->n.dtod++;
    g->n.dtod_bytes += n;
    return call.ok("(%#llx <- %#llx, %zu bytes)", dst, src, n);
}
}  // namespace

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    Call call("cuMemAlloc_v2");
    NEED_CONTEXT;
    if (CUresult r = unsafe_gate(call, "cuMemAlloc_v2 (a synchronous allocation)")) return r;
    return do_alloc(call, p, bytes);
}
// Stream-ordered allocation on a capturing stream makes a graph memory node in CUDA (owned by the
// graph, mapped when it runs): not emulated, refused with CUDA_ERROR_NOT_SUPPORTED. A step that
// is captured allocates its buffers beforehand. On other streams it works as outside a capture.
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    Call call("cuMemAllocAsync");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap)
        return call.fail(CUDA_ERROR_NOT_SUPPORTED,
                         "%zu bytes on stream %p, which is capturing (%s): CUDA would add a graph memory node, which "
                         "this fake does not emulate; allocate before cuStreamBeginCapture",
                         bytes, (void*)s, describe_capture(cap).c_str());
    return do_alloc(call, p, bytes);
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    Call call("cuMemFree_v2");
    NEED_CONTEXT;
    if (CUresult r = unsafe_gate(call, "cuMemFree_v2 (a synchronous free)")) return r;
    return do_free(call, p);
}
// On a capturing stream, cuMemFreeAsync makes a free node, which must free a graph allocation
// (CUDA_ERROR_INVALID_VALUE otherwise); this fake has none (see cuMemAllocAsync).
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    Call call("cuMemFreeAsync");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "stream %p", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap && p) {
        const Allocation* a = live_holding(p, 1);
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "%#llx on stream %p, which is capturing (%s): a free during capture becomes a graph free "
                         "node and must free a graph allocation, but this is %s allocated outside the graph; free "
                         "it after cuStreamEndCapture",
                         p, (void*)s, describe_capture(cap).c_str(),
                         a ? ("allocation #" + std::to_string(a->id)).c_str() : "memory");
    }
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

// ---- page-locked host memory -------------------------------------------------------------------------
// Host memory of its own mapping (page-aligned, like the driver's), filled with 0xFF as garbage,
// and tracked: copies from and to it may be captured; freeing it twice, or a pointer it did not
// hand out, is refused.
API CUresult cuMemHostAlloc(void** pp, size_t bytes, unsigned flags) {
    Call call("cuMemHostAlloc");
    NEED_CONTEXT;
    if (!pp) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL result pointer");
    if (flags & ~7u)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "flags %#x: only CU_MEMHOSTALLOC_PORTABLE (1), _DEVICEMAP (2) and _WRITECOMBINED (4) exist",
                         flags);
    if (bytes == 0) return call.fail(CUDA_ERROR_INVALID_VALUE, "0 bytes: an empty page-locked allocation");
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), mapped = (bytes + page - 1) / page * page;
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return call.fail(CUDA_ERROR_OUT_OF_MEMORY, "%zu bytes: the host could not map that much memory", bytes);
    memset(p, 0xff, bytes);  // cuMemHostAlloc leaves the memory unset
    Pinned pin;
    pin.id = g->next_pinned++;
    pin.start = (uintptr_t)p;
    pin.size = bytes;
    pin.mapped = mapped;
    pin.flags = flags;
    // A freed allocation that was at these addresses is forgotten.
    for (auto it = g->pinned_freed.lower_bound(pin.start); it != g->pinned_freed.end() && it->first < pin.start + mapped;)
        it = g->pinned_freed.erase(it);
    g->pinned[pin.start] = pin;
    g->pinned_live += bytes;
    g->n.pinned_allocs++;
    g->n.pinned_alloc_bytes += bytes;
    *pp = p;
    return call.ok("(%zu bytes, flags %#x) -> %p (page-locked #%llu)", bytes, flags, p, (unsigned long long)pin.id);
}
// cuMemFreeHost synchronises the device, so a capture that prohibits unsafe calls refuses it.
API CUresult cuMemFreeHost(void* p) {
    Call call("cuMemFreeHost");
    NEED_CONTEXT;
    if (!p) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (CUresult r = unsafe_gate(call, "cuMemFreeHost (it synchronises the device)")) return r;
    auto it = g->pinned.find((uintptr_t)p);
    if (it == g->pinned.end()) {
        if (auto f = g->pinned_freed.find((uintptr_t)p); f != g->pinned_freed.end())
            return call.fail(CUDA_ERROR_INVALID_VALUE, "%p: double free of page-locked allocation #%llu (%zu bytes)", p,
                             (unsigned long long)f->second.id, f->second.size);
        if (const Pinned* in = pinned_near(g->pinned, p))
            return call.fail(CUDA_ERROR_INVALID_VALUE,
                             "%p is inside page-locked allocation #%llu (%zu bytes at %#lx), not its start", p,
                             (unsigned long long)in->id, in->size, (unsigned long)in->start);
        if (live_holding((uintptr_t)p, 0))
            return call.fail(CUDA_ERROR_INVALID_VALUE, "%p is device memory (cuMemFree frees it)", p);
        return call.fail(CUDA_ERROR_INVALID_VALUE, "%p was not allocated by cuMemHostAlloc", p);
    }
    const Pinned pin = it->second;
    g->pinned.erase(it);
    munmap((void*)pin.start, pin.mapped);
    g->pinned_live -= pin.size;
    g->n.pinned_frees++;
    g->pinned_freed[pin.start] = pin;
    g->pinned_freed_order.push_back(pin.start);
    if (g->pinned_freed_order.size() > kPinnedQuarantine) {
        g->pinned_freed.erase(g->pinned_freed_order.front());
        g->pinned_freed_order.pop_front();
    }
    return call.ok("(%p, page-locked #%llu)", p, (unsigned long long)pin.id);
}

// ---- streams and events: execution is synchronous, so they only keep order and time ----------------
// (and, while streams capture, which work and which events belong to which capture)
namespace {
constexpr int kLeastPriority = 0, kGreatestPriority = -5;
CUresult create_stream(Call& call, CUstream* s, unsigned flags, int priority) {
    NEED_CONTEXT;
    if (!s) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (flags & ~1u) return call.fail(CUDA_ERROR_INVALID_VALUE, "flags %#x: only CU_STREAM_NON_BLOCKING (1) exists", flags);
    *s = new FakeStream{flags, priority, nullptr};
    g->streams.insert(*s);
    return call.ok("(flags %#x, priority %d) -> %p", flags, priority, (void*)*s);
}
// An event last recorded in a capture stands for graph nodes: the host cannot wait for it or ask
// about it (CUDA_ERROR_CAPTURED_EVENT, even after the capture ended), and asking invalidates the
// capture if it is still going.
CUresult captured_event(Call& call, CUevent e) {
    FakeCapture* c = active_capture(e->captured_in);
    call.invalidates(c);
    return call.fail(CUDA_ERROR_CAPTURED_EVENT,
                     "event %p was last recorded in a capturing stream (capture #%llu, %s): it stands for graph "
                     "nodes, not for work the host can wait for or time; record it outside a capture first",
                     (void*)e, (unsigned long long)e->captured_in, c ? "still active" : "since ended");
}
}  // namespace

API CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    Call call("cuStreamCreate");
    return create_stream(call, s, flags, 0);
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int priority) {
    Call call("cuStreamCreateWithPriority");
    // Priorities outside the range are clamped to it, as the driver does.
    return create_stream(call, s, flags, std::min(kLeastPriority, std::max(kGreatestPriority, priority)));
}
API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    Call call("cuCtxGetStreamPriorityRange");
    NEED_CONTEXT;
    if (least) *least = kLeastPriority;
    if (greatest) *greatest = kGreatestPriority;
    return call.ok(" -> (%d, %d)", kLeastPriority, kGreatestPriority);
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    Call call("cuStreamDestroy_v2");
    NEED_INIT;
    if (!g->streams.count(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    if (FakeCapture* c = s->capture) {
        call.invalidates(c);
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                         "stream %p is capturing (%s): end the capture before destroying the stream", (void*)s,
                         describe_capture(c).c_str());
    }
    g->streams.erase(s);
    const unsigned long was = (unsigned long)(uintptr_t)s;
    delete s;
    return call.ok("(%#lx)", was);
}
API CUresult cuStreamSynchronize(CUstream s) {
    Call call("cuStreamSynchronize");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap)
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                         "stream %p is capturing (%s): its work is recorded, not run, so there is nothing to wait "
                         "for; synchronise after cuStreamEndCapture, or after cuGraphLaunch",
                         (void*)s, describe_capture(cap).c_str());
    g->n.stream_syncs++;
    return call.ok("(%p)", (void*)s);
}
API CUresult cuStreamQuery(CUstream s) {
    Call call("cuStreamQuery");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap)
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                         "stream %p is capturing (%s): its work is recorded, not run, so it has no status to query",
                         (void*)s, describe_capture(cap).c_str());
    return call.ok("(%p)", (void*)s);
}
// Waiting on an event recorded in a capture joins the waiting stream to that capture (a fork), or,
// for a stream already in it, makes it depend on the event's work (a join). A capturing stream
// may not wait on work outside its capture (CUDA_ERROR_STREAM_CAPTURE_ISOLATION) unless the wait
// is CU_EVENT_WAIT_EXTERNAL (an event wait node: nothing to do here, execution is synchronous).
API CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    Call call("cuStreamWaitEvent");
    NEED_CONTEXT;
    if (!valid_stream(s) || !g->events.count(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "bad stream or event");
    if (flags & ~1u) return call.fail(CUDA_ERROR_INVALID_VALUE, "flags %#x: only CU_EVENT_WAIT_EXTERNAL (1) exists", flags);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    const bool external = flags & 1;
    if (external && !cap)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "CU_EVENT_WAIT_EXTERNAL on stream %p, which is not capturing: the flag is valid only during "
                         "stream capture",
                         (void*)s);
    if (e->captured_in && !external) {
        FakeCapture* ec = active_capture(e->captured_in);
        if (!ec)
            return call.fail(CUDA_ERROR_CAPTURED_EVENT,
                             "event %p was last recorded in capture #%llu, which has ended: it stands for nodes of "
                             "that graph; record it again outside a capture to wait on it",
                             (void*)e, (unsigned long long)e->captured_in);
        if (cap && cap != ec) {
            call.invalidates(ec);
            return call.fail(CUDA_ERROR_STREAM_CAPTURE_MERGE,
                             "stream %p (%s) waits on event %p, recorded in another capture (%s): two captures cannot "
                             "merge",
                             (void*)s, describe_capture(cap).c_str(), (void*)e, describe_capture(ec).c_str());
        }
        if (cap == ec) {
            std::map<CUstream, long>& known = cap->known[s];
            for (auto& [stream, last] : e->snapshot)
                if (!known.count(stream) || known[stream] < last) known[stream] = last;
            return call.ok("(%p waits on %p within capture #%llu)", (void*)s, (void*)e, (unsigned long long)cap->id);
        }
        if (ec->invalidated)
            return call.fail(CUDA_ERROR_INVALID_VALUE,
                             "event %p was recorded in %s, invalidated by an earlier refusal (%s): stream %p cannot "
                             "join it",
                             (void*)e, describe_capture(ec).c_str(), ec->why.c_str(), (void*)s);
        call.invalidates(ec);
        if (!is_created(s))
            return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                             "stream %p (the legacy or per-thread stream) waits on event %p of %s: it would join the "
                             "capture, and only created streams can be captured",
                             (void*)s, (void*)e, describe_capture(ec).c_str());
        s->capture = ec;
        ec->members.insert(s);
        ec->known[s] = e->snapshot;
        return call.ok("(%p joins capture #%llu through event %p)", (void*)s, (unsigned long long)ec->id, (void*)e);
    }
    if (cap && external) {
        CapturedOp op{CapturedOp::WAIT_EXTERNAL};
        char what[100];
        snprintf(what, sizeof what, "cuStreamWaitEvent(%p, CU_EVENT_WAIT_EXTERNAL)", (void*)e);
        op.what = what;
        record_op(cap, s, std::move(op));
        return call.ok("(%p, external) captured in #%llu", (void*)e, (unsigned long long)cap->id);
    }
    if (cap && e->recorded)
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
                         "stream %p is capturing (%s) and waits on event %p, recorded outside the capture: captured "
                         "work cannot depend on uncaptured work; wait before cuStreamBeginCapture, or pass "
                         "CU_EVENT_WAIT_EXTERNAL",
                         (void*)s, describe_capture(cap).c_str(), (void*)e);
    return call.ok("()");  // an event never recorded: nothing to wait for
}
API CUresult cuEventCreate(CUevent* e, unsigned flags) {
    Call call("cuEventCreate");
    NEED_CONTEXT;
    if (!e) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (flags & ~7u)
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "flags %#x: only CU_EVENT_BLOCKING_SYNC (1), CU_EVENT_DISABLE_TIMING (2) and "
                         "CU_EVENT_INTERPROCESS (4) exist",
                         flags);
    if ((flags & 4) && !(flags & 2))
        return call.fail(CUDA_ERROR_INVALID_VALUE, "CU_EVENT_INTERPROCESS needs CU_EVENT_DISABLE_TIMING too");
    *e = new FakeEvent{flags};
    g->events.insert(*e);
    return call.ok("(flags %#x) -> %p", flags, (void*)*e);
}
API CUresult cuEventDestroy_v2(CUevent e) {
    Call call("cuEventDestroy_v2");
    NEED_INIT;
    if (!g->events.erase(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not an event", (void*)e);
    const unsigned long was = (unsigned long)(uintptr_t)e;
    delete e;
    return call.ok("(%#lx)", was);
}
// On a capturing stream the event becomes a captured event (no graph node: replays do not record
// it), which other streams may wait on to fork from and join back into the capture.
API CUresult cuEventRecord(CUevent e, CUstream s) {
    Call call("cuEventRecord");
    NEED_CONTEXT;
    if (!g->events.count(e) || !valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "bad event or stream");
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap) {
        e->captured_in = cap->id;
        e->snapshot = cap->known[s];
        return call.ok("(%p) in capture #%llu", (void*)e, (unsigned long long)cap->id);
    }
    e->captured_in = 0;
    e->recorded = true;
    e->ms = now_ms();
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventSynchronize(CUevent e) {
    Call call("cuEventSynchronize");
    NEED_CONTEXT;
    if (!g->events.count(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not an event", (void*)e);
    if (e->captured_in) return captured_event(call, e);
    g->n.event_syncs++;
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventQuery(CUevent e) {
    Call call("cuEventQuery");
    NEED_CONTEXT;
    if (!g->events.count(e)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not an event", (void*)e);
    if (e->captured_in) return captured_event(call, e);
    return call.ok("(%p)", (void*)e);
}
API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    Call call("cuEventElapsedTime_v2");
    NEED_CONTEXT;
    if (!ms) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (!g->events.count(a) || !g->events.count(b)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "bad event");
    if (a->captured_in) return captured_event(call, a);
    if (b->captured_in) return captured_event(call, b);
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
namespace {
// Pointer arguments: NULL, or inside a live allocation (its end included: an empty tensor may sit
// there) and aligned for what they point to. On a GPU these fault inside the kernel; here they are
// refused before it runs, with the same error, and end the context the same way. Checked at launch,
// at capture, and again when a graph replays the launch (an allocation may be freed in between).
CUresult check_pointer_args(Call& call, const KernelEntry& k, void** params, const char* what) {
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
    return CUDA_SUCCESS;
}
// Runs a checked launch on the CPU and counts it; returns the seconds it took.
double run_launch(const KernelEntry& k, bool refill_shared, Dims grid, Dims block, unsigned smem, void** params,
                  const char* what) {
    ensure_signal_stack();
    g->launch = LaunchInfo{k.name, grid, block, smem, pthread_self()};
    const double t0 = now_ms();
    run_kernel(k, params, grid, block, smem, refill_shared);
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
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    KernelCount& kc = g->n.per_kernel[k.name];
    kc.launches++;
    kc.blocks += blocks;
    kc.threads += blocks * block.x * block.y * block.z;
    kc.seconds += seconds;
    kc.max_dynamic_smem = std::max(kc.max_dynamic_smem, last_dynamic_smem());
    g->n.launches++;
    g->n.launch_seconds += seconds;
    return seconds;
}
// Runs a host function and counts it. It runs on the calling thread with the driver's lock held,
// as CUDA runs host functions in order with the stream's other work; CUDA calls from it are
// refused (t_host_fn), so it cannot deadlock on the lock, only wait (a fake NCCL collective
// waits there for its peers, in other processes).
void run_host_fn(void (*fn)(void*), void* user, const char* what) {
    const double t0 = now_ms();
    t_host_fn = what;
    fn(user);
    t_host_fn = nullptr;
    g->n.host_fns++;
    g->n.host_fn_seconds += (now_ms() - t0) / 1000;
}
}  // namespace

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
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
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
    if (CUresult r = check_pointer_args(call, k, params, what)) return r;
    if (cap) {
        // A kernel node: the argument values are copied now, as the driver does (params points at
        // the caller's variables, which may change or die before the graph runs).
        CapturedOp op{CapturedOp::KERNEL};
        op.what = what;
        op.f = f;
        op.kernel = &k;
        op.grid = {gx, gy, gz};
        op.block = {bx, by, bz};
        op.smem = smem;
        for (int i = 0; i < k.nparams; i++) {
            const size_t at = (op.args.size() + 15) / 16 * 16;
            op.offsets.push_back(at);
            op.args.resize(at + k.size[i]);
            memcpy(op.args.data() + at, params[i], k.size[i]);
        }
        record_op(cap, s, std::move(op));
        return call.ok("(%s) captured in #%llu", what, (unsigned long long)cap->id);
    }
    const double seconds = run_launch(k, f->ptx.static_smem > 0, Dims{gx, gy, gz}, Dims{bx, by, bz}, smem, params, what);
    return call.ok("(%s) %.3f s", what, seconds);
}

// A host function, in stream order: outside a capture it runs now (execution is synchronous, so
// the stream's earlier work is done); during one it becomes a host node, called at every replay
// with the same userData pointer. Refused: a NULL function (CUDA_ERROR_INVALID_VALUE), and, from
// inside a host function, any CUDA call (CUDA_ERROR_NOT_PERMITTED, see NEED_INIT).
API CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* user) {
    Call call("cuLaunchHostFunc");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (!fn) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL host function (userData %p)", user);
    char what[120];
    snprintf(what, sizeof what, "cuLaunchHostFunc(%p, userData %p)", (void*)fn, user);
    if (cap) {
        CapturedOp op{CapturedOp::HOST_FN};
        op.what = what;
        op.fn = fn;
        op.user = user;
        record_op(cap, s, std::move(op));
        return call.ok("(%p, %p) captured in #%llu", (void*)fn, user, (unsigned long long)cap->id);
    }
    const double t0 = now_ms();
    run_host_fn(fn, user, what);
    return call.ok("(%p, %p) %.3f s", (void*)fn, user, (now_ms() - t0) / 1000);
}

// ---- stream capture and graphs ----------------------------------------------------------------------
API CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    Call call("cuStreamBeginCapture_v2");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    if (mode < kCaptureGlobal || mode > kCaptureRelaxed)
        return call.fail(CUDA_ERROR_INVALID_VALUE, "capture mode %d: not GLOBAL (0), THREAD_LOCAL (1) or RELAXED (2)",
                         mode);
    if (is_legacy(s))
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                         "the legacy stream (%p) cannot be captured: capture a stream made by cuStreamCreate", (void*)s);
    if (!is_created(s))
        return call.fail(CUDA_ERROR_NOT_SUPPORTED,
                         "capturing the per-thread default stream is not emulated: capture a stream made by "
                         "cuStreamCreate");
    if (FakeCapture* c = s->capture) {
        call.invalidates(c);
        return call.fail(CUDA_ERROR_ILLEGAL_STATE, "stream %p is already capturing (%s%s)", (void*)s,
                         describe_capture(c).c_str(), c->origin == s ? "" : ", joined through an event");
    }
    FakeCapture* c = new FakeCapture{g->next_capture++, s, mode, pthread_self()};
    c->members.insert(s);
    c->known[s];
    s->capture = c;
    g->captures.insert(c);
    g->n.captures++;
    return call.ok("(%p, %s) -> capture #%llu", (void*)s, mode_name(mode), (unsigned long long)c->id);
}
API CUresult cuStreamEndCapture(CUstream s, CUgraph* out) {
    Call call("cuStreamEndCapture");
    NEED_CONTEXT;
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    if (!out) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL graph pointer");
    FakeCapture* c = capture_of(s);
    if (!c)
        return call.fail(CUDA_ERROR_ILLEGAL_STATE, "stream %p is not capturing: no cuStreamBeginCapture on it to end",
                         (void*)s);
    if (c->origin != s) {
        call.invalidates(c);
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED,
                         "stream %p joined the capture through an event (%s): the capture ends on the stream that "
                         "began it",
                         (void*)s, describe_capture(c).c_str());
    }
    if (c->mode != kCaptureRelaxed && !pthread_equal(c->thread, pthread_self())) {
        call.invalidates(c);
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
                         "%s was begun by another thread: only a relaxed-mode capture may end in another thread",
                         describe_capture(c).c_str());
    }
    *out = nullptr;
    // Work forked to another stream must have been joined back: the origin waited on an event
    // recorded after that stream's last captured operation.
    std::string unjoined;
    std::map<CUstream, long>& origin = c->known[s];
    for (CUstream m : c->members) {
        if (m == s) continue;
        std::map<CUstream, long>& mk = c->known[m];
        const long last = mk.count(m) ? mk[m] : -1;
        if (last >= 0 && (!origin.count(m) || origin[m] < last) && unjoined.empty()) {
            char b[200];
            snprintf(b, sizeof b, "stream %p, joined to the capture, has captured work (node %ld) the origin stream %p never waited for",
                     (void*)m, last, (void*)s);
            unjoined = b;
        }
    }
    for (CUstream m : c->members) m->capture = nullptr;
    g->captures.erase(c);
    std::unique_ptr<FakeCapture> ended(c);
    if (c->invalidated)
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                         "capture #%llu on stream %p was invalidated by an earlier refusal (%s): it ends without a "
                         "graph",
                         (unsigned long long)c->id, (void*)s, c->why.c_str());
    if (!unjoined.empty())
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNJOINED,
                         "capture #%llu: %s (record an event after it and cuStreamWaitEvent the origin on it); it "
                         "ends without a graph",
                         (unsigned long long)c->id, unjoined.c_str());
    FakeGraph* graph = new FakeGraph{g->next_graph++, c->id, std::move(c->ops)};
    g->graphs.insert(graph);
    *out = graph;
    return call.ok("(%p) -> graph #%llu (%zu nodes, capture #%llu)", (void*)s, (unsigned long long)graph->id,
                   graph->ops.size(), (unsigned long long)c->id);
}
API CUresult cuStreamIsCapturing(CUstream s, int* status) {
    Call call("cuStreamIsCapturing");
    NEED_CONTEXT;
    if (!status) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL pointer");
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    // The legacy stream while a blocking stream captures: an error, which does not invalidate.
    if (is_legacy(s)) {
        const std::vector<FakeCapture*> blocking = blocking_captures();
        if (!blocking.empty())
            return call.fail(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
                             "the legacy stream (%p) is implicitly part of %s, on a blocking stream", (void*)s,
                             describe_capture(blocking[0]).c_str());
    }
    const FakeCapture* c = capture_of(s);
    *status = !c ? 0 : c->invalidated ? 2 : 1;  // CU_STREAM_CAPTURE_STATUS_NONE, _ACTIVE, _INVALIDATED
    return call.ok("(%p) -> %s", (void*)s, !c ? "none" : c->invalidated ? "invalidated" : "active");
}

API CUresult cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph graph, unsigned long long flags) {
    Call call("cuGraphInstantiateWithFlags");
    NEED_CONTEXT;
    if (!out) return call.fail(CUDA_ERROR_INVALID_VALUE, "NULL result pointer");
    if (!g->graphs.count(graph)) return call.fail(CUDA_ERROR_INVALID_VALUE, "%p is not a graph", (void*)graph);
    // AUTO_FREE_ON_LAUNCH 1, DEVICE_LAUNCH 4, USE_NODE_PRIORITY 8; UPLOAD (2) belongs to
    // cuGraphInstantiateWithParams, which has the stream to upload on.
    if (flags & ~(1ull | 4ull | 8ull))
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "flags %#llx: cuGraphInstantiateWithFlags takes CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH "
                         "(1), _DEVICE_LAUNCH (4) and _USE_NODE_PRIORITY (8)",
                         flags);
    if ((flags & 1) && (flags & 4))
        return call.fail(CUDA_ERROR_INVALID_VALUE,
                         "flags %#llx: AUTO_FREE_ON_LAUNCH and DEVICE_LAUNCH cannot be combined", flags);
    FakeGraphExec* x = new FakeGraphExec{g->next_exec++, graph->id, flags, graph->ops};
    g->execs.insert(x);
    g->n.instantiated++;
    *out = x;
    return call.ok("(graph #%llu, flags %#llx) -> graph exec #%llu (%zu nodes)", (unsigned long long)graph->id, flags,
                   (unsigned long long)x->id, x->ops.size());
}

namespace {
// Runs node i of a graph exec: what was checked at capture is checked again where it can have
// changed (allocations freed, page-locked memory freed, the module unloaded). A failure here is
// the device faulting: CUDA_ERROR_ILLEGAL_ADDRESS, and the context is dead.
CUresult replay(Call& call, const FakeGraphExec& x, size_t i) {
    const CapturedOp& op = x.ops[i];
    char where[320];
    snprintf(where, sizeof where, "graph exec #%llu node %zu of %zu (%s)", (unsigned long long)x.id, i, x.ops.size(),
             op.what.c_str());
    auto fault = [&](const char* why) {
        g->sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
        return call.fail(CUDA_ERROR_ILLEGAL_ADDRESS, "%s: %s", where, why);
    };
    auto device_range = [&](const char* role, CUdeviceptr p, size_t n) -> std::string {
        if (n == 0 || live_holding(p, n)) return "";
        char b[200];
        if (const Allocation* f = freed_holding(p))
            snprintf(b, sizeof b, "the %s %#llx is in allocation #%llu, freed after the capture (use after free)", role,
                     p, (unsigned long long)f->id);
        else
            snprintf(b, sizeof b, "the %s [%#llx, +%zu) is not device memory any more", role, p, n);
        return b;
    };
    if (FILE* f = log_file()) fprintf(f, "[fake-cuda]   replay %s\n", where);
    switch (op.kind) {
        case CapturedOp::KERNEL: {
            if (!valid_function(op.f) || op.f->kernel != op.kernel)
                return call.fail(CUDA_ERROR_INVALID_HANDLE, "%s: the kernel's module was unloaded after the capture",
                                 where);
            void* params[kMaxParams];
            for (size_t a = 0; a < op.offsets.size(); a++) params[a] = (void*)(op.args.data() + op.offsets[a]);
            if (CUresult r = check_pointer_args(call, *op.kernel, params, where)) return r;
            run_launch(*op.kernel, op.f->ptx.static_smem > 0, op.grid, op.block, op.smem, params, op.what.c_str());
            g->n.replayed_launches++;
            return CUDA_SUCCESS;
        }
        case CapturedOp::HTOD:
        case CapturedOp::DTOH: {
            const bool htod = op.kind == CapturedOp::HTOD;
            std::string why = device_range(htod ? "destination" : "source", htod ? op.dst : op.src, op.n);
            if (why.empty()) why = not_pinned(op.host, op.n);
            if (!why.empty()) return fault(why.c_str());
            if (htod) {
                memcpy((void*)(uintptr_t)op.dst, op.host, op.n);
                g->n.htod++;
                g->n.htod_bytes += op.n;
            } else {
                memcpy(op.host, (const void*)(uintptr_t)op.src, op.n);
                g->n.dtoh++;
                g->n.dtoh_bytes += op.n;
            }
            count_host_copy(op.host, op.n);
            g->n.replayed_copies++;
            return CUDA_SUCCESS;
        }
        case CapturedOp::DTOD: {
            std::string why = device_range("destination", op.dst, op.n);
            if (why.empty()) why = device_range("source", op.src, op.n);
            if (!why.empty()) return fault(why.c_str());
            memmove((void*)(uintptr_t)op.dst, (const void*)(uintptr_t)op.src, op.n);
            g->n.dtod++;
            g->n.dtod_bytes += op.n;
            g->n.replayed_copies++;
            return CUDA_SUCCESS;
        }
        case CapturedOp::MEMSET: {
            const std::string why = device_range("destination", op.dst, op.n);
            if (!why.empty()) return fault(why.c_str());
            memset((void*)(uintptr_t)op.dst, op.value, op.n);
            g->n.memsets++;
            g->n.memset_bytes += op.n;
            g->n.replayed_memsets++;
            return CUDA_SUCCESS;
        }
        case CapturedOp::WAIT_EXTERNAL: return CUDA_SUCCESS;  // execution is synchronous
        case CapturedOp::HOST_FN:
            // Nothing to check: userData is the caller's, and must stay valid for every replay.
            run_host_fn(op.fn, op.user, where);
            g->n.host_fns_replayed++;
            return CUDA_SUCCESS;
    }
    return CUDA_SUCCESS;
}
}  // namespace

// Replays the recorded operations in order (a valid order of the graph: every dependency was
// issued before what depends on it). On a capturing stream, the graph's nodes are recorded into
// that capture instead (a child graph).
API CUresult cuGraphLaunch(CUgraphExec x, CUstream s) {
    Call call("cuGraphLaunch");
    NEED_CONTEXT;
    if (!g->execs.count(x)) return call.fail(CUDA_ERROR_INVALID_VALUE, "%p is not an instantiated graph", (void*)x);
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap) {
        for (const CapturedOp& op : x->ops) record_op(cap, s, op);
        return call.ok("(graph exec #%llu) captured in #%llu as %zu nodes", (unsigned long long)x->id,
                       (unsigned long long)cap->id, x->ops.size());
    }
    const double t0 = now_ms();
    for (size_t i = 0; i < x->ops.size(); i++)
        if (CUresult r = replay(call, *x, i)) return r;
    g->n.graph_launches++;
    return call.ok("(graph exec #%llu, %zu nodes) %.3f s", (unsigned long long)x->id, x->ops.size(),
                   (now_ms() - t0) / 1000);
}
API CUresult cuGraphUpload(CUgraphExec x, CUstream s) {
    Call call("cuGraphUpload");
    NEED_CONTEXT;
    if (!g->execs.count(x)) return call.fail(CUDA_ERROR_INVALID_VALUE, "%p is not an instantiated graph", (void*)x);
    if (!valid_stream(s)) return call.fail(CUDA_ERROR_INVALID_HANDLE, "%p is not a stream", (void*)s);
    FakeCapture* cap;
    if (CUresult r = enqueue_gate(call, s, &cap)) return r;
    if (cap)
        return call.fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                         "graph exec #%llu: an upload cannot be captured (stream %p is capturing, %s)",
                         (unsigned long long)x->id, (void*)s, describe_capture(cap).c_str());
    g->n.graph_uploads++;  // nothing to upload: device memory is host memory
    return call.ok("(graph exec #%llu)", (unsigned long long)x->id);
}
API CUresult cuGraphExecDestroy(CUgraphExec x) {
    Call call("cuGraphExecDestroy");
    NEED_INIT;
    if (!g->execs.erase(x)) return call.fail(CUDA_ERROR_INVALID_VALUE, "%p is not an instantiated graph", (void*)x);
    const unsigned long long id = x->id;
    delete x;
    return call.ok("(graph exec #%llu)", id);
}
API CUresult cuGraphDestroy(CUgraph graph) {
    Call call("cuGraphDestroy");
    NEED_INIT;
    if (!g->graphs.erase(graph)) return call.fail(CUDA_ERROR_INVALID_VALUE, "%p is not a graph", (void*)graph);
    const unsigned long long id = graph->id;
    delete graph;
    return call.ok("(graph #%llu)", id);
}

// For an in-process reader of the counters (the self-test; a later per-step measurement): writes
// the JSON object printed at exit into buf (NUL-terminated, truncated to n) and returns its length.
API size_t fake_cuda_counters_json(char* buf, size_t n) {
    std::lock_guard<std::recursive_mutex> guard(*g_lock);
    const std::string s = counters_json();
    if (buf && n) snprintf(buf, n, "%s", s.c_str());
    return s.size();
}
