// The shared memory of one fake NCCL communicator (see README.md, "How it works"): a POSIX
// shared-memory segment named from the unique id, holding a header, one control block per rank
// (state, pid, the last step it posted and its descriptors) and, per rank, a staging area in two
// halves. A collective runs in steps: a rank copies its chunk into the half of its staging area
// that the step's parity picks, posts the step, waits until every rank has posted it, checks that
// their descriptors agree, and reads what it needs from every rank's half. Two halves make one wait
// per step enough: a rank posts step t + 2 into the half of step t only after every rank posted
// t + 1, which each did after it finished reading step t.
//
// Every wait has a deadline (the caller's timeout) and looks at the peers it waits for about every
// 10 ms: one whose process is gone (kill(pid, 0), a zombie or a reused pid in /proc) has died; one
// marked failed or aborted gave up. Waiters sleep on a futex in the segment (the "bell"), which
// every post and every state change rings.
//
// The name lives only until every rank has joined: the last to join unlinks it (the mapping stays).
// A job killed before that leaves a segment behind; joining one whose processes are all gone
// replaces it, and ncclGetUniqueId sweeps such leftovers away.
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "fake_nccl.h"

namespace fnccl {

constexpr char kIdMagic[16] = "fake-nccl id 1";
constexpr char kSegMagic[16] = "fake-nccl seg 1";

struct Header {
    char magic[16];
    int32_t nranks;
    int32_t creator_pid;
    uint64_t creator_start;
    uint64_t half;         // bytes in each half of a rank's staging area
    uint64_t data_offset;  // where rank 0's staging area starts
    uint32_t ready;        // the creator has filled the header in
    int32_t joined;        // ranks that have joined (only grows)
    alignas(64) uint32_t bell;  // the futex word: bumped and woken at every change waiters care about
};

namespace {
template <class T>
T load(const T& x) {
    return __atomic_load_n(&x, __ATOMIC_ACQUIRE);
}
template <class T>
void store(T& x, T v) {
    __atomic_store_n(&x, v, __ATOMIC_RELEASE);
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
void sleep_ms(double ms) {
    timespec ts{(time_t)(ms / 1000), (long)(fmod(ms, 1000.0) * 1e6)};
    nanosleep(&ts, nullptr);
}
size_t slots_offset() { return (sizeof(Header) + 63) / 64 * 64; }
size_t data_offset(int nranks) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (slots_offset() + (size_t)nranks * sizeof(Slot) + page - 1) / page * page;
}
size_t segment_size(int nranks, size_t half) { return data_offset(nranks) + (size_t)nranks * 2 * half; }
Slot* slots_of(Header* h) { return (Slot*)((char*)h + slots_offset()); }

void ring(Header* h) {
    __atomic_fetch_add(&h->bell, 1u, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &h->bell, FUTEX_WAKE, 0x7fffffff, nullptr, nullptr, 0);
}
// Sleeps until the bell moves from `seen`, for at most ms milliseconds.
void wait_bell(Header* h, uint32_t seen, double ms) {
    timespec ts{(time_t)(ms / 1000), (long)(fmod(ms, 1000.0) * 1e6)};
    syscall(SYS_futex, &h->bell, FUTEX_WAIT, seen, &ts, nullptr, 0);
}

// A process's start time (field 22 of /proc/PID/stat) and state letter; false if unreadable.
bool proc_stat(int pid, uint64_t* start, char* state) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE* f = fopen(path, "r");
    if (!f) return false;
    const size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char* p = strrchr(buf, ')');  // the command name may hold spaces and parentheses
    if (!p) return false;
    char st = 0;
    unsigned long long t = 0;
    // state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    // priority nice threads itrealvalue starttime
    if (sscanf(p + 1, " %c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu", &st, &t) != 2)
        return false;
    *start = t;
    *state = st;
    return true;
}
uint64_t my_start_time() {
    uint64_t t = 0;
    char st;
    return proc_stat(getpid(), &t, &st) ? t : 0;
}
// Whether the process that recorded (pid, start) still runs: not gone, not a zombie, not a later
// process that got the same pid.
bool alive(int pid, uint64_t start) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    uint64_t t;
    char st;
    if (!proc_stat(pid, &t, &st)) return true;  // no /proc: kill() said it exists
    if (st == 'Z' || st == 'X' || st == 'x') return false;
    return start == 0 || t == start;
}

