// Declarations shared by the fake CUDA driver's source files (see README.md): the CUDA types and
// error codes it uses, the kernel registry (kernels.cpp), the PTX reader (ptx.cpp), device memory
// (memory.cpp) and what the driver (driver.cpp) tells the others about the launch under way.
//
// Rule for every file of the library: no function-local statics. emu.ld gathers every
// zero-initialised function static (.bss._ZZ*) into the range the emulator refills with 0xFF
// before each block, because that is where the kernels' __shared__ arrays live; a static of the
// driver's in that range would be overwritten mid-run. Only kernels.cpp is built with
// -fdata-sections (what lets emu.ld pick those statics out), and build.sh checks the range.
#pragma once
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

// ---- the driver API's types and values (cuda.h of CUDA 13.0; cudarc's sys module agrees) --------
// cudarc declares CUresult as a #[repr(u32)] Rust enum: returning a value that is not one of its
// variants is undefined behaviour there, so only the documented codes below may be returned.
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
struct FakeContext;
struct FakeModule;
struct FakeFunction;
struct FakeStream;
struct FakeEvent;
struct FakeGraph;
struct FakeGraphExec;
typedef FakeContext* CUcontext;
typedef FakeModule* CUmodule;
typedef FakeFunction* CUfunction;
typedef FakeStream* CUstream;
typedef FakeEvent* CUevent;
typedef FakeGraph* CUgraph;
typedef FakeGraphExec* CUgraphExec;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_PERMITTED = 800,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_MERGE = 902,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_UNJOINED = 904,
    CUDA_ERROR_STREAM_CAPTURE_ISOLATION = 905,
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
    CUDA_ERROR_CAPTURED_EVENT = 907,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
};

namespace fake {

struct Dims {
    unsigned x, y, z;
};

// ---- kernels.cpp: the kernels/*.cu sources, compiled by g++ through tools/kernel-emu ------------
constexpr int kMaxParams = 32;
// One extern "C" kernel, with what its C++ parameter list says about each argument.
struct KernelEntry {
    const char* name;
    int nparams;
    size_t size[kMaxParams];           // sizeof the parameter: the bytes a launch reads
    bool is_pointer[kMaxParams];
    bool is_float[kMaxParams];
    size_t pointee_align[kMaxParams];  // alignof(*p) for pointers (float 4, bf16 2, float4 16)
    void (*run)(const char* name, void** params, Dims grid, Dims block, unsigned dynamic_smem);
};
const KernelEntry* find_kernel(const char* name);
size_t kernel_count();
const KernelEntry& kernel_at(size_t i);
// Runs a kernel on the CPU with `dynamic_smem` bytes of dynamic shared memory (cuLaunchKernel's
// sharedMemBytes: allocated for the launch, refilled with 0xFF before every block). refill_shared:
// refill the static __shared__ range with 0xFF before every block (skipped for kernels whose PTX
// declares no shared memory; it only costs time there).
void run_kernel(const KernelEntry& k, void** params, Dims grid, Dims block, unsigned dynamic_smem, bool refill_shared);
// While a kernel runs: the block and thread running now (for fault reports).
void current_position(Dims* block, Dims* thread);
// Whether addr is in the guard page below some CUDA thread's fiber stack (a stack overflow).
bool in_fiber_stack_guard(uintptr_t addr);
uint64_t fiber_switches();
// The dynamic shared memory the emulator allocated for the last launch, in bytes.
size_t last_dynamic_smem();

// ---- ptx.cpp: what the driver needs from a PTX module -------------------------------------------
struct PtxParam {
    size_t size = 0;
    char kind = 'b';  // 'f': .f32/.f64; 'i': .u*/.s*; 'b': untyped .b* (may hold anything)
};
struct PtxEntry {
    std::string name;
    std::vector<PtxParam> params;
    unsigned maxntid = 1024;  // threads per block allowed by .maxntid/.reqntid (__launch_bounds__)
    size_t static_smem = 0;   // bytes of .shared the entry (or a .func it calls) names
};
struct PtxModule {
    int version_major = 0, version_minor = 0;  // .version
    std::string target;                          // .target, e.g. "sm_90a"
    std::vector<PtxEntry> entries;
};
// Reads a NUL-terminated PTX text; false with *error set when it is not PTX this reader knows.
bool parse_ptx(const char* text, PtxModule* out, std::string* error);

// ---- memory.cpp: device memory is host memory between guard pages -------------------------------
struct Allocation {
    uint64_t id = 0;         // #1, #2, ... in allocation order, for messages
    uintptr_t start = 0;     // the device pointer handed out (256-byte aligned, like cuMemAlloc)
    size_t size = 0;         // bytes asked for
    char* region = nullptr;  // the mapping: guard page, padding, data, slack, guard page
    size_t region_size = 0;
    bool freed = false;
};
// nullptr with *why set when the memory is not there (total exceeded, mmap failed).
const Allocation* allocate(size_t bytes, size_t limit, std::string* why);
// The live allocation starting exactly at p, or nullptr.
const Allocation* live_at(uintptr_t p);
// The live allocation holding [p, p + n) (n == 0: p may also be its end), or nullptr.
const Allocation* live_holding(uintptr_t p, size_t n);
// The freed (still quarantined) allocation whose data held p, or nullptr.
const Allocation* freed_holding(uintptr_t p);
// Frees a live allocation (its pages become inaccessible and stay reserved for a while).
void release(const Allocation* a);
size_t live_bytes();
// Bytes an allocation of `bytes` counts against the device's total (cuMemAlloc granularity).
size_t charged(size_t bytes);
// Checks the padding and slack of every live allocation for writes past its ends; on a finding,
// describes it in *report and returns false.
bool check_canaries(std::string* report);
// Installs the SIGSEGV reporter (once per process).
void install_fault_handler();
// Gives the calling thread an alternate signal stack big enough for the reporter: a fault inside
// a kernel happens on a fiber's stack, which may be the one that overflowed.
void ensure_signal_stack();

// ---- driver.cpp: the launch under way, for the fault reporter -----------------------------------
struct LaunchInfo {
    const char* kernel;  // nullptr outside a launch
    Dims grid, block;
    unsigned smem;
    pthread_t thread;  // the launching thread
};
const LaunchInfo& current_launch();

}  // namespace fake
