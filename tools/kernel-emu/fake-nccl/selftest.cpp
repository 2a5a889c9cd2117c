// The fake NCCL's self-test (run by selftest.sh). Every case starts real processes, one per rank
// (fork), each loading libnccl.so.2 with dlopen and resolving one symbol at a time, as cudarc does;
// rank 0 makes the unique id and hands it to the others through pipes (finch uses TCP). A rank
// checks the codes it gets and its results against a plain reference (its own float16 and bfloat16
// conversions, the rank-order fold the README documents) and prints its failures on stdout; the
// parent checks how every rank ended, what it printed on stderr, and that the results every rank
// must share are bit-identical. The graph case also loads the fake CUDA driver and captures
// collectives into a CUDA graph that it replays.
//
//   selftest NCCL_LIBRARY CUDA_LIBRARY      exit 0 when every case passes
#include <dlfcn.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

// ---- NCCL's values (nccl.h 2.30, as cudarc binds them) --------------------------------------------
enum { OK = 0, UNHANDLED_CUDA = 1, SYSTEM_ERROR = 2, INVALID_ARGUMENT = 4, INVALID_USAGE = 5, REMOTE_ERROR = 6 };
enum { INT8, UINT8, INT32, UINT32, INT64, UINT64, FLOAT16, FLOAT32, FLOAT64, BFLOAT16, FP8E4M3, FP8E5M2 };
enum { SUM, PROD, MAX, MIN, AVG };
enum Kind { ALL_REDUCE, REDUCE, BROADCAST, ALL_GATHER, REDUCE_SCATTER };
const char* kKindNames[] = {"AllReduce", "Reduce", "Broadcast", "AllGather", "ReduceScatter"};
const char* kTypeNames[] = {"int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64", "bfloat16"};
const char* kOpNames[] = {"sum", "prod", "max", "min", "avg"};
const int kTypes[] = {INT8, UINT8, INT32, UINT32, INT64, UINT64, FLOAT16, FLOAT32, FLOAT64, BFLOAT16};
size_t type_size(int t) { return t <= UINT8 ? 1 : t <= UINT32 ? 4 : t <= UINT64 ? 8 : t == FLOAT16 || t == BFLOAT16 ? 2 : t == FLOAT32 ? 4 : 8; }
struct Id {
    char internal[128];
};
typedef void* Comm;
typedef void* Stream;
typedef unsigned long long CUdeviceptr;