// Whether any process that was in the segment (its creator, a rank) still runs.
bool anyone_alive(Header* h, int nranks) {
    if (alive(load(h->creator_pid), h->creator_start)) return true;
    Slot* s = slots_of(h);
    for (int r = 0; r < nranks; r++)
        if (alive(load(s[r].pid), s[r].start_time)) return true;
    return false;
}

std::string hex(const unsigned char* p, size_t n) {
    std::string s;
    char b[3];
    for (size_t i = 0; i < n; i++) {
        snprintf(b, sizeof b, "%02x", p[i]);
        s += b;
    }
    return s;
}

WaitError error(ncclResult_t code, int peer, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
WaitError error(ncclResult_t code, int peer, const char* fmt, ...) {
    char b[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    WaitError e;
    e.code = code;
    e.peer = peer;
    e.why = b;
    return e;
}

// What a peer's state means to a rank waiting for it ("" while it is fine).
WaitError peer_gone(const Slot& s, int peer, const char* waiting_for) {
    const int st = load(s.state);
    if (st == kAborted)
        return error(ncclRemoteError, peer, "rank %d (pid %d) aborted its communicator (%s) before %s", peer,
                     load(s.pid), s.why, waiting_for);
    if (st == kFailed)
        return error(ncclRemoteError, peer, "rank %d (pid %d) failed before %s: %s", peer, load(s.pid), waiting_for,
                     s.why);
    if (st == kLeft)
        return error(ncclInvalidUsage, peer,
                     "rank %d (pid %d) destroyed its communicator instead of %s: every rank must make the same calls",
                     peer, load(s.pid), waiting_for);
    return WaitError{};
}
}  // namespace

Slot& Segment::slot(int r) const { return slots_of(h)[r]; }
unsigned char* Segment::data(int r, int parity) const {
    return (unsigned char*)h + h->data_offset + ((size_t)r * 2 + (size_t)parity) * half;
}

// ---- ids and names ----------------------------------------------------------------------------------
bool make_id(ncclUniqueId* id) {
    memset(id, 0, sizeof *id);
    memcpy(id->internal, kIdMagic, 16);
    unsigned char* random = (unsigned char*)id->internal + 16;
    size_t got = 0;
    while (got < 16) {
        const ssize_t n = getrandom(random + got, 16 - got, 0);
        if (n < 0 && errno != EINTR) return false;
        if (n > 0) got += (size_t)n;
    }
    const int32_t pid = getpid();
    memcpy(id->internal + 32, &pid, 4);
    return true;
}
std::string segment_name(const ncclUniqueId& id) {
    if (memcmp(id.internal, kIdMagic, 16) != 0) return "";
    return "/fake-nccl." + hex((const unsigned char*)id.internal + 16, 16);
}

// ---- joining ------------------------------------------------------------------------------------------
namespace {
// Opens or creates the segment; the caller then claims its slot. Retries while another process is
// creating it, and replaces a leftover of a killed job.
WaitError open_segment(const std::string& name, int nranks, size_t half, double deadline, Segment* seg) {
    for (int attempt = 0;; attempt++) {
        if (attempt && deadline > 0 && now_s() > deadline)
            return error(ncclSystemError, -1, "could not open shared memory %s before the timeout (FAKE_NCCL_TIMEOUT_S)",
                         name.c_str());
        if (attempt) sleep_ms(1);
        int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd >= 0) {
            // The creator: size it, fill the header in, then say it is ready.
            const size_t size = segment_size(nranks, half);
            if (ftruncate(fd, (off_t)size) != 0) {
                const int e = errno;
                close(fd);
                shm_unlink(name.c_str());
                return error(ncclSystemError, -1, "ftruncate of shared memory %s to %zu bytes: %s (is /dev/shm big enough?)",
                             name.c_str(), size, strerror(e));
            }
            void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            if (p == MAP_FAILED) {
                const int e = errno;
                shm_unlink(name.c_str());
                return error(ncclSystemError, -1, "mmap of shared memory %s (%zu bytes): %s", name.c_str(), size,
                             strerror(e));
            }
            Header* h = (Header*)p;
            store(h->creator_pid, (int32_t)getpid());
            h->creator_start = my_start_time();
            memcpy(h->magic, kSegMagic, 16);
            h->nranks = nranks;
            h->half = half;
            h->data_offset = data_offset(nranks);
            store(h->ready, 1u);
            *seg = Segment{h, size, name, 0, nranks, half};
            return WaitError{};
        }
        if (errno != EEXIST)
            return error(ncclSystemError, -1, "shm_open(%s): %s", name.c_str(), strerror(errno));
        fd = shm_open(name.c_str(), O_RDWR, 0600);
        if (fd < 0) {
            if (errno == ENOENT) continue;  // unlinked in between: create it
            return error(ncclSystemError, -1, "shm_open(%s): %s", name.c_str(), strerror(errno));
        }
        struct stat st;
        if (fstat(fd, &st) != 0) {
            close(fd);
            continue;
        }
        if ((size_t)st.st_size < sizeof(Header)) {
            // Being created, or its creator died before sizing it (then it is a leftover after a while).
            close(fd);
            if (time(nullptr) - st.st_ctime > 2) shm_unlink(name.c_str());
            continue;
        }
        void* p = mmap(nullptr, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) return error(ncclSystemError, -1, "mmap of shared memory %s: %s", name.c_str(), strerror(errno));
        Header* h = (Header*)p;
        const int creator = load(h->creator_pid);
        if (!load(h->ready)) {
            // Its creator is filling it in, or died doing so.
            const bool leftover = creator ? !alive(creator, 0) : time(nullptr) - st.st_ctime > 2;
            munmap(p, (size_t)st.st_size);
            if (leftover) shm_unlink(name.c_str());
            continue;
        }
        if (memcmp(h->magic, kSegMagic, 16) != 0) {
            munmap(p, (size_t)st.st_size);
            return error(ncclInvalidUsage, -1, "shared memory %s is not a segment of this fake NCCL", name.c_str());
        }
        const int seg_nranks = h->nranks;
        if (seg_nranks < 1 || (size_t)st.st_size < segment_size(seg_nranks, h->half)) {
            munmap(p, (size_t)st.st_size);
            return error(ncclSystemError, -1, "shared memory %s is damaged (%lld bytes)", name.c_str(),
                         (long long)st.st_size);
        }
        if (!anyone_alive(h, seg_nranks)) {
            // A killed job's: nobody will come back to it.
            munmap(p, (size_t)st.st_size);
            shm_unlink(name.c_str());
            continue;
        }
        if (seg_nranks != nranks) {
            munmap(p, (size_t)st.st_size);
            return error(ncclInvalidUsage, -1,
                         "nranks %d differs from the %d of the communicator that pid %d created with this id: every "
                         "rank must pass the same nranks",
                         nranks, seg_nranks, creator);
        }
        *seg = Segment{h, (size_t)st.st_size, name, 0, nranks, (size_t)h->half};
        return WaitError{};
    }
}
}  // namespace

