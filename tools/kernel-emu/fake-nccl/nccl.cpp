// The entry points of the fake libnccl.so.2 (see README.md): the part of NCCL's API that finch's
// data-parallel training reaches through cudarc, for ranks that are processes on one machine, each
// with the fake CUDA driver (../fake-cuda), whose device pointers are host addresses. The ranks of a
// communicator meet in a shared-memory segment named from the unique id (segment.cpp); reductions
// fold the ranks' data in rank order (reduce.cpp), so every rank gets the same bits.
//
// A collective is issued in stream order through the CUDA driver's cuLaunchHostFunc: the fake
// driver runs the host function at once outside a stream capture (its execution is synchronous),
// and records it during one, to run at every replay of the graph. The host function's userData is
// a token naming a copy of the collective's arguments, kept until the communicator is destroyed, so a
// graph may replay it any number of times. When no libcuda is loaded the collective runs at once.
//
// A failure inside a collective (a peer that died, gave up or aborted, a timeout, calls that differ
// between the ranks) cannot be returned from a host function: it becomes the communicator's async
// error (ncclCommGetAsyncError), is printed once on stderr, and every later collective on the
// communicator returns it at once. A collective that ran before its call returned (no capture) also
// returns it. Refused arguments print one line on stderr each, with NCCL's code.
//
// Knobs (FAKE_NCCL_*), the call log and the counters printed at exit live here too.
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "fake_nccl.h"

#define API extern "C" __attribute__((visibility("default")))

namespace fnccl {
struct CommCounters;
}

struct ncclComm {
    uint64_t number = 0;  // #1, #2, ... in this process, for messages and the counters
    int rank = 0, nranks = 0;
    std::string id;  // the first 8 hex digits of the id's random part, for messages
    fnccl::Segment seg;
    uint64_t seq = 0, step = 0;  // collectives and steps run so far (the same on every rank)
    std::atomic<int> async_error{ncclSuccess};
    std::atomic<bool> abort{false};  // ncclCommAbort: a wait in progress gives up
    bool finalized = false;
    bool gone = false;      // destroyed or aborted (under `run`)
    std::mutex run;         // held while a collective runs on the communicator, and to destroy it
    std::mutex mapping;     // held to unmap the segment, and to ring it from ncclCommAbort
    std::vector<uint64_t> retained;  // tokens of its captured collectives (under g->lock)
    fnccl::CommCounters* n = nullptr;
};

