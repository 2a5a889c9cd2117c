// Declarations shared by the fake NCCL's source files (see README.md): NCCL's C ABI (the values of
// NCCL 2.30's nccl.h, as cudarc 0.19.10's nccl/sys/mod.rs binds them), the element types and
// reductions (reduce.cpp), and the shared-memory segment through which the ranks of a
// communicator, one process each, exchange their data (segment.cpp). nccl.cpp has the entry points.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <string>

// ---- NCCL's types and values --------------------------------------------------------------------------
// cudarc declares ncclResult_t, ncclDataType_t and ncclRedOp_t as #[repr(u32)] Rust enums: a value
// that is not one of their variants is undefined behaviour there, so only these codes are returned.
// ncclTimeout (8) exists in NCCL 2.30's enum only; for older bindings 8 is ncclNumResults, which
// cudarc's result() turns into Ok: the fake never returns it (a timeout is ncclSystemError).
typedef int ncclResult_t;
enum : int {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};
enum : int {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
    ncclNumTypes = 12,
};
enum : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4, ncclNumOps = 5 };
constexpr int kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES
struct ncclUniqueId {
    char internal[kUniqueIdBytes];
};
struct ncclComm;  // the communicator (nccl.cpp); ncclComm_t is a pointer to it
typedef ncclComm* ncclComm_t;

namespace fnccl {

// ---- reduce.cpp: element types and reductions ---------------------------------------------------------
// Bytes per element of an emulated type, 0 for one that is not (unknown, or fp8).
size_t type_size(int dtype);
const char* type_name(int dtype);  // "float32", ...; "type 99" for unknown ones (a static buffer)
const char* op_name(int op);       // "sum", ...
// out[i] = in[0][i] (op) in[1][i] (op) ... (op) in[n-1][i], folded in rank order, for i < count; ncclAvg
// divides the sum by n at the end. Integers wrap; float32 and float64 use their own arithmetic;
// float16 and bfloat16 are widened to float, folded in float and rounded to nearest-even once. out
// may be one of the caller's buffers (unaligned, aliasing its input): it is written with memcpy.
void reduce(int dtype, int op, void* out, const unsigned char* const* in, int n, size_t count);
// The conversions reduce() uses (for the self-test's messages and anyone curious).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);

// ---- segment.cpp: the shared memory of one communicator ---------------------------------------------
// The collectives a step can belong to.
enum Kind : int32_t { kAllReduce = 1, kReduceScatter, kAllGather, kBroadcast, kReduce };
const char* kind_name(int kind);  // "ncclAllReduce", ...

// What a rank posts with each step: every rank must post the same, else the calls differ.
struct Desc {
    uint64_t seq;      // the collective's number on this communicator (1, 2, ...)
    uint64_t count;    // count as passed (sendcount of AllGather, recvcount of ReduceScatter)
    uint64_t chunk;    // this step's chunk of the collective, and how many there are
    uint64_t nchunks;
    int32_t kind, dtype;
    int32_t op, root;  // -1 where the collective has none
};
// Human-readable: "ncclAllReduce(count 10, float32, sum)".
std::string describe(const Desc& d);

// A rank's state in the segment.
enum SlotState : int32_t { kEmpty = 0, kJoined = 1, kLeft = 2, kAborted = 3, kFailed = 4 };

// One rank's control block, in shared memory. Read and written with __atomic builtins.
struct alignas(64) Slot {
    int32_t state;        // SlotState
    int32_t pid;          // the process that joined as this rank (0: none yet)
    uint64_t start_time;  // its start time (/proc/PID/stat): a pid reused later is not it
    uint64_t posted;      // the last step whose data and descriptor are in place
    Desc desc[2];         // the descriptor of the last step posted in each half of the staging area
    char why[232];        // kFailed, kAborted: why, for the peers' messages
};

struct Header;
// One communicator's view of its segment.
struct Segment {
    Header* h = nullptr;
    size_t size = 0;
    std::string name;  // the shm_open name
    int rank = 0, nranks = 0;
    size_t half = 0;  // bytes in each half of a rank's staging area
    Slot& slot(int r) const;
    unsigned char* data(int r, int parity) const;
};

// What went wrong while waiting for the other ranks: the code, the peer concerned (-1: none),
// and a sentence for the one stderr line.
struct WaitError {
    ncclResult_t code = ncclSuccess;
    int peer = -1;
    std::string why;
    bool local_abort = false;  // ncclCommAbort from this process interrupted the wait (not printed)
};

// The segment name of a unique id ("/fake-nccl.<32 hex digits>"), or "" when the id is not one
// the fake made (ncclGetUniqueId).
std::string segment_name(const ncclUniqueId& id);
// Fills a fresh id: a magic string, 16 random bytes, the creating process's pid.
bool make_id(ncclUniqueId* id);
// Creates or opens the segment of `name` and joins it as `rank`, then waits until all nranks have
// joined. half_bytes: the staging size the creator gives each half (the creator's knob wins).
// timeout_s <= 0: no timeout (dead peers are still noticed).
WaitError join(const std::string& name, int nranks, int rank, size_t half_bytes, double timeout_s,
               const std::atomic<bool>* abort, Segment* out);
// Leaves: marks this rank (kLeft, kAborted or kFailed with why), wakes the peers, unmaps; unlinks
// the name when the segment was never complete and no other rank is still in it.
void leave(Segment& s, int state, const std::string& why);
// Marks this rank failed (peers waiting for it then fail at once) without leaving.
void mark_failed(Segment& s, const std::string& why);
// Publishes this rank's data and descriptor of `step` and wakes the peers.
void post(Segment& s, uint64_t step);
// Waits until every rank has posted `step` (then its data and descriptor may be read). Fails on a
// timeout (ncclSystemError), a dead peer or one that failed or aborted (ncclRemoteError), a peer that
// left (ncclInvalidUsage: it destroyed its communicator instead of making this call), or this
// process's ncclCommAbort. seconds: the time spent waiting.
WaitError wait_step(Segment& s, uint64_t step, double timeout_s, const std::atomic<bool>* abort, double* seconds);
// Wakes whoever waits on the segment (after ncclCommAbort set the abort flag).
void wake(Segment& s);
// Unlinks segments left by killed jobs (every process that was in them is gone).
void sweep_stale();

}  // namespace fnccl