// ---- the libraries, one symbol at a time (a missing one fails the rank, as cudarc would panic) ----
const char* g_nccl_path;
const char* g_cuda_path;
void* g_lib;
void* g_cuda;
void* sym(void* lib, const char* name) {
    void* p = lib ? dlsym(lib, name) : nullptr;
    if (!p) {
        printf("  missing symbol %s\n", name);
        exit(1);
    }
    return p;
}
#define NCCL(ret, name, args)                        \
    template <typename... A>                         \
    ret name(A... a) {                               \
        typedef ret(*F) args;                        \
        return ((F)sym(g_lib, #name))(a...);         \
    }
#define CUDA(ret, name, args)                        \
    template <typename... A>                         \
    ret name(A... a) {                               \
        typedef ret(*F) args;                        \
        return ((F)sym(g_cuda, #name))(a...);        \
    }
NCCL(int, ncclGetVersion, (int*))
NCCL(int, ncclGetUniqueId, (Id*))
NCCL(int, ncclCommInitRank, (Comm*, int, Id, int))
NCCL(int, ncclCommInitRankConfig, (Comm*, int, Id, int, void*))
NCCL(int, ncclCommCount, (Comm, int*))
NCCL(int, ncclCommUserRank, (Comm, int*))
NCCL(int, ncclCommCuDevice, (Comm, int*))
NCCL(int, ncclCommGetAsyncError, (Comm, int*))
NCCL(int, ncclCommFinalize, (Comm))
NCCL(int, ncclCommDestroy, (Comm))
NCCL(int, ncclCommAbort, (Comm))
NCCL(int, ncclAllReduce, (const void*, void*, size_t, int, int, Comm, Stream))
NCCL(int, ncclReduceScatter, (const void*, void*, size_t, int, int, Comm, Stream))
NCCL(int, ncclAllGather, (const void*, void*, size_t, int, Comm, Stream))
NCCL(int, ncclBroadcast, (const void*, void*, size_t, int, int, Comm, Stream))
NCCL(int, ncclBcast, (void*, size_t, int, int, Comm, Stream))
NCCL(int, ncclReduce, (const void*, void*, size_t, int, int, int, Comm, Stream))
NCCL(int, ncclGroupStart, ())
NCCL(int, ncclGroupEnd, ())
NCCL(const char*, ncclGetErrorString, (int))
NCCL(const char*, ncclGetLastError, (Comm))
NCCL(size_t, fake_nccl_counters_json, (char*, size_t))
CUDA(int, cuInit, (unsigned))
CUDA(int, cuDevicePrimaryCtxRetain, (void**, int))
CUDA(int, cuCtxSetCurrent, (void*))
CUDA(int, cuStreamCreate, (Stream*, unsigned))
CUDA(int, cuStreamSynchronize, (Stream))
CUDA(int, cuMemAlloc_v2, (CUdeviceptr*, size_t))
CUDA(int, cuMemHostAlloc, (void**, size_t, unsigned))
CUDA(int, cuMemcpyHtoDAsync_v2, (CUdeviceptr, const void*, size_t, Stream))
CUDA(int, cuMemcpyDtoHAsync_v2, (void*, CUdeviceptr, size_t, Stream))
CUDA(int, cuStreamBeginCapture_v2, (Stream, int))
CUDA(int, cuStreamEndCapture, (Stream, void**))
CUDA(int, cuGraphInstantiateWithFlags, (void**, void*, unsigned long long))
CUDA(int, cuGraphLaunch, (void*, Stream))
CUDA(size_t, fake_cuda_counters_json, (char*, size_t))

// ---- checks inside a rank ------------------------------------------------------------------------
int g_rank = -1;
int g_failures;
void fail(int line, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("  rank %d: FAIL (selftest.cpp:%d): ", g_rank, line);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    g_failures++;
}
#define EXPECT(expr, want)                                                                          \
    do {                                                                                            \
        int r_ = (expr);                                                                            \
        if (r_ != (want)) fail(__LINE__, "%s returned %d, expected %d", #expr, r_, (int)(want));   \
    } while (0)
#define TRUE(cond, ...)                           \
    do {                                          \
        if (!(cond)) fail(__LINE__, __VA_ARGS__); \
    } while (0)

double now() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
void sleep_s(double s) {
    timespec ts{(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, nullptr);
}
std::string read_file(const std::string& path) {
    std::string s;
    if (FILE* f = fopen(path.c_str(), "rb")) {
        char buf[65536];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
        fclose(f);
    }
    return s;
}
bool exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}
// Where the fake keeps the segment of an id: /dev/shm/fake-nccl.<hex of bytes 16..31>.
std::string segment_path(const Id& id) {
    std::string s = "/dev/shm/fake-nccl.";
    char b[3];
    for (int i = 16; i < 32; i++) {
        snprintf(b, sizeof b, "%02x", (unsigned char)id.internal[i]);
        s += b;
    }
    return s;
}

// ---- the jobs: one process per rank ----------------------------------------------------------------
std::string g_tmp;  // scratch directory
int g_job;          // jobs started so far (a rank knows its job's number)
typedef void (*RankFn)(int rank, int nranks, const Id& id);
typedef std::vector<std::pair<std::string, std::string>> Env;
struct Rank {
    pid_t pid = 0;
    int status = -1;
    std::string out, err;
};
struct Job {
    int number = 0;
    std::vector<Rank> ranks;
    bool hung = false;
    double seconds = 0;
};

// A further id for the ranks of this job: rank 0 makes it, the others read it from a file.
Id shared_id(int rank, const char* tag) {
    const std::string path = g_tmp + "/job" + std::to_string(g_job) + "." + tag + ".id";
    Id id{};
    if (rank == 0) {
        EXPECT(ncclGetUniqueId(&id), OK);
        FILE* f = fopen((path + ".tmp").c_str(), "wb");
        fwrite(&id, sizeof id, 1, f);
        fclose(f);
        rename((path + ".tmp").c_str(), path.c_str());
        return id;
    }
    for (double t0 = now(); now() - t0 < 20; sleep_s(0.002)) {
        const std::string s = read_file(path);
        if (s.size() == sizeof id) {
            memcpy(&id, s.data(), sizeof id);
            return id;
        }
    }
    fail(__LINE__, "no id %s from rank 0", tag);
    exit(1);
}

// Runs fn in nranks processes. Rank 0 makes the id (or all use *fixed) and hands it over. The
// parent reaps the ranks in rank order only, so one that dies early stays a zombie meanwhile (the
// fake must still see it as dead). After limit_s every rank still running is killed.
Job run_job(int nranks, RankFn fn, const Env& env = {}, const Id* fixed = nullptr, double limit_s = 60) {
    Job job;
    job.number = ++g_job;
    const double t0 = now();
    std::vector<std::vector<int>> pipes(nranks);
    for (int r = 1; r < nranks; r++) {
        int p[2];
        if (pipe(p) != 0) abort();
        pipes[r] = {p[0], p[1]};
    }
    fflush(stdout);
    fflush(stderr);
    for (int r = 0; r < nranks; r++) {
        const pid_t pid = fork();
        if (pid == 0) {
            g_rank = r;
            const std::string base = g_tmp + "/job" + std::to_string(job.number) + ".rank" + std::to_string(r);
            const int out = open((base + ".out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            const int err = open((base + ".err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            dup2(out, 1);
            dup2(err, 2);
            close(out);
            close(err);
            setvbuf(stdout, nullptr, _IOLBF, 0);
            for (auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
            for (int q = 1; q < nranks; q++) {
                if (q != r) close(pipes[q][0]);
                if (r != 0) close(pipes[q][1]);
            }
            g_lib = dlopen(g_nccl_path, RTLD_LAZY | RTLD_LOCAL);
            if (!g_lib) {
                printf("  cannot load %s: %s\n", g_nccl_path, dlerror());
                exit(1);
            }
            Id id{};
            if (fixed) {
                id = *fixed;
            } else if (r == 0) {
                EXPECT(ncclGetUniqueId(&id), OK);
                for (int q = 1; q < nranks; q++)
                    if (write(pipes[q][1], &id, sizeof id) != (ssize_t)sizeof id) fail(__LINE__, "cannot hand the id over");
            } else {
                size_t got = 0;
                while (got < sizeof id) {
                    const ssize_t n = read(pipes[r][0], (char*)&id + got, sizeof id - got);
                    if (n <= 0) {
                        printf("  rank %d: no id from rank 0\n", r);
                        exit(1);
                    }
                    got += (size_t)n;
                }
            }
            fn(r, nranks, id);
            fflush(stdout);
            exit(g_failures ? 1 : 0);  // exit, not _exit: the counters are written at exit
        }
        job.ranks.push_back(Rank{pid});
    }
    for (int r = 1; r < nranks; r++) close(pipes[r][0]), close(pipes[r][1]);
    for (int r = 0; r < nranks; r++) {
        int status = 0;
        while (waitpid(job.ranks[r].pid, &status, WNOHANG) == 0) {
            if (now() - t0 > limit_s) {
                job.hung = true;
                for (int q = r; q < nranks; q++) kill(job.ranks[q].pid, SIGKILL);
            }
            sleep_s(0.002);
        }
        job.ranks[r].status = status;
    }
    job.seconds = now() - t0;
    for (int r = 0; r < nranks; r++) {
        const std::string base = g_tmp + "/job" + std::to_string(job.number) + ".rank" + std::to_string(r);
        job.ranks[r].out = read_file(base + ".out");
        job.ranks[r].err = read_file(base + ".err");
    }
    return job;
}

// ---- the parent's checks ------------------------------------------------------------------------
int g_problems;
void problem(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("  ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    g_problems++;
}
void show(const Job& j) {
    for (size_t r = 0; r < j.ranks.size(); r++) {
        printf("  --- rank %zu (pid %d, status %#x): stdout:\n%s  --- stderr:\n%s", r, (int)j.ranks[r].pid,
               j.ranks[r].status, j.ranks[r].out.c_str(), j.ranks[r].err.c_str());
    }
    printf("  ---\n");
}
// Every rank exited 0 (except those listed as killed), and nothing hung.
bool ended_well(const Job& j, std::vector<int> killed = {}) {
    const int before = g_problems;
    if (j.hung) problem("the job hung: killed after its time limit");
    for (size_t r = 0; r < j.ranks.size(); r++) {
        const int st = j.ranks[r].status;
        if (std::find(killed.begin(), killed.end(), (int)r) != killed.end()) {
            if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL) problem("rank %zu should have been killed (status %#x)", r, st);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            problem("rank %zu %s", r, WIFSIGNALED(st) ? ("died of signal " + std::to_string(WTERMSIG(st))).c_str() : "failed");
        }
    }
    return g_problems == before;
}
void stderr_has(const Job& j, int rank, const char* want) {
    if (j.ranks[rank].err.find(want) == std::string::npos) problem("rank %d's stderr lacks \"%s\"", rank, want);
}
void stderr_lacks(const Job& j, int rank, const char* what) {
    if (j.ranks[rank].err.find(what) != std::string::npos) problem("rank %d's stderr has \"%s\"", rank, what);
}
int count_lines(const std::string& s, const char* with) {
    int n = 0;
    for (size_t at = 0; (at = s.find(with, at)) != std::string::npos; at++) n++;
    return n;
}
// The "hash ..." line every rank prints must be the same.
void same_hash(const Job& j) {
    std::string first;
    for (size_t r = 0; r < j.ranks.size(); r++) {
        const size_t at = j.ranks[r].out.find("hash ");
        const std::string h = at == std::string::npos ? "" : j.ranks[r].out.substr(at, j.ranks[r].out.find('\n', at) - at);
        if (h.empty()) problem("rank %zu printed no hash", r);
        else if (r == 0) first = h;
        else if (h != first) problem("rank %zu's results differ from rank 0's (%s vs %s)", r, h.c_str(), first.c_str());
    }
}

// ---- data and the reference ---------------------------------------------------------------------
uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
// The reference's own conversions, written differently from the library's.
float ref_half_to_float(uint16_t h) {
    const int e = (h >> 10) & 31, m = h & 1023;
    const double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (float)((h & 0x8000) ? -v : v);
}
std::vector<double> g_half_values;  // value of every non-negative finite half, by bit pattern
uint16_t ref_float_to_half(float f) {
    if (g_half_values.empty())
        for (uint32_t h = 0; h < 0x7c00; h++) g_half_values.push_back(ref_half_to_float((uint16_t)h));
    const uint16_t sign = signbit(f) ? 0x8000 : 0;
    const double a = fabs((double)f);
    if (a >= 65520) return sign | 0x7c00;  // halfway to the next power of two, and beyond: inf
    // The last half not above a, and the next: the nearer wins, a tie goes to the even pattern.
    const size_t lo = (size_t)(std::upper_bound(g_half_values.begin(), g_half_values.end(), a) - g_half_values.begin()) - 1;
    if (lo + 1 >= g_half_values.size()) return sign | (uint16_t)lo;
    const double dlo = a - g_half_values[lo], dhi = g_half_values[lo + 1] - a;
    return sign | (uint16_t)(dlo < dhi || (dlo == dhi && lo % 2 == 0) ? lo : lo + 1);
}
float ref_bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
uint16_t ref_float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);  // toward zero, and away from it
    if ((double)ref_bf16_to_float(lo) == (double)f) return lo;  // exact (infinities too)
    const double dlo = fabs((double)f - ref_bf16_to_float(lo)), dhi = fabs((double)ref_bf16_to_float(hi) - f);
    return dlo < dhi || (dlo == dhi && lo % 2 == 0) ? lo : hi;
}

// Element i of rank r's input for test t: random bits for integers; for floats, values of a few
// magnitudes (near 1 for products), with signed zeros and infinities for max and min.
void gen(int type, int op, uint64_t t, int rank, size_t count, unsigned char* out) {
    for (size_t i = 0; i < count; i++) {
        const uint64_t h = mix(t * 1000003 + (uint64_t)rank * 7919 + i * 104729 + 17);
        const bool special = (op == MAX || op == MIN) && h % 23 == 0;
        const bool neg = (h >> 8) & 1;
        switch (type) {
            case INT8: case UINT8: out[i] = (unsigned char)(h >> 16); break;
            case INT32: case UINT32: { uint32_t v = (uint32_t)(h >> 16); memcpy(out + 4 * i, &v, 4); break; }
            case INT64: case UINT64: { uint64_t v = mix(h); memcpy(out + 8 * i, &v, 8); break; }
            case FLOAT32: case FLOAT64: {
                const int e = op == PROD ? -1 + (int)(h >> 20) % 2 : -8 + (int)((h >> 20) % 13);
                double v = ldexp(1.0 + (double)((h >> 24) & 0xffffffffffull) / 1099511627776.0, e);
                if (special) v = (h >> 12) % 3 == 0 ? INFINITY : 0.0;
                if (neg && op != PROD) v = -v;
                if (type == FLOAT32) { float f = (float)v; memcpy(out + 4 * i, &f, 4); }
                else memcpy(out + 8 * i, &v, 8);
                break;
            }
            case FLOAT16: {
                const uint16_t e = op == PROD ? 14 + (h >> 20) % 2 : 5 + (h >> 20) % 16;
                uint16_t v = (uint16_t)((e << 10) | ((h >> 30) & 1023));
                if (special) v = (h >> 12) % 3 == 0 ? 0x7c00 : 0;
                if (neg && op != PROD) v |= 0x8000;
                memcpy(out + 2 * i, &v, 2);
                break;
            }
            case BFLOAT16: {
                const uint16_t e = op == PROD ? 126 + (h >> 20) % 2 : 120 + (h >> 20) % 12;
                uint16_t v = (uint16_t)((e << 7) | ((h >> 30) & 127));
                if (special) v = (h >> 12) % 3 == 0 ? 0x7f80 : 0;
                if (neg && op != PROD) v |= 0x8000;
                memcpy(out + 2 * i, &v, 2);
                break;
            }
        }
    }
}

// The fold the README documents, element by element: rank 0's value, then rank 1's, ...
template <class T, class A>
A ref_combine(int op, A a, A b) {
    if (op == MAX) return b > a ? b : a;
    if (op == MIN) return b < a ? b : a;
    if constexpr (std::is_floating_point_v<A>) return op == PROD ? a * b : a + b;
    else {
        typedef std::make_unsigned_t<A> U;
        return op == PROD ? (A)(U)((U)a * (U)b) : (A)(U)((U)a + (U)b);
    }
}
template <class T, class A, A (*Load)(T), T (*Store)(A)>
void ref_typed(int op, int n, const unsigned char* const* in, size_t count, unsigned char* out) {
    for (size_t i = 0; i < count; i++) {
        T v;
        memcpy(&v, in[0] + i * sizeof(T), sizeof(T));
        A a = Load(v);
        for (int r = 1; r < n; r++) {
            memcpy(&v, in[r] + i * sizeof(T), sizeof(T));
            a = ref_combine<T, A>(op, a, Load(v));
        }
        if (op == AVG) a = (A)(a / (A)n);
        const T s = Store(a);
        memcpy(out + i * sizeof(T), &s, sizeof(T));
    }
}
template <class T>
T same(T x) { return x; }
void reference(int type, int op, int n, const unsigned char* const* in, size_t count, unsigned char* out) {
    switch (type) {
        case INT8: return ref_typed<int8_t, int8_t, same, same>(op, n, in, count, out);
        case UINT8: return ref_typed<uint8_t, uint8_t, same, same>(op, n, in, count, out);
        case INT32: return ref_typed<int32_t, int32_t, same, same>(op, n, in, count, out);
        case UINT32: return ref_typed<uint32_t, uint32_t, same, same>(op, n, in, count, out);
        case INT64: return ref_typed<int64_t, int64_t, same, same>(op, n, in, count, out);
        case UINT64: return ref_typed<uint64_t, uint64_t, same, same>(op, n, in, count, out);
        case FLOAT32: return ref_typed<float, float, same, same>(op, n, in, count, out);
        case FLOAT64: return ref_typed<double, double, same, same>(op, n, in, count, out);
        case FLOAT16: return ref_typed<uint16_t, float, ref_half_to_float, ref_float_to_half>(op, n, in, count, out);
        case BFLOAT16: return ref_typed<uint16_t, float, ref_bf16_to_float, ref_float_to_bf16>(op, n, in, count, out);
    }
}

void fnv(uint64_t* h, const void* p, size_t n) {
    for (size_t i = 0; i < n; i++) *h = (*h ^ ((const unsigned char*)p)[i]) * 0x100000001b3ull;
}

// One collective on host memory (no CUDA driver loaded: it runs at once), checked against the
// reference. Results every rank shares go into *hash.
struct Test {
    Kind kind;
    int type, op, root;
    size_t count;
    bool in_place;
    uint64_t seed;
};
std::string describe(const Test& t) {
    char b[160];
    snprintf(b, sizeof b, "%s(%zu %s%s%s, root %d, %s)", kKindNames[t.kind], t.count, kTypeNames[t.type],
             t.kind == ALL_REDUCE || t.kind == REDUCE || t.kind == REDUCE_SCATTER ? ", " : "",
             t.kind == ALL_REDUCE || t.kind == REDUCE || t.kind == REDUCE_SCATTER ? kOpNames[t.op] : "", t.root,
             t.in_place ? "in place" : "out of place");
    return b;
}
int run_test(Comm comm, int rank, int n, const Test& t, uint64_t* hash, void* stream = nullptr) {
    const size_t es = type_size(t.type), count = t.count;
    const size_t in_elems = t.kind == REDUCE_SCATTER ? count * n : count;
    const size_t out_elems = t.kind == ALL_GATHER ? count * n : count;
    std::vector<std::vector<unsigned char>> inputs(n, std::vector<unsigned char>(in_elems * es));
    for (int j = 0; j < n; j++) gen(t.type, t.op, t.seed, j, in_elems, inputs[j].data());
    std::vector<const unsigned char*> in(n);
    std::vector<unsigned char> want(out_elems * es);
    bool writes = true;
    switch (t.kind) {
        case ALL_REDUCE:
        case REDUCE:
            for (int j = 0; j < n; j++) in[j] = inputs[j].data();
            reference(t.type, t.op, n, in.data(), count, want.data());
            writes = t.kind == ALL_REDUCE || rank == t.root;
            break;
        case REDUCE_SCATTER:
            for (int j = 0; j < n; j++) in[j] = inputs[j].data() + rank * count * es;
            reference(t.type, t.op, n, in.data(), count, want.data());
            break;
        case BROADCAST: want = inputs[t.root]; break;
        case ALL_GATHER:
            for (int j = 0; j < n; j++) memcpy(want.data() + j * count * es, inputs[j].data(), count * es);
            break;
    }
    // Buffers: out of place, a separate output filled with 0xAB; in place as NCCL defines it.
    std::vector<unsigned char> a, b;
    const unsigned char* send;
    unsigned char* recv;
    if (!t.in_place) {
        a = inputs[rank];
        b.assign(out_elems * es, 0xab);
        send = a.data(), recv = b.data();
    } else if (t.kind == ALL_GATHER) {
        a.assign(out_elems * es, 0xab);
        memcpy(a.data() + rank * count * es, inputs[rank].data(), count * es);
        recv = a.data(), send = recv + rank * count * es;
    } else if (t.kind == REDUCE_SCATTER) {
        a = inputs[rank];
        send = a.data(), recv = a.data() + rank * count * es;
    } else {
        a = inputs[rank];
        send = recv = a.data();
    }
    const std::vector<unsigned char> before(recv, recv + out_elems * es);
    int r = -1;
    switch (t.kind) {
        case ALL_REDUCE: r = ncclAllReduce(send, recv, count, t.type, t.op, comm, stream); break;
        case REDUCE:
            r = ncclReduce(send, rank == t.root || t.in_place ? recv : nullptr, count, t.type, t.op, t.root, comm, stream);
            break;
        case REDUCE_SCATTER: r = ncclReduceScatter(send, recv, count, t.type, t.op, comm, stream); break;
        case BROADCAST:
            r = t.in_place ? ncclBcast(recv, count, t.type, t.root, comm, stream)
                           : ncclBroadcast(rank == t.root ? send : nullptr, recv, count, t.type, t.root, comm, stream);
            break;
        case ALL_GATHER: r = ncclAllGather(send, recv, count, t.type, comm, stream); break;
    }
    if (r != OK) {
        fail(__LINE__, "%s returned %d", describe(t).c_str(), r);
        return 1;
    }
    const unsigned char* expect = writes ? want.data() : before.data();
    for (size_t i = 0; i < out_elems; i++)
        if (memcmp(recv + i * es, expect + i * es, es) != 0) {
            uint64_t got = 0, w = 0;
            memcpy(&got, recv + i * es, es);
            memcpy(&w, expect + i * es, es);
            fail(__LINE__, "%s: element %zu is %#llx, expected %#llx%s", describe(t).c_str(), i, (unsigned long long)got,
                 (unsigned long long)w, writes ? "" : " (untouched)");
            return 1;
        }
    if (hash && (t.kind == ALL_REDUCE || t.kind == BROADCAST || t.kind == ALL_GATHER)) fnv(hash, recv, out_elems * es);
    return 0;
}

Comm open_comm(int rank, int n, const Id& id) {
    Comm c = nullptr;
    EXPECT(ncclCommInitRank(&c, n, id, rank), OK);
    if (!c) {
        printf("  rank %d: no communicator\n", rank);
        exit(1);
    }
    return c;
}

// ---- the ranks of the cases ----------------------------------------------------------------------
// Every collective, type, op, in place and out of place.
void rank_everything(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    int count = -1, me = -1, dev = -1;
    EXPECT(ncclCommCount(c, &count), OK);
    EXPECT(ncclCommUserRank(c, &me), OK);
    EXPECT(ncclCommCuDevice(c, &dev), OK);
    TRUE(count == n && me == rank && dev == 0, "count %d, rank %d, device %d", count, me, dev);
    uint64_t hash = 0xcbf29ce484222325ull, seed = 0;
    int ran = 0, wrong = 0;
    for (Kind kind : {ALL_REDUCE, REDUCE, BROADCAST, ALL_GATHER, REDUCE_SCATTER})
        for (int type : kTypes)
            for (int op = 0; op < 5; op++) {
                if ((kind == BROADCAST || kind == ALL_GATHER) && op > 0) continue;
                for (bool in_place : {false, true}) {
                    seed++;
                    const Test t{kind, type, op, (int)(mix(seed * 31) % n), 1 + (size_t)(mix(seed) % 257), in_place, seed};
                    wrong += run_test(c, rank, n, t, &hash);
                    ran++;
                }
            }
    // An empty collective is a no-op that still keeps the ranks in step.
    EXPECT(ncclAllReduce(nullptr, nullptr, (size_t)0, FLOAT32, SUM, c, nullptr), OK);
    wrong += run_test(c, rank, n, Test{ALL_REDUCE, FLOAT32, SUM, 0, 5, false, 9999}, &hash);
    EXPECT(ncclCommDestroy(c), OK);
    printf("hash %016llx (%d collectives, %d wrong)\n", (unsigned long long)hash, ran + 1, wrong);
}

// Buffers many times the staging area (FAKE_NCCL_STAGING_MB=0.0625: 2 x 32 KiB per rank).
void rank_large(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    uint64_t hash = 0xcbf29ce484222325ull;
    const Test tests[] = {
        {ALL_REDUCE, FLOAT32, SUM, 0, 1000003, false, 1}, {ALL_REDUCE, BFLOAT16, SUM, 0, 700001, true, 2},
        {ALL_REDUCE, FLOAT64, AVG, 0, 300007, false, 3},  {REDUCE_SCATTER, FLOAT32, SUM, 0, 250003, false, 4},
        {REDUCE_SCATTER, BFLOAT16, MAX, 0, 100003, true, 5}, {ALL_GATHER, FLOAT32, SUM, 0, 200003, false, 6},
        {ALL_GATHER, UINT8, SUM, 0, 100001, true, 7},     {BROADCAST, FLOAT32, SUM, n - 1, 500009, false, 8},
        {REDUCE, FLOAT16, PROD, 0, 123457, false, 9},     {ALL_REDUCE, INT64, SUM, 0, 4099, false, 10},
    };
    for (const Test& t : tests) run_test(c, rank, n, t, &hash);
    EXPECT(ncclCommDestroy(c), OK);
    printf("hash %016llx\n", (unsigned long long)hash);
}

// A big all-reduce with the default staging area, timed.
void rank_big(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    const size_t count = 16u << 20;  // 64 MiB of float32
    std::vector<float> buf(count, (float)(rank + 1));
    for (size_t i = 0; i < count; i += 4099) buf[i] = (float)i * 0.5f + rank;
    const double t0 = now();
    EXPECT(ncclAllReduce(buf.data(), buf.data(), count, FLOAT32, SUM, c, nullptr), OK);
    const double seconds = now() - t0;
    const float sum_ranks = (float)(n * (n + 1) / 2);
    size_t bad = 0;
    for (size_t i = 0; i < count; i++) {
        float want = i % 4099 ? sum_ranks : 0;
        if (i % 4099 == 0)
            for (int j = 0; j < n; j++) want = j ? want + ((float)i * 0.5f + j) : (float)i * 0.5f;
        bad += buf[i] != want;
    }
    TRUE(bad == 0, "%zu of %zu elements wrong", bad, count);
    uint64_t hash = 0xcbf29ce484222325ull;
    fnv(&hash, buf.data(), 4 * count);
    EXPECT(ncclCommDestroy(c), OK);
    printf("hash %016llx\nseconds %.3f\n", (unsigned long long)hash, seconds);
}

// Groups: queued until the outermost ncclGroupEnd; a refused call fails the group, which issues nothing.
void rank_groups(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    const size_t N = 1000;
    std::vector<float> a(N), ar(N, -1), g(N * n, -1), rs(N * n), rsr(N, -1), d(N);
    for (size_t i = 0; i < N; i++) a[i] = (float)(rank * 1000 + i), d[i] = (float)rank;
    for (size_t i = 0; i < N * n; i++) rs[i] = (float)(i % 7 + rank);
    EXPECT(ncclGroupStart(), OK);
    EXPECT(ncclAllReduce(a.data(), ar.data(), N, FLOAT32, SUM, c, nullptr), OK);
    EXPECT(ncclAllGather(a.data(), g.data(), N, FLOAT32, c, nullptr), OK);
    EXPECT(ncclGroupStart(), OK);  // nested
    EXPECT(ncclReduceScatter(rs.data(), rsr.data(), N, FLOAT32, MAX, c, nullptr), OK);
    EXPECT(ncclBcast(d.data(), N, FLOAT32, n - 1, c, nullptr), OK);
    EXPECT(ncclGroupEnd(), OK);
    TRUE(ar[0] == -1 && g[0] == -1 && rsr[0] == -1 && d[0] == (float)rank, "a collective ran before the outermost ncclGroupEnd");
    EXPECT(ncclGroupEnd(), OK);
    int bad = 0;
    for (size_t i = 0; i < N; i++) {
        float sum = 0;
        for (int j = 0; j < n; j++) sum = j ? sum + (float)(j * 1000 + i) : (float)i;
        float mx = -1e30f;
        for (int j = 0; j < n; j++) mx = std::max(mx, (float)((rank * N + i) % 7 + j));
        bad += ar[i] != sum || rsr[i] != mx || d[i] != (float)(n - 1);
        for (int j = 0; j < n; j++) bad += g[j * N + i] != (float)(j * 1000 + i);
    }
    TRUE(bad == 0, "%d results of the group wrong", bad);
    // A refused call inside a group: it returns its code, ncclGroupEnd returns it too, nothing runs.
    std::vector<float> x(N, 1), y(N, -1);
    EXPECT(ncclGroupStart(), OK);
    EXPECT(ncclAllReduce(x.data(), y.data(), N, FLOAT32, SUM, c, nullptr), OK);
    EXPECT(ncclAllReduce(x.data(), y.data(), N, 99, SUM, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclGroupEnd(), INVALID_ARGUMENT);
    TRUE(y[0] == -1, "a collective of a failed group ran");
    EXPECT(ncclGroupEnd(), INVALID_USAGE);  // none open
    // The communicator still works, in step on every rank.
    EXPECT(ncclAllReduce(x.data(), y.data(), N, FLOAT32, SUM, c, nullptr), OK);
    TRUE(y[N - 1] == (float)n, "after the failed group: %g, expected %d", y[N - 1], n);
    uint64_t hash = 0xcbf29ce484222325ull;
    fnv(&hash, ar.data(), 4 * N);
    fnv(&hash, g.data(), 4 * N * n);
    EXPECT(ncclCommDestroy(c), OK);
    printf("hash %016llx\n", (unsigned long long)hash);
}

// The last rank is killed while the ranks loop on a long all-reduce (many small steps): the others
// report it quickly, not after the timeout.
std::string death_file() { return g_tmp + "/job" + std::to_string(g_job) + ".death"; }
void* killer(void*) {
    sleep_s(0.4);
    FILE* f = fopen(death_file().c_str(), "w");
    fprintf(f, "%.6f\n", now());
    fclose(f);
    kill(getpid(), SIGKILL);
    return nullptr;
}
void rank_killed(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    const size_t count = 4u << 20;
    std::vector<float> buf(count, 1.0f), out(count, -1.0f);
    if (rank == n - 1) {
        pthread_t t;
        pthread_create(&t, nullptr, killer, nullptr);
    }
    int r = OK, rounds = 0;
    while (r == OK && rounds < 100000) {
        r = ncclAllReduce(buf.data(), out.data(), count, FLOAT32, SUM, c, nullptr);
        rounds++;
    }
    const double detected = now();
    const double died = strtod(read_file(death_file()).c_str(), nullptr);
    EXPECT(r, REMOTE_ERROR);
    TRUE(died > 0 && detected - died < 3, "the death was noticed %.2f s after it", detected - died);
    int async = -1;
    EXPECT(ncclCommGetAsyncError(c, &async), OK);
    EXPECT(async, REMOTE_ERROR);
    const double t0 = now();
    EXPECT(ncclAllReduce(buf.data(), out.data(), (size_t)10, FLOAT32, SUM, c, nullptr), REMOTE_ERROR);
    TRUE(now() - t0 < 0.5, "a call after the error took %.2f s", now() - t0);
    EXPECT(ncclCommDestroy(c), OK);
    printf("noticed after %.3f s, %d rounds\n", detected - died, rounds);
}

// FAKE_NCCL_TIMEOUT_S=1: rank 1 comes 2.5 s late. Also an init nobody else joins.
void rank_timeout(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    std::vector<float> x(100, 1), y(100, -1);
    if (rank == 0) {
        double t0 = now();
        EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)100, FLOAT32, SUM, c, nullptr), SYSTEM_ERROR);
        const double waited = now() - t0;
        TRUE(waited > 0.9 && waited < 3, "the timeout came after %.2f s", waited);
        TRUE(y[0] == -1 && y[99] == -1, "the output changed although the collective failed");
        int async = -1;
        EXPECT(ncclCommGetAsyncError(c, &async), OK);
        EXPECT(async, SYSTEM_ERROR);
        t0 = now();
        EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)100, FLOAT32, SUM, c, nullptr), SYSTEM_ERROR);
        TRUE(now() - t0 < 0.5, "a call after the timeout took %.2f s", now() - t0);
        // An init the other ranks never join: it fails after the timeout and leaves no segment.
        Id lonely{};
        EXPECT(ncclGetUniqueId(&lonely), OK);
        Comm l = (Comm)1;
        t0 = now();
        EXPECT(ncclCommInitRank(&l, 2, lonely, 0), SYSTEM_ERROR);
        TRUE(now() - t0 > 0.9 && now() - t0 < 3, "the init timed out after %.2f s", now() - t0);
        TRUE(l == nullptr, "a communicator came back from a failed init");
        TRUE(!exists(segment_path(lonely)), "%s is left behind", segment_path(lonely).c_str());
        sleep_s(2.5);  // until rank 1 is done with the communicator
    } else {
        sleep_s(2.5);
        // Rank 0 gave up at this collective: a late rank may still complete it (rank 0's part was
        // posted), but not the next one.
        const double t0 = now();
        int r = ncclAllReduce(x.data(), y.data(), (size_t)100, FLOAT32, SUM, c, nullptr);
        TRUE(r == OK || r == REMOTE_ERROR, "the late call returned %d", r);
        if (r == OK) r = ncclAllReduce(x.data(), y.data(), (size_t)100, FLOAT32, SUM, c, nullptr);
        EXPECT(r, REMOTE_ERROR);
        TRUE(now() - t0 < 1, "the late rank waited %.2f s", now() - t0);
    }
    EXPECT(ncclCommDestroy(c), OK);
}

// Calls that differ between the ranks, one communicator each (an error ends a communicator).
void rank_mismatch(int rank, int n, const Id& id) {
    std::vector<float> x(24, 1), y(48, -1);
    Comm c = open_comm(rank, n, id);
    EXPECT(rank == 0 ? ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr)
                     : ncclAllGather(x.data(), y.data(), (size_t)10, FLOAT32, c, nullptr),
           INVALID_USAGE);
    TRUE(y[0] == -1, "the output of a mismatched call changed");
    int async = -1;
    EXPECT(ncclCommGetAsyncError(c, &async), OK);
    EXPECT(async, INVALID_USAGE);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr), INVALID_USAGE);
    EXPECT(ncclCommDestroy(c), OK);
    // Counts differ.
    c = open_comm(rank, n, shared_id(rank, "count"));
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)(rank ? 12 : 10), FLOAT32, SUM, c, nullptr), INVALID_USAGE);
    EXPECT(ncclCommDestroy(c), OK);
    // Types and ops differ, after a collective that matched.
    c = open_comm(rank, n, shared_id(rank, "op"));
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr), OK);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, rank ? MAX : SUM, c, nullptr), INVALID_USAGE);
    EXPECT(ncclCommDestroy(c), OK);
    // Rank 1 destroys its communicator instead of making the call.
    c = open_comm(rank, n, shared_id(rank, "destroy"));
    if (rank == 0) EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr), INVALID_USAGE);
    EXPECT(ncclCommDestroy(c), OK);
    // nranks differ, and a rank already taken.
    const Id id5 = shared_id(rank, "nranks");
    if (rank == 0) {
        c = open_comm(0, n, id5);
    } else {
        while (!exists(segment_path(id5))) sleep_s(0.002);
        sleep_s(0.05);
        Comm bad = nullptr;
        EXPECT(ncclCommInitRank(&bad, 3, id5, 1), INVALID_USAGE);
        EXPECT(ncclCommInitRank(&bad, 2, id5, 0), INVALID_USAGE);
        c = open_comm(1, n, id5);
    }
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr), OK);
    TRUE(y[9] == (float)n, "after the refused inits: %g", y[9]);
    EXPECT(ncclCommDestroy(c), OK);
}