namespace fnccl {
namespace {

constexpr int kVersion = 23000;  // NCCL 2.30.0, as NCCL_VERSION(2, 30, 0) encodes it
constexpr int kMaxRanks = 64;

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---- knobs ------------------------------------------------------------------------------------------
struct Config {
    double timeout_s = 60;       // FAKE_NCCL_TIMEOUT_S: every wait for the other ranks
    size_t staging = 4u << 20;   // FAKE_NCCL_STAGING_MB: each rank's staging area (two halves)
    std::string log;             // FAKE_NCCL_LOG: "" off, "1" stderr, else a file (%p: the process id)
    std::string counters;        // FAKE_NCCL_COUNTERS: "" off, "1" stderr, else a JSON file (%p)
};
Config read_config() {
    Config c;
    if (const char* s = getenv("FAKE_NCCL_TIMEOUT_S"); s && *s) c.timeout_s = strtod(s, nullptr);
    if (const char* s = getenv("FAKE_NCCL_STAGING_MB"); s && *s) {
        const double mb = strtod(s, nullptr);
        c.staging = mb > 0 ? (size_t)(mb * 1048576) : c.staging;
    }
    if (const char* s = getenv("FAKE_NCCL_LOG"); s && *s && strcmp(s, "0") != 0) c.log = s;
    if (const char* s = getenv("FAKE_NCCL_COUNTERS"); s && *s && strcmp(s, "0") != 0) c.counters = s;
    return c;
}
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

// ---- counters -----------------------------------------------------------------------------------------
}  // namespace
struct CollCount {
    uint64_t count = 0, bytes = 0, recv_bytes = 0;  // runs, bytes sent (its input) and received (its output)
    double seconds = 0;
};
// Per communicator (rank); kept after it is destroyed, for the report at exit.
struct CommCounters {
    uint64_t number = 0;
    int rank = 0, nranks = 0;
    std::string id;
    std::map<std::string, CollCount> per_call;  // collectives that ran, by kind, graph replays included
    uint64_t steps = 0, captured = 0, replayed = 0;
    double wait_seconds = 0;
    int async_error = ncclSuccess;
    const char* state = "live";
};
namespace {

// A collective's arguments: issued at once, queued in a group, or kept for a graph's replays.
struct Pending {
    const char* call;  // the entry point, for messages
    int kind;
    const void* send;
    void* recv;
    size_t count;
    int dtype, op, root;  // op, root: -1 where the collective has none
    void* stream;
    std::shared_ptr<ncclComm> comm;
    uint64_t token = 0;
    int runs = 0;
    bool direct = false;  // being run by the call that issued it (not by a graph replay)
    ncclResult_t result = ncclSuccess;  // of the last run
};

// The CUDA driver entry points the fake NCCL uses (from the libcuda.so.1 in the process).
typedef int (*LaunchHostFunc)(void* stream, void (*fn)(void*), void* user);
typedef int (*CtxGetCurrent)(void** ctx);
typedef int (*PrimaryCtxRetain)(void** ctx, int device);
typedef int (*CtxSetCurrent)(void* ctx);
struct Cuda {
    LaunchHostFunc launch = nullptr;
    CtxGetCurrent get_current = nullptr;
    PrimaryCtxRetain retain = nullptr;
    CtxSetCurrent set_current = nullptr;
};

struct State {
    Config cfg = read_config();
    std::mutex lock;  // everything below (never held while a collective waits)
    std::map<ncclComm*, std::shared_ptr<ncclComm>> comms;
    std::set<ncclComm*> gone;  // destroyed or aborted handles, until a new communicator reuses the address
    std::map<uint64_t, std::shared_ptr<Pending>> pending;  // by token: issued, and not finished or captured
    uint64_t next_token = 1, next_comm = 1;
    std::map<std::string, uint64_t> calls;
    uint64_t errors = 0;
    std::vector<std::unique_ptr<CommCounters>> comm_counters;
    FILE* log = nullptr;
    bool exit_hook = false;
    char last_error[1536] = "";
    Cuda cuda;
    void* cuda_handle = nullptr;
};
// Never destroyed (threads may call in while the process exits).
State* const g = new State;

// A thread's group (ncclGroupStart .. ncclGroupEnd).
struct Group {
    int depth = 0;
    ncclResult_t error = ncclSuccess;  // the first refused call inside it
    std::vector<std::shared_ptr<Pending>>* ops = nullptr;
};
thread_local Group t_group;

const char* result_name(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "ncclSuccess";
        case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
        case ncclSystemError: return "ncclSystemError";
        case ncclInternalError: return "ncclInternalError";
        case ncclInvalidArgument: return "ncclInvalidArgument";
        case ncclInvalidUsage: return "ncclInvalidUsage";
        case ncclRemoteError: return "ncclRemoteError";
        case ncclInProgress: return "ncclInProgress";
        default: return "ncclResult?";
    }
}

// ---- the call log and error lines ---------------------------------------------------------------------
FILE* log_file_locked() {
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
void log_line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void log_line(const char* fmt, ...) {
    std::lock_guard<std::mutex> guard(g->lock);
    if (FILE* f = log_file_locked()) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(f, "[fake-nccl] ");
        vfprintf(f, fmt, ap);
        fprintf(f, "\n");
        va_end(ap);
    }
}
// One line on stderr (and in the log file), remembered for ncclGetLastError.
void error_line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void error_line(const char* fmt, ...) {
    char msg[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    std::lock_guard<std::mutex> guard(g->lock);
    fprintf(stderr, "[fake-nccl] %s\n", msg);
    if (FILE* f = log_file_locked(); f && f != stderr) fprintf(f, "[fake-nccl] %s\n", msg);
    snprintf(g->last_error, sizeof g->last_error, "%s", msg);
    g->errors++;
}

// One API call: ok() logs it, fail() prints one line on stderr, quiet() only logs.
class Call {
   public:
    explicit Call(const char* fn) : fn_(fn) {
        std::lock_guard<std::mutex> guard(g->lock);
        g->calls[fn]++;
    }
    const char* name() const { return fn_; }
    // Messages about a communicator name its rank.
    void on(const ncclComm* c) {
        if (c) snprintf(who_, sizeof who_, "rank %d of %d (comm #%llu): ", c->rank, c->nranks, (unsigned long long)c->number);
    }
    ncclResult_t ok(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
        std::lock_guard<std::mutex> guard(g->lock);
        if (FILE* f = log_file_locked()) {
            va_list ap;
            va_start(ap, fmt);
            fprintf(f, "[fake-nccl] %s%s", who_, fn_);
            vfprintf(f, fmt, ap);
            fprintf(f, " = ncclSuccess\n");
            va_end(ap);
        }
        return ncclSuccess;
    }
    ncclResult_t fail(ncclResult_t r, const char* fmt, ...) __attribute__((format(printf, 3, 4))) {
        char msg[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        error_line("%s: %s%s (%s)", fn_, who_, msg, result_name(r));
        return r;
    }
    ncclResult_t quiet(ncclResult_t r, const char* what) {
        log_line("%s%s: %s = %s", who_, fn_, what, result_name(r));
        return r;
    }

   private:
    const char* fn_;
    char who_[96] = "";
};

// ---- counters at exit ------------------------------------------------------------------------------------
std::string json_string(const std::string& s) {
    std::string out = "\"";
    for (char ch : s) out += ch == '"' || ch == '\\' ? std::string("\\") + ch : std::string(1, ch);
    return out + "\"";
}
std::string counters_json_locked() {
    std::string s;
    char b[512];
    snprintf(b, sizeof b, "{\"pid\": %d, \"version\": %d, \"calls\": {", (int)getpid(), kVersion);
    s += b;
    bool first = true;
    for (auto& [name, n] : g->calls) {
        snprintf(b, sizeof b, "%s\"%s\": %llu", first ? "" : ", ", name.c_str(), (unsigned long long)n);
        s += b;
        first = false;
    }
    snprintf(b, sizeof b, "}, \"errors\": %llu, \"comms\": [", (unsigned long long)g->errors);
    s += b;
    first = true;
    for (const auto& c : g->comm_counters) {
        snprintf(b, sizeof b, "%s{\"comm\": %llu, \"rank\": %d, \"nranks\": %d, \"id\": %s, \"collectives\": {",
                 first ? "" : ", ", (unsigned long long)c->number, c->rank, c->nranks, json_string(c->id).c_str());
        s += b;
        first = false;
        bool first_call = true;
        for (auto& [name, k] : c->per_call) {
            snprintf(b, sizeof b, "%s\"%s\": {\"count\": %llu, \"bytes\": %llu, \"recv_bytes\": %llu, \"seconds\": %.6f}",
                     first_call ? "" : ", ", name.c_str(), (unsigned long long)k.count, (unsigned long long)k.bytes,
                     (unsigned long long)k.recv_bytes, k.seconds);
            s += b;
            first_call = false;
        }
        snprintf(b, sizeof b,
                 "}, \"steps\": %llu, \"captured\": %llu, \"replayed\": %llu, \"wait_seconds\": %.6f, \"async_error\": "
                 "\"%s\", \"state\": \"%s\"}",
                 (unsigned long long)c->steps, (unsigned long long)c->captured, (unsigned long long)c->replayed,
                 c->wait_seconds, result_name(c->async_error), c->state);
        s += b;
    }
    s += "]}";
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
    std::lock_guard<std::mutex> guard(g->lock);
    const std::string json = counters_json_locked();
    if (g->cfg.counters != "1") {
        const std::string path = with_pid(g->cfg.counters);
        if (FILE* f = fopen(path.c_str(), "w")) {
            fprintf(f, "%s\n", json.c_str());
            fclose(f);
        } else {
            fprintf(stderr, "[fake-nccl] cannot write the counters to %s\n", path.c_str());
        }
        return;
    }
    fprintf(stderr, "[fake-nccl] counters of process %d:\n", (int)getpid());
    for (const auto& c : g->comm_counters) {
        fprintf(stderr, "  comm #%llu (id %s): rank %d of %d, %s, %llu steps, %.3f s waiting for peers, %llu captured, "
                "%llu replayed, async error %s\n",
                (unsigned long long)c->number, c->id.c_str(), c->rank, c->nranks, c->state,
                (unsigned long long)c->steps, c->wait_seconds, (unsigned long long)c->captured,
                (unsigned long long)c->replayed, result_name(c->async_error));
        for (auto& [name, k] : c->per_call)
            fprintf(stderr, "    %-18s %6llu  sent %s, received %s, %.3f s\n", name.c_str(), (unsigned long long)k.count,
                    human_bytes(k.bytes).c_str(), human_bytes(k.recv_bytes).c_str(), k.seconds);
    }
    fprintf(stderr, "  errors returned %llu\n", (unsigned long long)g->errors);
    fprintf(stderr, "[fake-nccl] counters %s\n", json.c_str());
}
// At the first communicator or id: a library only probed (loaded and unloaded) registers nothing.
void exit_hook() {
    std::lock_guard<std::mutex> guard(g->lock);
    if (g->cfg.counters.empty() || g->exit_hook) return;
    g->exit_hook = true;
    atexit(print_counters);
}

// ---- the CUDA driver ---------------------------------------------------------------------------------
// The fake CUDA driver's entry points, from the libcuda loaded in this process (cudarc loads it
// before it makes a stream). None loaded: cuda->launch stays nullptr and collectives run at once.
// A libcuda that is not the fake is refused: its device pointers are not host addresses.
ncclResult_t find_cuda(Call& call, Cuda* cuda) {
    {
        std::lock_guard<std::mutex> guard(g->lock);
        if (g->cuda.launch) {
            *cuda = g->cuda;
            return ncclSuccess;
        }
    }
    // cudarc loads it RTLD_LOCAL: dlopen with RTLD_NOLOAD finds it by its soname. A libcuda linked
    // into the program is found through RTLD_DEFAULT.
    void* h = nullptr;
    for (const char* name : {"libcuda.so.1", "libcuda.so"})
        if ((h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD))) break;
    if (!h && dlsym(RTLD_DEFAULT, "cuLaunchKernel")) h = RTLD_DEFAULT;
    if (!h) {
        *cuda = Cuda{};
        return ncclSuccess;
    }
    if (!dlsym(h, "fake_cuda_counters_json")) {
        if (h != RTLD_DEFAULT) dlclose(h);
        return call.fail(ncclSystemError,
                         "the libcuda.so.1 in this process is not the fake CUDA driver (tools/kernel-emu/fake-cuda): "
                         "the fake NCCL reads device memory as host memory, which only the fake driver's is");
    }
    Cuda c;
    c.launch = (LaunchHostFunc)dlsym(h, "cuLaunchHostFunc");
    c.get_current = (CtxGetCurrent)dlsym(h, "cuCtxGetCurrent");
    c.retain = (PrimaryCtxRetain)dlsym(h, "cuDevicePrimaryCtxRetain");
    c.set_current = (CtxSetCurrent)dlsym(h, "cuCtxSetCurrent");
    if (!c.launch) {
        if (h != RTLD_DEFAULT) dlclose(h);
        return call.fail(ncclSystemError,
                         "the fake CUDA driver in this process has no cuLaunchHostFunc: rebuild it "
                         "(tools/kernel-emu/fake-cuda/build.sh)");
    }
    std::lock_guard<std::mutex> guard(g->lock);
    if (!g->cuda.launch) {
        g->cuda = c;
        g->cuda_handle = h;  // kept open: the function pointers stay valid
    } else if (h != RTLD_DEFAULT) {
        dlclose(h);
    }
    *cuda = g->cuda;
    return ncclSuccess;
}

// ---- communicators -----------------------------------------------------------------------------------
std::shared_ptr<ncclComm> lookup(ncclComm* c) {
    std::lock_guard<std::mutex> guard(g->lock);
    auto it = g->comms.find(c);
    return it == g->comms.end() ? nullptr : it->second;
}
// The refusal of a handle that is not a live communicator.
ncclResult_t bad_handle(Call& call, ncclComm* c) {
    if (!c) return call.fail(ncclInvalidArgument, "comm argument is NULL");
    bool gone;
    {
        std::lock_guard<std::mutex> guard(g->lock);
        gone = g->gone.count(c) > 0;
    }
    if (gone)
        return call.fail(ncclInvalidUsage, "communicator %p was destroyed or aborted (ncclCommDestroy, ncclCommAbort)",
                         (void*)c);
    return call.fail(ncclInvalidArgument, "%p is not a communicator", (void*)c);
}
// Forgets a destroyed or aborted communicator: its handle, and its captured collectives (a graph
// that replays one later finds nothing and says so).
void release(const std::shared_ptr<ncclComm>& c, const char* state) {
    std::lock_guard<std::mutex> guard(g->lock);
    for (uint64_t token : c->retained) g->pending.erase(token);
    c->retained.clear();
    g->comms.erase(c.get());
    g->gone.insert(c.get());
    c->n->state = state;
    c->n->async_error = c->async_error.load();
}

// ---- running a collective ------------------------------------------------------------------------------
bool has_op(int kind) { return kind == kAllReduce || kind == kReduceScatter || kind == kReduce; }
bool has_root(int kind) { return kind == kBroadcast || kind == kReduce; }

// Runs one collective on this rank, in steps of at most half a staging area per rank (see
// segment.cpp). A rank's output is written only after every rank's descriptor of the step matched,
// so a collective that fails leaves the chunks from the failing one on untouched (all of the output
// when it fits in one step).
WaitError run_collective(ncclComm& c, const Pending& p, double* wait_seconds) {
    Segment& s = c.seg;
    const int n = c.nranks, r = c.rank;
    const size_t es = type_size(p.dtype), half = s.half;
    const size_t per = p.kind == kReduceScatter ? half / (es * n) : half / es;  // elements per step
    const size_t total = p.count;
    const uint64_t nchunks = total ? (total + per - 1) / per : 1;
    const uint64_t seq = ++c.seq;
    const unsigned char* send = (const unsigned char*)p.send;
    unsigned char* recv = (unsigned char*)p.recv;
    const bool root = has_root(p.kind) && p.root == r;
    // memmove: an empty collective may pass NULL buffers (0 bytes from NULL is still undefined in C).
    auto copy = [](void* dst, const void* src, size_t n) {
        if (n) memmove(dst, src, n);
    };
    for (uint64_t k = 0; k < nchunks; k++) {
        const size_t off = k * per, m = total ? std::min(per, total - off) : 0, bytes = m * es;
        const uint64_t step = ++c.step;
        const int parity = (int)(step & 1);
        unsigned char* mine = s.data(r, parity);
        // 1. This rank's part, and what it says it is doing.
        switch (p.kind) {
            case kAllReduce:
            case kReduce:
            case kAllGather: copy(mine, send + off * es, bytes); break;
            case kBroadcast:
                if (root) copy(mine, send + off * es, bytes);
                break;
            case kReduceScatter:
                for (int j = 0; j < n; j++) copy(mine + (size_t)j * bytes, send + ((size_t)j * total + off) * es, bytes);
                break;
        }
        const Desc d{seq, total, k, nchunks, p.kind, p.dtype, p.op, p.root};
        s.slot(r).desc[parity] = d;
        post(s, step);
        // 2. Every rank's.
        if (WaitError e = wait_step(s, step, g->cfg.timeout_s, &c.abort, wait_seconds); e.code) return e;
        for (int j = 0; j < n; j++) {
            const Desc o = s.slot(j).desc[parity];
            if (o.seq == d.seq && o.count == d.count && o.chunk == d.chunk && o.nchunks == d.nchunks &&
                o.kind == d.kind && o.dtype == d.dtype && o.op == d.op && o.root == d.root)
                continue;
            WaitError e;
            e.code = ncclInvalidUsage;
            e.peer = j;
            char b[512];
            snprintf(b, sizeof b,
                     "rank %d called %s as its collective #%llu instead: every rank must make the same calls in the "
                     "same order (real NCCL would hang or corrupt data here)",
                     j, describe(o).c_str(), (unsigned long long)o.seq);
            e.why = b;
            return e;
        }
        // 3. This rank's output.
        const unsigned char* in[kMaxRanks];
        switch (p.kind) {
            case kAllReduce:
            case kReduce:
                if ((p.kind == kReduce && !root) || !m) break;
                for (int j = 0; j < n; j++) in[j] = s.data(j, parity);
                reduce(p.dtype, p.op, recv + off * es, in, n, m);
                break;
            case kReduceScatter:
                if (!m) break;
                for (int j = 0; j < n; j++) in[j] = s.data(j, parity) + (size_t)r * bytes;
                reduce(p.dtype, p.op, recv + off * es, in, n, m);
                break;
            case kAllGather:
                for (int j = 0; j < n; j++) copy(recv + ((size_t)j * total + off) * es, s.data(j, parity), bytes);
                break;
            case kBroadcast: copy(recv + off * es, s.data(p.root, parity), bytes); break;
        }
    }
    return WaitError{};
}

// Bytes a collective sends (its input) and receives (its output) on this rank.
void sizes(const Pending& p, int rank, int n, uint64_t* sent, uint64_t* received) {
    const uint64_t b = (uint64_t)p.count * type_size(p.dtype);
    switch (p.kind) {
        case kAllReduce: *sent = b, *received = b; break;
        case kReduceScatter: *sent = b * n, *received = b; break;
        case kAllGather: *sent = b, *received = b * n; break;
        case kBroadcast: *sent = p.root == rank ? b : 0, *received = b; break;
        case kReduce: *sent = b, *received = p.root == rank ? b : 0; break;
        default: *sent = *received = 0;
    }
}

void run_pending(Pending& p) {
    ncclComm& c = *p.comm;
    std::lock_guard<std::mutex> run(c.run);
    p.runs++;
    const bool replay = !p.direct;
    if (c.gone) {
        p.result = ncclInvalidUsage;
        error_line("%s: rank %d of %d (comm #%llu): the communicator was destroyed or aborted before the collective "
                   "ran: nothing done (ncclInvalidUsage)",
                   p.call, c.rank, c.nranks, (unsigned long long)c.number);
        return;
    }
    if (const int e = c.async_error.load()) {
        // Reported when it happened; a graph replaying the collective must not flood stderr.
        p.result = e;
        log_line("rank %d: %s not run: the communicator has async error %s", c.rank, p.call, result_name(e));
        return;
    }
    const double t0 = now_s();
    double waited = 0;
    const uint64_t seq = c.seq + 1, first_step = c.step + 1;
    const WaitError e = run_collective(c, p, &waited);
    const double seconds = now_s() - t0;
    uint64_t sent, received;
    sizes(p, c.rank, c.nranks, &sent, &received);
    {
        std::lock_guard<std::mutex> guard(g->lock);
        CollCount& k = c.n->per_call[kind_name(p.kind)];
        k.count++;
        k.bytes += sent;
        k.recv_bytes += received;
        k.seconds += seconds;
        c.n->steps += c.step - first_step + 1;
        c.n->wait_seconds += waited;
        c.n->replayed += replay;
    }
    const Desc d{seq, p.count, 0, 0, p.kind, p.dtype, p.op, p.root};
    p.result = e.code;
    if (e.code) {
        c.async_error = e.code;
        {
            std::lock_guard<std::mutex> guard(g->lock);
            c.n->async_error = e.code;
        }
        if (e.local_abort) {
            log_line("rank %d: %s #%llu interrupted by ncclCommAbort", c.rank, p.call, (unsigned long long)seq);
            return;
        }
        mark_failed(c.seg, describe(d) + ": " + e.why);
        error_line("%s: rank %d of %d (comm #%llu), collective #%llu %s%s: %s (%s)", p.call, c.rank, c.nranks,
                   (unsigned long long)c.number, (unsigned long long)seq, describe(d).c_str(),
                   replay ? " replayed by a graph" : "", e.why.c_str(), result_name(e.code));
        return;
    }
    log_line("  rank %d: ran %s #%llu %s%s, %llu steps, %.6f s (%.6f s waiting)", c.rank, p.call,
             (unsigned long long)seq, describe(d).c_str(), replay ? " (graph replay)" : "",
             (unsigned long long)(c.step - first_step + 1), seconds, waited);
}

// The host function of every collective: userData is the token of its arguments.
void host_fn(void* user) {
    const uint64_t token = (uint64_t)(uintptr_t)user;
    std::shared_ptr<Pending> p;
    {
        std::lock_guard<std::mutex> guard(g->lock);
        auto it = g->pending.find(token);
        if (it != g->pending.end()) p = it->second;
    }
    if (!p) {
        error_line("a captured collective (token %llu) was replayed after its communicator was destroyed or aborted: "
                   "nothing done",
                   (unsigned long long)token);
        return;
    }
    run_pending(*p);
}

// Issues a collective in stream order: through cuLaunchHostFunc (which runs it now, or records it
// into the stream's capture), or at once when no CUDA driver is loaded.
ncclResult_t launch(Call& call, const std::shared_ptr<Pending>& p) {
    Cuda cuda;
    if (ncclResult_t r = find_cuda(call, &cuda)) return r;
    {
        std::lock_guard<std::mutex> guard(g->lock);
        p->token = g->next_token++;
        g->pending[p->token] = p;
    }
    void* user = (void*)(uintptr_t)p->token;
    p->direct = true;
    if (!cuda.launch) {
        host_fn(user);
    } else {
        // cuLaunchHostFunc needs a current context; real NCCL makes the device's current (cudaSetDevice).
        void* ctx = nullptr;
        if (cuda.get_current && cuda.get_current(&ctx) == 0 && !ctx && cuda.retain && cuda.set_current &&
            cuda.retain(&ctx, 0) == 0)
            cuda.set_current(ctx);
        if (const int r = cuda.launch(p->stream, host_fn, user)) {
            p->direct = false;
            {
                std::lock_guard<std::mutex> guard(g->lock);
                g->pending.erase(p->token);
            }
            return call.fail(ncclUnhandledCudaError,
                             "cuLaunchHostFunc on stream %p returned CUDA error %d (see the fake CUDA driver's line "
                             "above): the collective was not issued",
                             p->stream, r);
        }
    }
    p->direct = false;
    std::lock_guard<std::mutex> guard(g->lock);
    if (p->runs == 0) {
        // Recorded by a stream capture: it runs at every replay of the graph, until the
        // communicator is destroyed.
        p->comm->retained.push_back(p->token);
        p->comm->n->captured++;
        return ncclSuccess;
    }
    g->pending.erase(p->token);
    return p->result;
}

// Checks and issues (or queues, inside a group) one collective.
ncclResult_t collective(Call& call, int kind, const void* send, void* recv, size_t count, int dtype, int op, int root,
                        ncclComm* comm, void* stream) {
    std::shared_ptr<ncclComm> c = comm ? lookup(comm) : nullptr;
    ncclResult_t r;
    if (!c) {
        r = bad_handle(call, comm);
    } else {
        call.on(c.get());
        r = [&]() -> ncclResult_t {
            if (c->finalized)
                return call.fail(ncclInvalidUsage, "the communicator was finalized (ncclCommFinalize): only "
                                                   "ncclCommDestroy may follow");
            if (const int e = c->async_error.load())
                return call.quiet(e, "an earlier collective failed: the communicator's async error");
            if (dtype == ncclFloat8e4m3 || dtype == ncclFloat8e5m2)
                return call.fail(ncclInvalidArgument, "datatype %s is not emulated by the fake NCCL", type_name(dtype));
            const size_t es = type_size(dtype);
            if (!es) return call.fail(ncclInvalidArgument, "invalid datatype %d", dtype);
            if (has_op(kind) && (op < 0 || op >= ncclNumOps))
                return call.fail(ncclInvalidArgument, "invalid reduction operation %d (sum 0 .. avg 4; ops made by "
                                                      "ncclRedOpCreatePreMulSum are not emulated)",
                                 op);
            if (has_root(kind) && (root < 0 || root >= c->nranks))
                return call.fail(ncclInvalidArgument, "root %d is not a rank (nranks %d)", root, c->nranks);
            const size_t mult = kind == kAllGather || kind == kReduceScatter ? (size_t)c->nranks : 1;
            if (count > SIZE_MAX / es / mult)
                return call.fail(ncclInvalidArgument, "count %zu overflows: %zu x %zu elements of %zu bytes", count,
                                 count, mult, es);
            const bool needs_send = kind != kBroadcast || root == c->rank;
            const bool needs_recv = kind != kReduce || root == c->rank;
            if (count && needs_send && !send) return call.fail(ncclInvalidArgument, "sendbuff is NULL");
            if (count && needs_recv && !recv) return call.fail(ncclInvalidArgument, "recvbuff is NULL");
            return ncclSuccess;
        }();
    }
    if (r == ncclSuccess) {
        char what[256];
        snprintf(what, sizeof what, "(send %p, recv %p, count %zu, %s%s%s%s, stream %p)", send, recv, count,
                 type_name(dtype), has_op(kind) ? ", " : "", has_op(kind) ? op_name(op) : "",
                 has_root(kind) ? (", root " + std::to_string(root)).c_str() : "", stream);
        auto p = std::make_shared<Pending>(Pending{call.name(), kind, send, recv, count, dtype, has_op(kind) ? op : -1,
                                                   has_root(kind) ? root : -1, stream, c});
        if (t_group.depth > 0) {
            if (!t_group.ops) t_group.ops = new std::vector<std::shared_ptr<Pending>>;
            t_group.ops->push_back(p);
            return call.ok("%s queued in a group", what);
        }
        r = launch(call, p);
        if (r == ncclSuccess) return call.ok("%s%s", what, p->runs ? "" : " captured");
        return call.quiet(r, what);
    }
    // A refused call inside a group fails the group too (ncclGroupEnd returns it, issuing nothing).
    if (t_group.depth > 0 && t_group.error == ncclSuccess) t_group.error = r;
    return r;
}

ncclResult_t init_rank(Call& call, ncclComm_t* out, int nranks, const ncclUniqueId& id, int rank) {
    if (!out) return call.fail(ncclInvalidArgument, "comm (the result pointer) is NULL");
    *out = nullptr;
    if (nranks < 1 || nranks > kMaxRanks)
        return call.fail(ncclInvalidArgument, "nranks %d: must be 1 to %d (the fake's limit)", nranks, kMaxRanks);
    if (rank < 0 || rank >= nranks)
        return call.fail(ncclInvalidArgument, "rank %d: must be 0 to %d (nranks %d)", rank, nranks - 1, nranks);
    const std::string name = segment_name(id);
    if (name.empty())
        return call.fail(ncclInvalidArgument,
                         "the unique id was not made by this fake NCCL's ncclGetUniqueId (it does not start with its "
                         "magic \"fake-nccl id 1\")");
    Cuda cuda;
    if (ncclResult_t r = find_cuda(call, &cuda)) return r;
    exit_hook();
    auto c = std::make_shared<ncclComm>();
    c->rank = rank;
    c->nranks = nranks;
    c->id = name.substr(11, 8);
    const WaitError e = join(name, nranks, rank, g->cfg.staging / 2, g->cfg.timeout_s, &c->abort, &c->seg);
    if (e.code)
        return call.fail(e.code, "rank %d of %d (id %s): %s", rank, nranks, c->id.c_str(), e.why.c_str());
    {
        std::lock_guard<std::mutex> guard(g->lock);
        c->number = g->next_comm++;
        g->comm_counters.push_back(std::make_unique<CommCounters>());
        c->n = g->comm_counters.back().get();
        c->n->number = c->number;
        c->n->rank = rank;
        c->n->nranks = nranks;
        c->n->id = c->id;
        g->comms[c.get()] = c;
        g->gone.erase(c.get());
    }
    *out = c.get();
    call.on(c.get());
    return call.ok("(id %s, staging 2 x %zu bytes) -> %p", c->id.c_str(), c->seg.half, (void*)c.get());
}

// ncclCommDestroy and ncclCommAbort.
ncclResult_t end_comm(Call& call, ncclComm* comm, bool abort) {
    if (!comm) return call.ok("(NULL)");  // as NCCL: nothing to do
    std::shared_ptr<ncclComm> c = lookup(comm);
    if (!c) return bad_handle(call, comm);
    call.on(c.get());
    if (abort) {
        // A collective waiting in another thread gives up (within about 10 ms).
        c->abort = true;
        std::lock_guard<std::mutex> m(c->mapping);
        wake(c->seg);
    }
    {
        std::lock_guard<std::mutex> run(c->run);
        if (c->gone) return call.fail(ncclInvalidUsage, "the communicator was already destroyed or aborted");
        c->gone = true;
        std::lock_guard<std::mutex> m(c->mapping);
        leave(c->seg, abort ? kAborted : kLeft, abort ? "ncclCommAbort" : "ncclCommDestroy");
    }
    release(c, abort ? "aborted" : "destroyed");
    return call.ok("(%p)", (void*)comm);
}

const char* error_string(ncclResult_t r) {
    // NCCL's own wording.
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

}  // namespace
}  // namespace fnccl

using namespace fnccl;

// ---- version, ids, errors -----------------------------------------------------------------------------
API ncclResult_t ncclGetVersion(int* version) {
    Call call("ncclGetVersion");
    if (!version) return call.fail(ncclInvalidArgument, "version argument is NULL");
    *version = kVersion;
    return call.ok(" -> %d", kVersion);
}
API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    Call call("ncclGetUniqueId");
    if (!id) return call.fail(ncclInvalidArgument, "uniqueId argument is NULL");
    exit_hook();
    sweep_stale();  // segments of killed jobs
    if (!make_id(id)) return call.fail(ncclSystemError, "getrandom: %s", strerror(errno));
    return call.ok(" -> %s", segment_name(*id).c_str());
}
API const char* ncclGetErrorString(ncclResult_t r) { return error_string(r); }
// NCCL keeps one last error for the process; the communicator argument is not used.
API const char* ncclGetLastError(ncclComm_t) { return g->last_error; }