WaitError join(const std::string& name, int nranks, int rank, size_t half_bytes, double timeout_s,
               const std::atomic<bool>* abort, Segment* out) {
    const double start = now_s(), deadline = timeout_s > 0 ? start + timeout_s : 0;
    // Enough for one element of the widest type from every rank in a reduce-scatter step.
    const size_t half = std::max<size_t>((half_bytes + 63) / 64 * 64, (size_t)(8 * nranks + 63) / 64 * 64);
    Segment seg;
    WaitError e = open_segment(name, nranks, half, deadline, &seg);
    if (e.code) return e;
    seg.rank = rank;
    Slot& mine = seg.slot(rank);
    int32_t expected = 0;
    const int32_t me = getpid();
    if (!__atomic_compare_exchange_n(&mine.pid, &expected, me, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        const int st = load(mine.state);
        WaitError taken;
        if (expected == me && st == kJoined)
            taken = error(ncclInvalidUsage, -1, "rank %d of this id is already joined by this process", rank);
        else if (st == kJoined && alive(expected, mine.start_time))
            taken = error(ncclInvalidUsage, -1, "rank %d of this id is already joined by pid %d", rank, expected);
        else
            taken = error(ncclInvalidUsage, -1,
                          "rank %d of this id was joined by pid %d, which %s: an id serves one communicator (make a "
                          "new one with ncclGetUniqueId)",
                          rank, expected, alive(expected, mine.start_time) ? "has left it" : "died");
        munmap(seg.h, seg.size);
        return taken;
    }
    mine.start_time = my_start_time();
    __atomic_store_n(&mine.state, (int32_t)kJoined, __ATOMIC_SEQ_CST);
    const int joined = __atomic_add_fetch(&seg.h->joined, 1, __ATOMIC_SEQ_CST);
    ring(seg.h);
    // The last to join unlinks the name: every rank has it mapped, and a killed job leaves nothing.
    if (joined == nranks) shm_unlink(name.c_str());
    // Wait for the others.
    double next_check = now_s() + 0.01;
    for (int spins = 0;; spins++) {
        const uint32_t seen = load(seg.h->bell);
        if (load(seg.h->joined) >= nranks) break;
        if (abort && abort->load()) {
            e = error(ncclSystemError, -1, "aborted by ncclCommAbort in this process");
            e.local_abort = true;
        }
        for (int r = 0; r < nranks && !e.code; r++)
            if (r != rank && load(seg.slot(r).state) != kJoined && load(seg.slot(r).state) != kEmpty)
                e = peer_gone(seg.slot(r), r, "every rank had joined");
        const double now = now_s();
        if (!e.code && now >= next_check) {
            next_check = now + 0.01;
            for (int r = 0; r < nranks && !e.code; r++)
                if (r != rank && load(seg.slot(r).state) == kJoined && !alive(load(seg.slot(r).pid), seg.slot(r).start_time))
                    e = error(ncclRemoteError, r, "rank %d (pid %d) died before every rank had joined", r,
                              load(seg.slot(r).pid));
        }
        if (!e.code && deadline > 0 && now > deadline) {
            std::string missing;
            int first = -1, count = 0;
            for (int r = 0; r < nranks; r++)
                if (load(seg.slot(r).state) == kEmpty) {
                    if (first < 0) first = r;
                    missing += (count++ ? ", " : "") + std::to_string(r);
                }
            e = error(ncclSystemError, first, "rank%s %s did not join within %g s (FAKE_NCCL_TIMEOUT_S)",
                      count > 1 ? "s" : "", missing.c_str(), timeout_s);
        }
        if (e.code) {
            leave(seg, e.local_abort ? kAborted : kFailed, e.why);
            return e;
        }
        if (spins < 20) sched_yield();
        else wait_bell(seg.h, seen, std::min(10.0, deadline > 0 ? std::max(0.1, (deadline - now) * 1000) : 10.0));
    }
    *out = seg;
    return WaitError{};
}

void mark_failed(Segment& s, const std::string& why) {
    if (!s.h) return;
    Slot& mine = s.slot(s.rank);
    snprintf(mine.why, sizeof mine.why, "%s", why.c_str());
    __atomic_store_n(&mine.state, (int32_t)kFailed, __ATOMIC_SEQ_CST);
    ring(s.h);
}

void leave(Segment& s, int state, const std::string& why) {
    if (!s.h) return;
    Slot& mine = s.slot(s.rank);
    if (load(mine.state) == kJoined || state == kAborted) {
        snprintf(mine.why, sizeof mine.why, "%s", why.c_str());
        __atomic_store_n(&mine.state, (int32_t)state, __ATOMIC_SEQ_CST);
    }
    ring(s.h);
    // Never complete: the name is still there. Unlink it when no other rank is in it any more (both
    // of two ranks leaving at once may do it; the second finds nothing).
    if (__atomic_load_n(&s.h->joined, __ATOMIC_SEQ_CST) < s.nranks) {
        bool others = false;
        for (int r = 0; r < s.nranks; r++)
            if (r != s.rank && __atomic_load_n(&s.slot(r).state, __ATOMIC_SEQ_CST) == kJoined &&
                alive(load(s.slot(r).pid), s.slot(r).start_time))
                others = true;
        if (!others) shm_unlink(s.name.c_str());
    }
    munmap(s.h, s.size);
    s.h = nullptr;
}

void post(Segment& s, uint64_t step) {
    store(s.slot(s.rank).posted, step);
    ring(s.h);
}

void wake(Segment& s) {
    if (s.h) ring(s.h);
}

WaitError wait_step(Segment& s, uint64_t step, double timeout_s, const std::atomic<bool>* abort, double* seconds) {
    const double start = now_s(), deadline = timeout_s > 0 ? start + timeout_s : 0;
    double next_check = start + 0.01;
    WaitError e;
    char waiting_for[64];
    snprintf(waiting_for, sizeof waiting_for, "posting step %llu", (unsigned long long)step);
    for (int spins = 0;; spins++) {
        const uint32_t seen = load(s.h->bell);
        int missing = -1, nmissing = 0;
        for (int r = 0; r < s.nranks; r++)
            if (load(s.slot(r).posted) < step) {
                if (missing < 0) missing = r;
                nmissing++;
            }
        if (missing < 0) break;
        if (abort && abort->load()) {
            e = error(ncclSystemError, -1, "aborted by ncclCommAbort in this process");
            e.local_abort = true;
        }
        for (int r = 0; r < s.nranks && !e.code; r++)
            if (r != s.rank && load(s.slot(r).posted) < step) e = peer_gone(s.slot(r), r, "making this call");
        const double now = now_s();
        if (!e.code && now >= next_check) {
            next_check = now + 0.01;
            for (int r = 0; r < s.nranks && !e.code; r++)
                if (r != s.rank && load(s.slot(r).posted) < step && !alive(load(s.slot(r).pid), s.slot(r).start_time))
                    e = error(ncclRemoteError, r, "rank %d (pid %d) died before making this call", r, load(s.slot(r).pid));
        }
        if (!e.code && deadline > 0 && now > deadline)
            e = error(ncclSystemError, missing, "rank %d (pid %d)%s did not make this call within %g s (FAKE_NCCL_TIMEOUT_S)",
                      missing, load(s.slot(missing).pid),
                      nmissing > 1 ? (" and " + std::to_string(nmissing - 1) + " more").c_str() : "", timeout_s);
        if (e.code) break;
        if (spins < 20) sched_yield();
        else wait_bell(s.h, seen, std::min(10.0, deadline > 0 ? std::max(0.1, (deadline - now) * 1000) : 10.0));
    }
    if (seconds) *seconds += now_s() - start;
    return e;
}

// ---- leftovers of killed jobs ---------------------------------------------------------------------------
void sweep_stale() {
    DIR* d = opendir("/dev/shm");
    if (!d) return;
    std::vector<std::string> names;
    while (dirent* ent = readdir(d))
        if (strncmp(ent->d_name, "fake-nccl.", 10) == 0) names.push_back(std::string("/") + ent->d_name);
    closedir(d);
    for (const std::string& name : names) {
        const int fd = shm_open(name.c_str(), O_RDONLY, 0);
        if (fd < 0) continue;
        struct stat st;
        if (fstat(fd, &st) != 0) {
            close(fd);
            continue;
        }
        const bool old = time(nullptr) - st.st_ctime > 2;
        if ((size_t)st.st_size < sizeof(Header)) {
            close(fd);
            if (old) shm_unlink(name.c_str());
            continue;
        }
        void* p = mmap(nullptr, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) continue;
        Header* h = (Header*)p;
        bool stale;
        if (!load(h->ready)) stale = h->creator_pid ? !alive(h->creator_pid, 0) : old;
        else
            stale = memcmp(h->magic, kSegMagic, 16) == 0 && h->nranks >= 1 &&
                    (size_t)st.st_size >= segment_size(h->nranks, h->half) && !anyone_alive(h, h->nranks);
        munmap(p, (size_t)st.st_size);
        if (stale) shm_unlink(name.c_str());
    }
}

const char* kind_name(int kind) {
    switch (kind) {
        case kAllReduce: return "ncclAllReduce";
        case kReduceScatter: return "ncclReduceScatter";
        case kAllGather: return "ncclAllGather";
        case kBroadcast: return "ncclBroadcast";
        case kReduce: return "ncclReduce";
        default: return "ncclCollective?";
    }
}

std::string describe(const Desc& d) {
    char b[160];
    const unsigned long long n = d.count;
    switch (d.kind) {
        case kAllReduce: snprintf(b, sizeof b, "ncclAllReduce(count %llu, %s, %s)", n, type_name(d.dtype), op_name(d.op)); break;
        case kReduceScatter:
            snprintf(b, sizeof b, "ncclReduceScatter(recvcount %llu, %s, %s)", n, type_name(d.dtype), op_name(d.op));
            break;
        case kAllGather: snprintf(b, sizeof b, "ncclAllGather(sendcount %llu, %s)", n, type_name(d.dtype)); break;
        case kBroadcast: snprintf(b, sizeof b, "ncclBroadcast(count %llu, %s, root %d)", n, type_name(d.dtype), d.root); break;
        case kReduce:
            snprintf(b, sizeof b, "ncclReduce(count %llu, %s, %s, root %d)", n, type_name(d.dtype), op_name(d.op), d.root);
            break;
        default: snprintf(b, sizeof b, "collective kind %d", d.kind);
    }
    return b;
}

}  // namespace fnccl