// ncclCommAbort: by a peer (the waiting rank fails at once), and from another thread of this
// process (the waiting call returns; nothing is printed for it).
Comm g_abort_comm;
int g_abort_result = -1;
double g_abort_returned;
void* wait_in_allreduce(void*) {
    std::vector<float> x(10, 1), y(10, -1);
    g_abort_result = ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, g_abort_comm, nullptr);
    g_abort_returned = now();
    return nullptr;
}
void rank_abort(int rank, int n, const Id& id) {
    std::vector<float> x(10, 1), y(10, -1);
    Comm c = open_comm(rank, n, id);
    if (rank == 1) {
        sleep_s(0.2);
        EXPECT(ncclCommAbort(c), OK);
        EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr), INVALID_USAGE);
        EXPECT(ncclCommDestroy(c), INVALID_USAGE);
    } else {
        const double t0 = now();
        EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, c, nullptr), REMOTE_ERROR);
        TRUE(now() - t0 < 1, "the peer's abort was noticed after %.2f s", now() - t0);
        EXPECT(ncclCommAbort(c), OK);
    }
    // Rank 0 aborts from another thread while a call waits for rank 1, which comes late.
    g_abort_comm = open_comm(rank, n, shared_id(rank, "thread"));
    if (rank == 0) {
        pthread_t t;
        pthread_create(&t, nullptr, wait_in_allreduce, nullptr);
        sleep_s(0.3);
        const double t0 = now();
        EXPECT(ncclCommAbort(g_abort_comm), OK);
        pthread_join(t, nullptr);
        EXPECT(g_abort_result, SYSTEM_ERROR);
        TRUE(g_abort_returned - t0 < 1, "the waiting call returned %.2f s after the abort", g_abort_returned - t0);
    } else {
        // Rank 0 posted its part before it aborted: the late call may complete, the next cannot.
        sleep_s(0.8);
        int r = ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, g_abort_comm, nullptr);
        TRUE(r == OK || r == REMOTE_ERROR, "the late call returned %d", r);
        if (r == OK) r = ncclAllReduce(x.data(), y.data(), (size_t)10, FLOAT32, SUM, g_abort_comm, nullptr);
        EXPECT(r, REMOTE_ERROR);
        EXPECT(ncclCommDestroy(g_abort_comm), OK);
    }
}