// ---- communicators ------------------------------------------------------------------------------------
API ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    Call call("ncclCommInitRank");
    return init_rank(call, comm, nranks, id, rank);
}
// The config (blocking, CGA size, ...) is not read: the communicator is blocking, as by default.
API ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, void* config) {
    Call call("ncclCommInitRankConfig");
    (void)config;
    return init_rank(call, comm, nranks, id, rank);
}
API ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    Call call("ncclCommCount");
    std::shared_ptr<ncclComm> c = lookup(comm);
    if (!c) return bad_handle(call, comm);
    if (!count) return call.fail(ncclInvalidArgument, "count argument is NULL");
    *count = c->nranks;
    return call.ok(" -> %d", *count);
}
API ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    Call call("ncclCommUserRank");
    std::shared_ptr<ncclComm> c = lookup(comm);
    if (!c) return bad_handle(call, comm);
    if (!rank) return call.fail(ncclInvalidArgument, "rank argument is NULL");
    *rank = c->rank;
    return call.ok(" -> %d", *rank);
}
// The fake CUDA driver has one device.
API ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
    Call call("ncclCommCuDevice");
    std::shared_ptr<ncclComm> c = lookup(comm);
    if (!c) return bad_handle(call, comm);
    if (!device) return call.fail(ncclInvalidArgument, "device argument is NULL");
    *device = 0;
    return call.ok(" -> 0");
}
API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
    Call call("ncclCommGetAsyncError");
    std::shared_ptr<ncclComm> c = lookup(comm);
    if (!c) return bad_handle(call, comm);
    if (!async_error) return call.fail(ncclInvalidArgument, "asyncError argument is NULL");
    *async_error = c->async_error.load();
    call.on(c.get());
    return call.ok(" -> %s", result_name(*async_error));
}
// Collectives already ran (or are captured): nothing to flush. Only ncclCommDestroy may follow.
API ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    Call call("ncclCommFinalize");
    std::shared_ptr<ncclComm> c = lookup(comm);
    if (!c) return bad_handle(call, comm);
    call.on(c.get());
    std::lock_guard<std::mutex> run(c->run);
    if (c->finalized) return call.fail(ncclInvalidUsage, "the communicator was already finalized");
    c->finalized = true;
    return call.ok("(%p)", (void*)comm);
}
API ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    Call call("ncclCommDestroy");
    return end_comm(call, comm, false);
}
// Unblocks a collective waiting in another thread, and tells the peers (their waits fail at once
// with ncclRemoteError).
API ncclResult_t ncclCommAbort(ncclComm_t comm) {
    Call call("ncclCommAbort");
    return end_comm(call, comm, true);
}