// Refusals, each with NCCL's code and one line on stderr.
void rank_refusals(int rank, int n, const Id& id) {
    int v = 0;
    EXPECT(ncclGetVersion(&v), OK);
    TRUE(v == 23000, "version %d", v);
    EXPECT(ncclGetVersion((int*)nullptr), INVALID_ARGUMENT);
    Comm c = nullptr;
    EXPECT(ncclCommInitRank((Comm*)nullptr, 1, id, 0), INVALID_ARGUMENT);
    EXPECT(ncclCommInitRank(&c, 0, id, 0), INVALID_ARGUMENT);
    EXPECT(ncclCommInitRank(&c, 1, id, 1), INVALID_ARGUMENT);
    EXPECT(ncclCommInitRank(&c, 1, id, -1), INVALID_ARGUMENT);
    Id junk{};
    EXPECT(ncclCommInitRank(&c, 1, junk, 0), INVALID_ARGUMENT);
    EXPECT(ncclCommInitRankConfig(&c, 1, id, 0, (void*)nullptr), OK);
    std::vector<float> x(8, 2), y(8, -1);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, FLOAT32, SUM, (Comm)nullptr, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, 99, SUM, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, FP8E4M3, SUM, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, FLOAT32, 7, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclAllReduce(x.data(), y.data(), SIZE_MAX / 2, FLOAT32, SUM, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclAllReduce((const void*)nullptr, y.data(), (size_t)8, FLOAT32, SUM, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclBroadcast(x.data(), y.data(), (size_t)8, FLOAT32, 1, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclReduce(x.data(), y.data(), (size_t)8, FLOAT32, SUM, -1, c, nullptr), INVALID_ARGUMENT);
    EXPECT(ncclCommCount(c, (int*)nullptr), INVALID_ARGUMENT);
    EXPECT(ncclCommGetAsyncError(c, (int*)nullptr), INVALID_ARGUMENT);
    EXPECT(ncclCommCount((Comm)x.data(), &v), INVALID_ARGUMENT);
    // None of that broke the communicator: one rank works.
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, FLOAT32, SUM, c, nullptr), OK);
    TRUE(y[7] == 2, "one rank's sum is %g", y[7]);
    EXPECT(ncclGroupEnd(), INVALID_USAGE);
    EXPECT(ncclCommFinalize(c), OK);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, FLOAT32, SUM, c, nullptr), INVALID_USAGE);
    EXPECT(ncclCommDestroy(c), OK);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)8, FLOAT32, SUM, c, nullptr), INVALID_USAGE);
    EXPECT(ncclCommDestroy(c), INVALID_USAGE);
    EXPECT(ncclCommDestroy((Comm)nullptr), OK);
    EXPECT(ncclCommAbort((Comm)nullptr), OK);
    TRUE(strstr(ncclGetLastError((Comm)nullptr), "was destroyed or aborted"), "ncclGetLastError: %s",
         ncclGetLastError((Comm)nullptr));
    const char* want[] = {"no error", "unhandled cuda error", "unhandled system error", "internal error", "invalid argument",
                          "invalid usage", "remote process exited", "NCCL operation in progress", "unknown result code"};
    for (int r = 0; r < 9; r++)
        TRUE(strstr(ncclGetErrorString(r), want[r]), "ncclGetErrorString(%d) = %s", r, ncclGetErrorString(r));
}

// FAKE_NCCL_COUNTERS and FAKE_NCCL_LOG.
void rank_counters(int rank, int n, const Id& id) {
    Comm c = open_comm(rank, n, id);
    std::vector<float> x(1000, 1), y(1000);
    std::vector<uint16_t> b(10, 0x3f80), g(10 * n);
    EXPECT(ncclAllReduce(x.data(), y.data(), (size_t)1000, FLOAT32, SUM, c, nullptr), OK);
    EXPECT(ncclAllReduce(y.data(), y.data(), (size_t)1000, FLOAT32, SUM, c, nullptr), OK);
    EXPECT(ncclAllGather(b.data(), g.data(), (size_t)10, BFLOAT16, c, nullptr), OK);
    TRUE(y[0] == (float)(n * n) && g[10 * n - 1] == 0x3f80, "wrong results %g %#x", y[0], g[10 * n - 1]);
    EXPECT(ncclCommDestroy(c), OK);
}

// A fake-CUDA process: collectives on device memory, in stream order, captured into a graph and
// replayed; then a peer dies between replays.
struct Device {
    Stream s = nullptr;
    void open() {
        g_cuda = dlopen(g_cuda_path, RTLD_LAZY | RTLD_LOCAL);
        if (!g_cuda) {
            printf("  cannot load %s: %s\n", g_cuda_path, dlerror());
            exit(1);
        }
        void* ctx = nullptr;
        EXPECT(cuInit(0u), 0);
        EXPECT(cuDevicePrimaryCtxRetain(&ctx, 0), 0);
        EXPECT(cuCtxSetCurrent(ctx), 0);
        EXPECT(cuStreamCreate(&s, 1u), 0);
    }
    CUdeviceptr alloc(size_t bytes) {
        CUdeviceptr p = 0;
        EXPECT(cuMemAlloc_v2(&p, bytes), 0);
        return p;
    }
    template <class T>
    T* pinned(size_t n) {
        void* p = nullptr;
        EXPECT(cuMemHostAlloc(&p, n * sizeof(T), 0u), 0);
        return (T*)p;
    }
};
bool json_has(const char* json, const char* want) {
    if (strstr(json, want)) return true;
    printf("  rank %d: the counters lack %s:\n  %s\n", g_rank, want, json);
    return false;
}
void rank_graph(int rank, int n, const Id& id) {
    Device dev;
    dev.open();
    Comm c = open_comm(rank, n, id);  // after the driver is loaded, as cudarc does it
    const size_t N = 1000;
    const CUdeviceptr a = dev.alloc(4 * N), b = dev.alloc(4 * N), gth = dev.alloc(4 * N * n);
    float* in = dev.pinned<float>(N);
    float* out_b = dev.pinned<float>(N);
    float* out_g = dev.pinned<float>(N * n);
    auto value = [&](int r, int round, size_t i) { return (float)((i * 37 + r * 11 + round * 5) % 101) * 0.37f - 3.0f; };
    auto fill = [&](int round) {
        for (size_t i = 0; i < N; i++) in[i] = value(rank, round, i);
    };
    // What the step below computes for a round: the all-reduce, and the all-gather of the inputs
    // followed by an in-place reduce-scatter (sum) of that, which adds rank r's part n times.
    auto wrong = [&](int round, bool gathered) {
        int bad = 0;
        for (size_t i = 0; i < N; i++) {
            float sum = value(0, round, i);
            for (int j = 1; j < n; j++) sum += value(j, round, i);
            bad += out_b[i] != sum;
            if (!gathered) continue;
            for (int j = 0; j < n; j++) {
                float want = value(j, round, i);
                if (j == rank)
                    for (int k = 1; k < n; k++) want += value(j, round, i);
                bad += out_g[j * N + i] != want;
            }
        }
        return bad;
    };
    // 1. Outside a capture: the collective runs in stream order, before its call returns.
    fill(100);
    EXPECT(cuMemcpyHtoDAsync_v2(a, in, 4 * N, dev.s), 0);
    EXPECT(ncclAllReduce((void*)a, (void*)b, N, FLOAT32, SUM, c, dev.s), OK);
    EXPECT(cuMemcpyDtoHAsync_v2(out_b, b, 4 * N, dev.s), 0);
    EXPECT(cuStreamSynchronize(dev.s), 0);
    TRUE(wrong(100, false) == 0, "the collective outside a capture is wrong");
    // 2. Captured: nothing runs; every replay runs the step, collectives included, in order.
    void *graph = nullptr, *exec = nullptr;
    for (size_t i = 0; i < N * n; i++) out_g[i] = -1;
    EXPECT(cuStreamBeginCapture_v2(dev.s, 0), 0);
    EXPECT(cuMemcpyHtoDAsync_v2(a, in, 4 * N, dev.s), 0);
    EXPECT(ncclAllReduce((void*)a, (void*)b, N, FLOAT32, SUM, c, dev.s), OK);
    EXPECT(ncclGroupStart(), OK);
    EXPECT(ncclAllGather((void*)a, (void*)gth, N, FLOAT32, c, dev.s), OK);
    EXPECT(ncclReduceScatter((void*)gth, (void*)(gth + 4 * N * rank), N, FLOAT32, SUM, c, dev.s), OK);
    EXPECT(ncclGroupEnd(), OK);
    EXPECT(cuMemcpyDtoHAsync_v2(out_b, b, 4 * N, dev.s), 0);
    EXPECT(cuMemcpyDtoHAsync_v2(out_g, gth, 4 * N * n, dev.s), 0);
    EXPECT(cuStreamEndCapture(dev.s, &graph), 0);
    EXPECT(cuGraphInstantiateWithFlags(&exec, graph, 0ull), 0);
    TRUE(wrong(100, false) == 0 && out_g[0] == -1, "something ran during the capture");
    for (int round = 0; round < 3; round++) {
        fill(round);
        EXPECT(cuGraphLaunch(exec, dev.s), 0);
        EXPECT(cuStreamSynchronize(dev.s), 0);
        const int bad = wrong(round, true);
        TRUE(bad == 0, "replay %d: %d results wrong", round, bad);
        // A collective issued between replays stays in step with them.
        EXPECT(ncclBroadcast((void*)b, (void*)b, N, FLOAT32, round % n, c, dev.s), OK);
    }
    char json[8192];
    fake_cuda_counters_json(json, sizeof json);
    TRUE(json_has(json, "\"host_functions\": {\"run\": 13, \"replayed\": 9, "), "fake-cuda counters");
    fake_nccl_counters_json(json, sizeof json);
    TRUE(json_has(json, "\"steps\": 13, \"captured\": 3, \"replayed\": 9, ") &&
             json_has(json, "\"ncclAllReduce\": {\"count\": 4, \"bytes\": 16000, \"recv_bytes\": 16000, "),
         "fake-nccl counters");
    // 3. The last rank leaves (its process ends); the others' next replay fails inside a host
    // function: cuGraphLaunch succeeds, the error is the communicator's async error.
    if (rank == n - 1) return;
    fill(7);
    EXPECT(cuGraphLaunch(exec, dev.s), 0);
    EXPECT(cuStreamSynchronize(dev.s), 0);
    int async = -1;
    EXPECT(ncclCommGetAsyncError(c, &async), OK);
    EXPECT(async, REMOTE_ERROR);
    TRUE(wrong(2, false) == 0, "the failed all-reduce changed its output");  // the broadcast after round 2 kept it
    EXPECT(ncclAllReduce((void*)a, (void*)b, N, FLOAT32, SUM, c, dev.s), REMOTE_ERROR);
    // 4. A replay after the communicator is gone does nothing, and says so.
    EXPECT(ncclCommDestroy(c), OK);
    EXPECT(cuGraphLaunch(exec, dev.s), 0);
    EXPECT(cuStreamSynchronize(dev.s), 0);
}