// ---- collectives --------------------------------------------------------------------------------------
API ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, int datatype, int op,
                               ncclComm_t comm, void* stream) {
    Call call("ncclAllReduce");
    return collective(call, kAllReduce, sendbuff, recvbuff, count, datatype, op, -1, comm, stream);
}
API ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, int datatype, int op,
                                   ncclComm_t comm, void* stream) {
    Call call("ncclReduceScatter");
    return collective(call, kReduceScatter, sendbuff, recvbuff, recvcount, datatype, op, -1, comm, stream);
}
API ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, int datatype, ncclComm_t comm,
                               void* stream) {
    Call call("ncclAllGather");
    return collective(call, kAllGather, sendbuff, recvbuff, sendcount, datatype, -1, -1, comm, stream);
}
API ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, int datatype, int root,
                               ncclComm_t comm, void* stream) {
    Call call("ncclBroadcast");
    return collective(call, kBroadcast, sendbuff, recvbuff, count, datatype, -1, root, comm, stream);
}
// The legacy in-place broadcast.
API ncclResult_t ncclBcast(void* buff, size_t count, int datatype, int root, ncclComm_t comm, void* stream) {
    Call call("ncclBcast");
    return collective(call, kBroadcast, buff, buff, count, datatype, -1, root, comm, stream);
}
API ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, int datatype, int op, int root,
                            ncclComm_t comm, void* stream) {
    Call call("ncclReduce");
    return collective(call, kReduce, sendbuff, recvbuff, count, datatype, op, root, comm, stream);
}