// ---- leftovers of killed jobs -----------------------------------------------------------------------
std::string g_stale_id_file;
void* kill_soon(void*) {
    sleep_s(0.3);
    kill(getpid(), SIGKILL);
    return nullptr;
}
// Rank 0 of a two-rank communicator whose rank 1 never comes, killed while it waits.
void rank_killed_in_init(int rank, int n, const Id& id) {
    FILE* f = fopen(g_stale_id_file.c_str(), "wb");
    fwrite(&id, sizeof id, 1, f);
    fclose(f);
    pthread_t t;
    pthread_create(&t, nullptr, kill_soon, nullptr);
    Comm c = nullptr;
    ncclCommInitRank(&c, 2, id, 0);
    printf("  the init returned before the kill\n");
}
void rank_reuse(int rank, int n, const Id& id) {
    if (rank == 1) {
        sleep_s(0.2);
        Id other{};
        EXPECT(ncclGetUniqueId(&other), OK);  // sweeps leftovers, and must leave rank 0's segment alone
    }
    Comm c = open_comm(rank, n, id);
    std::vector<float> x(10, 1);
    EXPECT(ncclAllReduce(x.data(), x.data(), (size_t)10, FLOAT32, SUM, c, nullptr), OK);
    TRUE(x[9] == (float)n, "sum %g", x[9]);
    EXPECT(ncclCommDestroy(c), OK);
}
void rank_make_id(int, int, const Id&) {}  // run_job's rank 0 calls ncclGetUniqueId, which sweeps

// ---- the cases ---------------------------------------------------------------------------------------
void case_everything(int n) {
    const int before = g_problems;
    const Job j = run_job(n, rank_everything);
    ended_well(j);
    same_hash(j);
    if (g_problems != before) show(j);
}
void case_everything_1() { case_everything(1); }
void case_everything_2() { case_everything(2); }
void case_everything_3() { case_everything(3); }
void case_everything_4() { case_everything(4); }

void case_large() {
    for (int n : {2, 4}) {
        const int before = g_problems;
        const Job j = run_job(n, rank_large, {{"FAKE_NCCL_STAGING_MB", "0.0625"}});
        ended_well(j);
        same_hash(j);
        if (g_problems != before) show(j);
    }
}
void case_big() {
    const int before = g_problems;
    const Job j = run_job(3, rank_big);
    ended_well(j);
    same_hash(j);
    if (g_problems != before) show(j);
    const size_t at = j.ranks[0].out.find("seconds ");
    if (at != std::string::npos) printf("  64 MiB all-reduce on 3 ranks: %.2f s (default staging)\n", strtod(j.ranks[0].out.c_str() + at + 8, nullptr));
}
void case_groups() {
    const int before = g_problems;
    const Job j = run_job(3, rank_groups);
    ended_well(j);
    same_hash(j);
    for (int r = 0; r < 3; r++) {
        stderr_has(j, r, "ncclAllReduce: rank ");
        stderr_has(j, r, "invalid datatype 99 (ncclInvalidArgument)");
        stderr_has(j, r, "ncclGroupEnd: ncclGroupEnd without ncclGroupStart (ncclInvalidUsage)");
    }
    if (g_problems != before) show(j);
}
void case_killed() {
    const int before = g_problems;
    const Job j = run_job(3, rank_killed, {{"FAKE_NCCL_STAGING_MB", "0.0625"}, {"FAKE_NCCL_TIMEOUT_S", "60"}});
    ended_well(j, {2});
    for (int r = 0; r < 2; r++) {
        stderr_has(j, r, "ncclAllReduce: rank ");
        stderr_has(j, r, "rank 2 (pid ");
        stderr_has(j, r, ") died before making this call");
        stderr_has(j, r, "(ncclRemoteError)");
        if (count_lines(j.ranks[r].err, "[fake-nccl]") != 1)
            problem("rank %d printed %d lines, expected 1", r, count_lines(j.ranks[r].err, "[fake-nccl]"));
    }
    if (g_problems != before) show(j);
    else printf("  rank 0 %s", j.ranks[0].out.c_str());
}
void case_timeout() {
    const int before = g_problems;
    const Job j = run_job(2, rank_timeout, {{"FAKE_NCCL_TIMEOUT_S", "1"}});
    ended_well(j);
    stderr_has(j, 0, "ncclAllReduce: rank 0 of 2 (comm #1), collective #1 ncclAllReduce(count 100, float32, sum): rank 1 (pid ");
    stderr_has(j, 0, ") did not make this call within 1 s (FAKE_NCCL_TIMEOUT_S) (ncclSystemError)");
    stderr_has(j, 0, "ncclCommInitRank: rank 0 of 2 (id ");
    stderr_has(j, 0, "): rank 1 did not join within 1 s (FAKE_NCCL_TIMEOUT_S) (ncclSystemError)");
    stderr_has(j, 1, "rank 0 (pid ");
    stderr_has(j, 1, ") failed before making this call: ncclAllReduce(count 100, float32, sum): rank 1 (pid ");
    if (g_problems != before) show(j);
}
void case_mismatch() {
    const int before = g_problems;
    const Job j = run_job(2, rank_mismatch, {{"FAKE_NCCL_TIMEOUT_S", "20"}});
    ended_well(j);
    stderr_has(j, 0, "ncclAllReduce: rank 0 of 2 (comm #1), collective #1 ncclAllReduce(count 10, float32, sum): rank 1 "
                     "called ncclAllGather(sendcount 10, float32) as its collective #1 instead: every rank must make "
                     "the same calls in the same order (real NCCL would hang or corrupt data here) (ncclInvalidUsage)");
    stderr_has(j, 1, "ncclAllGather: rank 1 of 2 (comm #1), collective #1 ncclAllGather(sendcount 10, float32): rank 0 "
                     "called ncclAllReduce(count 10, float32, sum) as its collective #1 instead");
    stderr_has(j, 0, "rank 1 called ncclAllReduce(count 12, float32, sum) as its collective #1 instead");
    stderr_has(j, 0, "collective #2 ncclAllReduce(count 10, float32, sum): rank 1 called ncclAllReduce(count 10, "
                     "float32, max) as its collective #2 instead");
    stderr_has(j, 0, "destroyed its communicator instead of making this call: every rank must make the same calls "
                     "(ncclInvalidUsage)");
    stderr_has(j, 1, "ncclCommInitRank: rank 1 of 3 (id ");
    stderr_has(j, 1, "nranks 3 differs from the 2 of the communicator that pid ");
    stderr_has(j, 1, "rank 0 of this id is already joined by pid ");
    if (g_problems != before) show(j);
}
void case_abort() {
    const int before = g_problems;
    const Job j = run_job(2, rank_abort, {{"FAKE_NCCL_TIMEOUT_S", "30"}});
    ended_well(j);
    stderr_has(j, 0, "rank 1 (pid ");
    stderr_has(j, 0, ") aborted its communicator (ncclCommAbort) before making this call (ncclRemoteError)");
    stderr_has(j, 1, ") aborted its communicator (ncclCommAbort) before making this call (ncclRemoteError)");
    stderr_has(j, 1, "was destroyed or aborted (ncclCommDestroy, ncclCommAbort) (ncclInvalidUsage)");
    stderr_lacks(j, 0, "interrupted");
    if (count_lines(j.ranks[0].err, "[fake-nccl]") != 1) problem("rank 0 printed %d lines, expected 1 (the local abort prints none)", count_lines(j.ranks[0].err, "[fake-nccl]"));
    if (g_problems != before) show(j);
}
void case_refusals() {
    const int before = g_problems;
    const Job j = run_job(1, rank_refusals);
    ended_well(j);
    for (const char* want :
         {"[fake-nccl] ncclGetVersion: version argument is NULL (ncclInvalidArgument)",
          "[fake-nccl] ncclCommInitRank: comm (the result pointer) is NULL (ncclInvalidArgument)",
          "ncclCommInitRank: nranks 0: must be 1 to 64", "ncclCommInitRank: rank 1: must be 0 to 0 (nranks 1)",
          "ncclCommInitRank: rank -1: must be 0 to 0",
          "the unique id was not made by this fake NCCL's ncclGetUniqueId",
          "[fake-nccl] ncclAllReduce: comm argument is NULL (ncclInvalidArgument)",
          "ncclAllReduce: rank 0 of 1 (comm #1): invalid datatype 99 (ncclInvalidArgument)",
          "datatype float8e4m3 is not emulated by the fake NCCL (ncclInvalidArgument)",
          "invalid reduction operation 7", "count 9223372036854775807 overflows",
          "sendbuff is NULL (ncclInvalidArgument)", "ncclBroadcast: rank 0 of 1 (comm #1): root 1 is not a rank (nranks 1)",
          "ncclReduce: rank 0 of 1 (comm #1): root -1 is not a rank", "ncclCommCount: count argument is NULL",
          "ncclCommGetAsyncError: asyncError argument is NULL", "ncclCommCount: 0x", "is not a communicator (ncclInvalidArgument)",
          "ncclGroupEnd: ncclGroupEnd without ncclGroupStart (ncclInvalidUsage)",
          "the communicator was finalized (ncclCommFinalize): only ncclCommDestroy may follow (ncclInvalidUsage)",
          "was destroyed or aborted (ncclCommDestroy, ncclCommAbort) (ncclInvalidUsage)"})
        stderr_has(j, 0, want);
    if (g_problems != before) show(j);
}
void case_counters() {
    const int before = g_problems;
    const std::string pattern = g_tmp + "/nccl-counters.%p.json", log = g_tmp + "/nccl-log.%p";
    const Job j = run_job(2, rank_counters, {{"FAKE_NCCL_COUNTERS", pattern}, {"FAKE_NCCL_LOG", log}});
    ended_well(j);
    for (int r = 0; r < 2; r++) {
        const std::string pid = std::to_string(j.ranks[r].pid);
        const std::string json = read_file(g_tmp + "/nccl-counters." + pid + ".json");
        const std::string calls = read_file(g_tmp + "/nccl-log." + pid);
        char want[300];
        snprintf(want, sizeof want, "\"comms\": [{\"comm\": 1, \"rank\": %d, \"nranks\": 2, \"id\": \"", r);
        for (const std::string& w :
             {std::string("{\"pid\": ") + pid + ", \"version\": 23000, \"calls\": {", std::string(want),
              std::string("\"collectives\": {\"ncclAllGather\": {\"count\": 1, \"bytes\": 20, \"recv_bytes\": 40, "),
              std::string("\"ncclAllReduce\": {\"count\": 2, \"bytes\": 8000, \"recv_bytes\": 8000, "),
              std::string("\"steps\": 3, \"captured\": 0, \"replayed\": 0, "),
              std::string("\"async_error\": \"ncclSuccess\", \"state\": \"destroyed\"}]}"), std::string("\"errors\": 0,"),
              std::string("\"ncclAllReduce\": 2, "), std::string("\"ncclCommDestroy\": 1, ")})
            if (json.find(w) == std::string::npos) problem("rank %d's counters lack %s:\n  %s", r, w.c_str(), json.c_str());
        for (const char* w : {"ncclCommInitRank(id ", "ncclAllReduce(send ", "float32, sum, stream (nil)) = ncclSuccess",
                              "rank 0: ran ncclAllReduce #1 ncclAllReduce(count 1000, float32, sum), 1 steps",
                              "ncclAllGather(send "})
            if (calls.find(w) == std::string::npos && !(r == 1 && strstr(w, "rank 0: ran")))
                problem("rank %d's call log lacks %s", r, w);
    }
    // FAKE_NCCL_COUNTERS=1: a summary and the JSON on stderr.
    const Job k = run_job(2, rank_counters, {{"FAKE_NCCL_COUNTERS", "1"}});
    ended_well(k);
    stderr_has(k, 1, "[fake-nccl] counters of process ");
    stderr_has(k, 1, "rank 1 of 2, destroyed, 3 steps");
    stderr_has(k, 1, "sent 8000 B, received 8000 B");
    stderr_has(k, 1, "[fake-nccl] counters {\"pid\": ");
    if (g_problems != before) show(j), show(k);
}
void case_graph() {
    for (int n : {2, 3}) {
        const int before = g_problems;
        const Job j = run_job(n, rank_graph, {{"FAKE_NCCL_TIMEOUT_S", "20"}});
        ended_well(j);
        for (int r = 0; r < n - 1; r++) {
            stderr_has(j, r, "ncclAllReduce: rank ");
            stderr_has(j, r, "collective #14 ncclAllReduce(count 1000, float32, sum) replayed by a graph: rank ");
            stderr_has(j, r, ") died before making this call (ncclRemoteError)");
            if (count_lines(j.ranks[r].err, "was replayed after its communicator was destroyed or aborted: nothing done") != 3)
                problem("rank %d: not 3 lines about replays after the communicator was destroyed", r);
        }
        if (g_problems != before) show(j);
    }
}
void case_stale() {
    const int before = g_problems;
    // 1. A job killed while its rank 0 waits for rank 1 leaves its segment behind.
    g_stale_id_file = g_tmp + "/stale-a.id";
    Job a = run_job(1, rank_killed_in_init);
    ended_well(a, {0});
    Id id_a{};
    const std::string s = read_file(g_stale_id_file);
    if (s.size() != sizeof id_a) {
        problem("no id from the killed job");
        show(a);
        return;
    }
    memcpy(&id_a, s.data(), sizeof id_a);
    if (!exists(segment_path(id_a))) problem("the killed job left no segment (%s): the case tests nothing", segment_path(id_a).c_str());
    // 2. A new job with that id replaces it; a sweep (ncclGetUniqueId) while the new job waits
    // leaves the live segment alone.
    Job b = run_job(2, rank_reuse, {}, &id_a);
    if (!ended_well(b)) show(b);
    if (exists(segment_path(id_a))) problem("%s is left after the job that reused its id", segment_path(id_a).c_str());
    // 3. Another leftover, removed by the next ncclGetUniqueId of any process.
    g_stale_id_file = g_tmp + "/stale-c.id";
    Job c = run_job(1, rank_killed_in_init);
    ended_well(c, {0});
    Id id_c{};
    memcpy(&id_c, read_file(g_stale_id_file).c_str(), sizeof id_c);
    if (!exists(segment_path(id_c))) problem("the second killed job left no segment");
    Job d = run_job(1, rank_make_id);
    ended_well(d);
    if (exists(segment_path(id_c))) problem("ncclGetUniqueId did not sweep %s away", segment_path(id_c).c_str());
    if (g_problems != before) show(a), show(c);
}