// ---- groups -------------------------------------------------------------------------------------------
// Collectives inside a group are queued and issued at the outermost ncclGroupEnd, in order, each in
// its stream's order. A refused call inside the group makes ncclGroupEnd return its code and issue
// nothing (as NCCL, which aborts the group).
API ncclResult_t ncclGroupStart() {
    Call call("ncclGroupStart");
    t_group.depth++;
    return call.ok(" -> depth %d", t_group.depth);
}
API ncclResult_t ncclGroupEnd() {
    Call call("ncclGroupEnd");
    if (t_group.depth == 0) return call.fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--t_group.depth > 0) return call.ok(" -> depth %d", t_group.depth);
    std::vector<std::shared_ptr<Pending>> ops;
    if (t_group.ops) ops.swap(*t_group.ops);
    const ncclResult_t refused = t_group.error;
    t_group.error = ncclSuccess;
    if (refused)
        return call.quiet(refused, "a call inside the group was refused (its line is above): nothing in it was issued");
    ncclResult_t first = ncclSuccess;
    size_t captured = 0;
    for (const auto& p : ops) {
        call.on(p->comm.get());
        const ncclResult_t r = launch(call, p);
        if (r && !first) first = r;
        captured += p->runs == 0 && r == ncclSuccess;
    }
    if (first) return call.quiet(first, "a collective of the group failed (its line is above)");
    return call.ok(" (%zu collectives%s)", ops.size(), captured ? ", captured" : "");
}

// For an in-process reader of the counters (the self-test): writes the JSON object printed at exit
// into buf (NUL-terminated, truncated to n) and returns its length.
API size_t fake_nccl_counters_json(char* buf, size_t n) {
    std::lock_guard<std::mutex> guard(g->lock);
    const std::string s = counters_json_locked();
    if (buf && n) snprintf(buf, n, "%s", s.c_str());
    return s.size();
}