struct Case {
    const char* name;
    void (*run)();
};
int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: selftest NCCL_LIBRARY CUDA_LIBRARY\n");
        return 2;
    }
    g_nccl_path = argv[1];
    g_cuda_path = argv[2];
    const char* tmpdir = getenv("TMPDIR");
    std::string tmpl = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/fake-nccl-selftest.XXXXXX";
    if (!mkdtemp(tmpl.data())) {
        perror(tmpl.c_str());
        return 2;
    }
    g_tmp = tmpl;
    const Case cases[] = {
        {"1 rank: every collective, type and op, in place and out of place, against the reference", case_everything_1},
        {"2 ranks: every collective, type and op, bit-identical on every rank", case_everything_2},
        {"3 ranks: every collective, type and op, bit-identical on every rank", case_everything_3},
        {"4 ranks: every collective, type and op, bit-identical on every rank", case_everything_4},
        {"2 and 4 ranks: buffers many times the staging area (FAKE_NCCL_STAGING_MB=0.0625)", case_large},
        {"3 ranks: a 64 MiB all-reduce with the default staging area", case_big},
        {"3 ranks: groups, nested, and a group with a refused call", case_groups},
        {"3 ranks: a rank killed mid-collective (left a zombie) is noticed within seconds", case_killed},
        {"2 ranks: a rank that does not come in time (FAKE_NCCL_TIMEOUT_S=1), and an init nobody joins", case_timeout},
        {"2 ranks: mismatched collectives, counts, ops, a destroyed peer, nranks, a taken rank", case_mismatch},
        {"2 ranks: ncclCommAbort by a peer, and from another thread of the waiting process", case_abort},
        {"1 rank: refusals with NCCL's codes, finalize, destroy, error strings", case_refusals},
        {"2 ranks: FAKE_NCCL_COUNTERS (file and stderr) and FAKE_NCCL_LOG", case_counters},
        {"2 and 3 ranks: collectives captured in a fake-CUDA graph, replayed; a peer dies between replays", case_graph},
        {"segments of killed jobs: replaced by a job reusing the id, swept by ncclGetUniqueId", case_stale},
    };
    int failed = 0, n = 0;
    const double start = now();
    for (const Case& c : cases) {
        const int before = g_problems;
        const double t0 = now();
        c.run();
        const bool ok = g_problems == before;
        printf("%s: %s (%.2f s)\n", ok ? "ok" : "FAIL", c.name, now() - t0);
        fflush(stdout);
        failed += !ok;
        n++;
    }
    if (!getenv("FAKE_NCCL_SELFTEST_KEEP") && system(("rm -rf '" + g_tmp + "'").c_str()) != 0) fprintf(stderr, "cannot remove %s\n", g_tmp.c_str());
    printf("%s: %d of %d cases passed (%.1f s)\n", failed ? "FAILED" : "ok", n - failed, n, now() - start);
    return failed ? 1 : 0;
}
