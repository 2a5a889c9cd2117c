// The fake CUDA driver's self-test (run by selftest.sh): each case runs in a child process that
// loads the library as cudarc does (dlopen, one symbol at a time) and drives it through the
// driver API. A case asserts the CUDA error codes it gets and the results of the launches it
// makes; the parent asserts what the child printed on stderr and how it ended (some cases must
// die: out-of-bounds accesses abort). Covers every refusal, the guard pages, the knobs, and real
// launches checked against the CPU; with a PTX directory, also the real nvcc PTX of every kernel.
//
//   selftest LIBRARY [PTX_DIR]      exit 0 when every case passes
#include <dirent.h>
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <map>
#include <string>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void* Handle;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_PTX = 218,
    UNSUPPORTED_PTX_VERSION = 222,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    MISALIGNED_ADDRESS = 716,
    NOT_PERMITTED = 800,
    NOT_SUPPORTED = 801,
    INVALID_HANDLE = 400,
    ILLEGAL_STATE = 401,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
    CAPTURE_MERGE = 902,
    CAPTURE_UNMATCHED = 903,
    CAPTURE_UNJOINED = 904,
    CAPTURE_ISOLATION = 905,
    CAPTURE_IMPLICIT = 906,
    CAPTURED_EVENT = 907,
    CAPTURE_WRONG_THREAD = 908,
};
enum { MODE_GLOBAL = 0, MODE_THREAD_LOCAL = 1, MODE_RELAXED = 2 };  // CUstreamCaptureMode

// ---- the library, one symbol at a time (a missing one fails the case, as cudarc would panic) ----
const char* g_library;
void* g_lib;
void* sym(const char* name) {
    void* p = dlsym(g_lib, name);
    if (!p) {
        printf("  missing symbol %s\n", name);
        exit(1);
    }
    return p;
}
#define API(ret, name, args)                                                              \
    template <typename... A>                                                              \
    ret name(A... a) {                                                                    \
        typedef ret(*F) args;                                                             \
        return ((F)sym(#name))(a...);                                                     \
    }
API(CUresult, cuInit, (unsigned))
API(CUresult, cuDeviceGetCount, (int*))
API(CUresult, cuDeviceGet, (int*, int))
API(CUresult, cuDeviceGetAttribute, (int*, int, int))
API(CUresult, cuDeviceGetName, (char*, int, int))
API(CUresult, cuDevicePrimaryCtxRetain, (Handle*, int))
API(CUresult, cuDevicePrimaryCtxRelease_v2, (int))
API(CUresult, cuCtxSetCurrent, (Handle))
API(CUresult, cuCtxGetDevice, (int*))
API(CUresult, cuCtxSynchronize, ())
API(CUresult, cuModuleLoadData, (Handle*, const void*))
API(CUresult, cuModuleUnload, (Handle))
API(CUresult, cuModuleGetFunction, (Handle*, Handle, const char*))
API(CUresult, cuFuncGetAttribute, (int*, int, Handle))
API(CUresult, cuFuncSetAttribute, (Handle, int, int))
API(CUresult, cuMemGetInfo_v2, (size_t*, size_t*))
API(CUresult, cuMemAllocAsync, (CUdeviceptr*, size_t, Handle))
API(CUresult, cuMemFreeAsync, (CUdeviceptr, Handle))
API(CUresult, cuMemsetD8Async, (CUdeviceptr, unsigned char, size_t, Handle))
API(CUresult, cuMemcpyHtoDAsync_v2, (CUdeviceptr, const void*, size_t, Handle))
API(CUresult, cuMemcpyDtoHAsync_v2, (void*, CUdeviceptr, size_t, Handle))
API(CUresult, cuMemcpyDtoDAsync_v2, (CUdeviceptr, CUdeviceptr, size_t, Handle))
API(CUresult, cuLaunchKernel, (Handle, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, Handle, void**, void**))
API(CUresult, cuStreamSynchronize, (Handle))
API(CUresult, cuEventCreate, (Handle*, unsigned))
API(CUresult, cuEventRecord, (Handle, Handle))
API(CUresult, cuEventSynchronize, (Handle))
API(CUresult, cuEventElapsedTime_v2, (float*, Handle, Handle))
API(CUresult, cuEventDestroy_v2, (Handle))
API(CUresult, cuGetErrorName, (CUresult, const char**))
API(CUresult, cuMemAlloc_v2, (CUdeviceptr*, size_t))
API(CUresult, cuMemFree_v2, (CUdeviceptr))
API(CUresult, cuMemcpyHtoD_v2, (CUdeviceptr, const void*, size_t))
API(CUresult, cuMemcpyDtoH_v2, (void*, CUdeviceptr, size_t))
API(CUresult, cuMemHostAlloc, (void**, size_t, unsigned))
API(CUresult, cuMemFreeHost, (void*))
API(CUresult, cuStreamCreate, (Handle*, unsigned))
API(CUresult, cuStreamDestroy_v2, (Handle))
API(CUresult, cuStreamQuery, (Handle))
API(CUresult, cuStreamWaitEvent, (Handle, Handle, unsigned))
API(CUresult, cuEventQuery, (Handle))
API(CUresult, cuStreamBeginCapture_v2, (Handle, int))
API(CUresult, cuStreamEndCapture, (Handle, Handle*))
API(CUresult, cuStreamIsCapturing, (Handle, int*))
API(CUresult, cuGraphInstantiateWithFlags, (Handle*, Handle, unsigned long long))
API(CUresult, cuGraphLaunch, (Handle, Handle))
API(CUresult, cuGraphUpload, (Handle, Handle))
API(CUresult, cuGraphExecDestroy, (Handle))
API(CUresult, cuGraphDestroy, (Handle))
API(CUresult, cuLaunchHostFunc, (Handle, void (*)(void*), void*))
API(size_t, fake_cuda_counters_json, (char*, size_t))

// ---- checks inside a case ------------------------------------------------------------------------
int g_failures;
void fail(int line, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("  FAIL (selftest.cpp:%d): ", line);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    g_failures++;
}
#define EXPECT(expr, want)                                                                                   \
    do {                                                                                                     \
        CUresult r_ = (expr);                                                                                \
        if (r_ != (want)) fail(__LINE__, "%s returned %d, expected %d", #expr, r_, (int)(want));          \
    } while (0)
#define TRUE(cond, ...)                       \
    do {                                      \
        if (!(cond)) fail(__LINE__, __VA_ARGS__); \
    } while (0)

// ---- PTX for the kernels the cases launch: their real signatures and limits, empty bodies -------
// matmul_f32 names three module-scope .shared arrays (36,864 bytes, as nvcc's PTX), and
// crossentropy_forward_f32 has a demoted one and a .f32 parameter.
std::string mini_ptx(const char* target = "sm_90a", const char* version = "9.0", const char* encoder_params = nullptr,
                     const char* crossentropy_last = ".f32", const char* extra = "") {
    std::string s = "//\n// Generated by hand for the fake driver's self-test\n//\n\n.version ";
    s += version;
    s += "\n.target ";
    s += target;
    s += "\n.address_size 64\n\n";
    s += ".shared .align 128 .b8 mm_c_tile[17408];\n.shared .align 4 .b8 mm_a_tile[10240];\n"
         ".shared .align 4 .b8 mm_b_tile[9216];\n\n";
    s += ".visible .entry encoder_forward_f32(\n";
    s += encoder_params ? encoder_params
                        : "\t.param .u64 e0,\n\t.param .u64 e1,\n\t.param .u64 e2,\n\t.param .u64 e3,\n"
                          "\t.param .u32 e4,\n\t.param .u32 e5,\n\t.param .u32 e6\n";
    s += ")\n.maxntid 256, 1, 1\n{\n\tret;\n}\n\n";
    s += ".visible .entry matmul_f32(\n";
    for (int i = 0; i < 14; i++) {
        const bool is32 = i == 6 || i == 7 || i == 8 || i == 13;
        s += std::string("\t.param ") + (is32 ? ".u32" : ".u64") + " m" + std::to_string(i) + (i < 13 ? ",\n" : "\n");
    }
    s += ")\n.maxntid 128, 1, 1\n{\n\t.reg .b64 %rd<4>;\n\tmov.u64 %rd1, mm_c_tile;\n\tmov.u64 %rd2, mm_a_tile;\n"
         "\tcall.uni helper, ();\n\tret;\n}\n\n";
    s += ".func helper()\n{\n\tmov.u64 %rd3, mm_b_tile;\n\tret;\n}\n\n";
    s += ".visible .entry attention_forward_f32(\n\t.param .u64 a0,\n\t.param .u64 a1,\n\t.param .u64 a2,\n"
         "\t.param .u32 a3,\n\t.param .u32 a4,\n\t.param .u32 a5,\n\t.param .u32 a6\n)\n.maxntid 128, 1, 1\n"
         "{\n\tret;\n}\n\n";
    s += ".visible .entry crossentropy_forward_f32(\n\t.param .u64 c0,\n\t.param .u64 c1,\n\t.param .u64 c2,\n"
         "\t.param .u64 c3,\n\t.param .u32 c4,\n\t.param .u32 c5,\n\t.param .u32 c6,\n\t.param ";
    s += crossentropy_last;
    s += " c7\n)\n.maxntid 256, 1, 1\n{\n\t// demoted variable\n\t.shared .align 4 .b8 ce_scratch[128];\n"
         "\tst.shared.f32 [ce_scratch+4], %f1;\n\tret;\n}\n";
    s += extra;
    return s;
}

// ---- a session: context, module, and small helpers ------------------------------------------------
Handle g_ctx, g_module;
void open_device() {
    int dev = -1;
    EXPECT(cuInit(0u), OK);
    EXPECT(cuDeviceGet(&dev, 0), OK);
    EXPECT(cuDevicePrimaryCtxRetain(&g_ctx, dev), OK);
    EXPECT(cuCtxSetCurrent(g_ctx), OK);
}
void open_with_module(const std::string& ptx = mini_ptx()) {
    open_device();
    EXPECT(cuModuleLoadData(&g_module, ptx.c_str()), OK);
}
Handle function(const char* name) {
    Handle f = nullptr;
    EXPECT(cuModuleGetFunction(&f, g_module, name), OK);
    return f;
}
CUdeviceptr alloc(size_t bytes) {
    CUdeviceptr p = 0;
    EXPECT(cuMemAllocAsync(&p, bytes, (Handle) nullptr), OK);
    return p;
}
template <typename T>
CUdeviceptr upload(const std::vector<T>& v) {
    CUdeviceptr p = alloc(v.size() * sizeof(T));
    EXPECT(cuMemcpyHtoDAsync_v2(p, v.data(), v.size() * sizeof(T), (Handle) nullptr), OK);
    return p;
}

// encoder_forward_f32: out[n, c] = wte[inp[n], c] + wpe[n % T, c], launched as ops.rs does.
struct Encoder {
    int N = 14, T = 7, C = 33, V = 50;
    std::vector<float> wte, wpe;
    std::vector<int> tokens;
    CUdeviceptr out = 0, inp = 0, d_wte = 0, d_wpe = 0;
    void* args[7];
    Encoder() {
        for (int i = 0; i < V * C; i++) wte.push_back((float)i / 7);
        for (int i = 0; i < T * C; i++) wpe.push_back((float)i / 3);
        for (int i = 0; i < N; i++) tokens.push_back(i * 13 % V);
    }
    void upload_all(size_t out_bytes = 0, size_t inp_bytes = 0) {
        out = alloc(out_bytes ? out_bytes : 4 * N * C);
        inp = alloc(inp_bytes ? inp_bytes : 4 * N);
        EXPECT(cuMemcpyHtoDAsync_v2(inp, tokens.data(), std::min(inp_bytes ? inp_bytes : 4 * N, 4 * tokens.size()),
                                    (Handle) nullptr),
               OK);
        d_wte = upload(wte);
        d_wpe = upload(wpe);
    }
    CUresult launch(unsigned grid, unsigned block = 256, unsigned gy = 1, unsigned gz = 1, unsigned smem = 0) {
        void* a[7] = {&out, &inp, &d_wte, &d_wpe, &N, &T, &C};
        memcpy(args, a, sizeof a);
        return cuLaunchKernel(function("encoder_forward_f32"), grid, gy, gz, block, 1u, 1u, smem, (Handle) nullptr,
                              args, (void**)nullptr);
    }
    unsigned grid() const { return (unsigned)(N * C + 255) / 256; }
    int wrong() {
        std::vector<float> got(N * C);
        EXPECT(cuMemcpyDtoHAsync_v2(got.data(), out, 4 * got.size(), (Handle) nullptr), OK);
        int bad = 0;
        for (int n = 0; n < N; n++)
            for (int c = 0; c < C; c++) bad += got[n * C + c] != wte[tokens[n] * C + c] + wpe[(n % T) * C + c];
        return bad;
    }
};

// matmul_f32 (out = a·b + bias, row-major) through the fake, against a double loop.
double matmul_error(int M, int N, int K) {
    std::vector<float> a(M * K), b(K * N), bias(N), c(M * N);
    for (int i = 0; i < M * K; i++) a[i] = (float)((i * 37 % 17) - 8) / 8;
    for (int i = 0; i < K * N; i++) b[i] = (float)((i * 11 % 13) - 6) / 8;
    for (int i = 0; i < N; i++) bias[i] = (float)i / N;
    CUdeviceptr da = upload(a), db = upload(b), dbias = upload(bias), dc = alloc(4 * M * N), null = 0;
    long long ars = K, acs = 1, brs = N, bcs = 1;
    int accumulate = 0;
    void* p[] = {&dc, &da, &db, &dbias, &null, &null, &M, &N, &K, &ars, &acs, &brs, &bcs, &accumulate};
    EXPECT(cuLaunchKernel(function("matmul_f32"), (unsigned)(N + 63) / 64, (unsigned)(M + 63) / 64, 1u, 128u, 1u, 1u,
                          0u, (Handle) nullptr, p, (void**)nullptr),
           OK);
    EXPECT(cuStreamSynchronize((Handle) nullptr), OK);
    EXPECT(cuMemcpyDtoHAsync_v2(c.data(), dc, 4 * c.size(), (Handle) nullptr), OK);
    double worst = 0, scale = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double want = bias[j];
            for (int k = 0; k < K; k++) want += (double)a[i * K + k] * b[k * N + j];
            worst = fmax(worst, fabs(c[i * N + j] - want));
            scale = fmax(scale, fabs(want));
        }
    for (CUdeviceptr q : {da, db, dbias, dc}) EXPECT(cuMemFreeAsync(q, (Handle) nullptr), OK);
    return worst / scale;
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

// ---- the cases -------------------------------------------------------------------------------------
const char* g_ptx_dir;
std::string g_tmp;  // a scratch directory for files the cases write

void case_launches() {
    open_with_module();
    int v = -1;
    EXPECT(cuFuncGetAttribute(&v, 1, function("matmul_f32")), OK);  // SHARED_SIZE_BYTES
    TRUE(v == 36864, "matmul_f32 static shared memory %d, expected 36864 (incl. the .func's)", v);
    EXPECT(cuFuncGetAttribute(&v, 0, function("matmul_f32")), OK);  // MAX_THREADS_PER_BLOCK
    TRUE(v == 128, "matmul_f32 max threads %d, expected 128", v);
    EXPECT(cuFuncGetAttribute(&v, 1, function("crossentropy_forward_f32")), OK);
    TRUE(v == 128, "crossentropy_forward_f32 static shared memory %d, expected 128 (demoted)", v);
    EXPECT(cuFuncGetAttribute(&v, 8, function("matmul_f32")), OK);  // MAX_DYNAMIC_SHARED_SIZE_BYTES
    TRUE(v == 49152 - 36864, "matmul_f32 default dynamic shared memory limit %d, expected %d", v, 49152 - 36864);
    Encoder e;
    e.upload_all();
    EXPECT(cuMemsetD8Async(e.out, 0xff, 4 * e.N * e.C, (Handle) nullptr), OK);
    EXPECT(e.launch(e.grid()), OK);
    EXPECT(cuStreamSynchronize((Handle) nullptr), OK);
    const int bad = e.wrong();
    TRUE(bad == 0, "encoder_forward_f32: %d of %d outputs wrong", bad, e.N * e.C);
    const double err = matmul_error(70, 100, 50);
    TRUE(err < 2e-6, "matmul_f32 70x100x50: relative error %.2e", err);
    printf("  encoder_forward_f32 exact, matmul_f32 70x100x50 relative error %.1e\n", err);
    char json[4096];
    fake_cuda_counters_json(json, sizeof json);
    TRUE(strstr(json, "\"launches\": 2,") != nullptr, "counters: %s", json);
}

void case_block_too_big() {
    open_with_module();
    Encoder e;
    e.upload_all();
    EXPECT(e.launch(e.grid(), 2048), INVALID_VALUE);
    EXPECT(e.launch(e.grid(), 512), LAUNCH_OUT_OF_RESOURCES);  // __launch_bounds__(256)
    EXPECT(e.launch(e.grid(), 256), OK);                       // not sticky
}

void case_grid_too_big() {
    open_with_module();
    Encoder e;
    e.upload_all();
    EXPECT(e.launch(e.grid(), 256, 65536), INVALID_VALUE);
    EXPECT(e.launch(e.grid(), 256, 1, 65536), INVALID_VALUE);
    EXPECT(e.launch(2147483648u), INVALID_VALUE);
    EXPECT(e.launch(e.grid(), 256, 2, 3), OK);
}

void case_dynamic_smem() {
    open_with_module();
    Encoder e;
    e.upload_all();
    Handle mm = function("matmul_f32"), enc = function("encoder_forward_f32");
    EXPECT(e.launch(e.grid(), 256, 1, 1, 49152), OK);  // 48 KiB without opting in
    EXPECT(e.launch(e.grid(), 256, 1, 1, 49153), INVALID_VALUE);
    EXPECT(cuFuncSetAttribute(enc, 8, 100000), OK);
    EXPECT(e.launch(e.grid(), 256, 1, 1, 100000), OK);
    EXPECT(e.launch(e.grid(), 256, 1, 1, 100001), INVALID_VALUE);
    EXPECT(cuFuncSetAttribute(enc, 8, 232448), OK);        // 227 KiB on sm_90
    EXPECT(cuFuncSetAttribute(enc, 8, 232449), INVALID_VALUE);
    EXPECT(cuFuncSetAttribute(mm, 8, 232448 - 36864), OK);  // static + dynamic
    EXPECT(cuFuncSetAttribute(mm, 8, 232448 - 36864 + 1), INVALID_VALUE);
    EXPECT(e.launch(e.grid(), 256, 1, 1, 232449), INVALID_VALUE);
    // The launches that ran had their dynamic shared memory allocated by the emulator (what
    // FINCH_DYNAMIC_SMEM in kernels/tensorcore.cuh points at; tools/kernel-emu/tensorcore.cpp tests
    // that a kernel sees exactly that many bytes, poisoned per block).
    char json[4096];
    fake_cuda_counters_json(json, sizeof json);
    TRUE(strstr(json, "\"encoder_forward_f32\": {\"launches\": 2,") != nullptr &&
             strstr(json, "\"max_dynamic_smem\": 100000}") != nullptr,
         "counters: %s", json);
}

void case_bad_pointers_host() {
    open_with_module();
    Encoder e;
    e.upload_all();
    e.d_wte = (CUdeviceptr)(uintptr_t)e.wte.data();  // a host pointer
    EXPECT(e.launch(e.grid()), ILLEGAL_ADDRESS);
    // The context is dead after a fault, as on a GPU.
    EXPECT(cuStreamSynchronize((Handle) nullptr), ILLEGAL_ADDRESS);
    EXPECT(cuMemcpyHtoDAsync_v2(e.inp, e.tokens.data(), 4, (Handle) nullptr), ILLEGAL_ADDRESS);
}

void case_bad_pointers_misaligned() {
    open_with_module();
    Encoder e;
    e.upload_all();
    e.d_wte += 2;  // a float* must be 4-byte aligned
    EXPECT(e.launch(e.grid()), MISALIGNED_ADDRESS);
}

void case_bad_pointers_freed() {
    open_with_module();
    Encoder e;
    e.upload_all();
    EXPECT(cuMemFreeAsync(e.d_wpe, (Handle) nullptr), OK);
    EXPECT(e.launch(e.grid()), ILLEGAL_ADDRESS);
}

void case_copies() {
    open_with_module();
    Encoder e;
    e.upload_all();
    std::vector<char> host(4096);
    const size_t n = 4 * e.N;
    EXPECT(cuMemcpyHtoDAsync_v2(e.inp, host.data(), n + 4, (Handle) nullptr), INVALID_VALUE);
    EXPECT(cuMemcpyDtoHAsync_v2(host.data(), e.inp + 8, n, (Handle) nullptr), INVALID_VALUE);
    EXPECT(cuMemsetD8Async(e.inp, 0, n + 1, (Handle) nullptr), INVALID_VALUE);
    EXPECT(cuMemcpyDtoDAsync_v2(e.out, e.inp, n + 4, (Handle) nullptr), INVALID_VALUE);
    EXPECT(cuMemcpyHtoDAsync_v2(e.inp, host.data(), n, (Handle) nullptr), OK);  // exactly the size
    EXPECT(cuMemFreeAsync(e.inp, (Handle) nullptr), OK);
    EXPECT(cuMemcpyHtoDAsync_v2(e.inp, host.data(), 4, (Handle) nullptr), INVALID_VALUE);  // after free
    EXPECT(cuMemFreeAsync(e.inp, (Handle) nullptr), INVALID_VALUE);                         // double free
    EXPECT(cuMemFreeAsync(e.out + 4, (Handle) nullptr), INVALID_VALUE);                     // not a start
    CUdeviceptr none = 0;
    EXPECT(cuMemAllocAsync(&none, (size_t)0, (Handle) nullptr), INVALID_VALUE);
}

void case_signature() {
    open_device();
    Handle m = nullptr;
    // One parameter fewer than the C++ source.
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "9.0",
                                         "\t.param .u64 e0,\n\t.param .u64 e1,\n\t.param .u64 e2,\n\t.param .u64 e3,\n"
                                         "\t.param .u32 e4,\n\t.param .u32 e5\n")
                                    .c_str()),
           INVALID_IMAGE);
    // An int where the source has a long long.
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "9.0",
                                         "\t.param .u64 e0,\n\t.param .u64 e1,\n\t.param .u64 e2,\n\t.param .u64 e3,\n"
                                         "\t.param .u32 e4,\n\t.param .u32 e5,\n\t.param .u64 e6\n")
                                    .c_str()),
           INVALID_IMAGE);
    // An integer where the source has a float.
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "9.0", nullptr, ".u32").c_str()), INVALID_IMAGE);
    // A kernel the fake was not built with.
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "9.0", nullptr, ".f32",
                                         ".visible .entry no_such_kernel(\n\t.param .u64 x\n)\n{\n\tret;\n}\n")
                                    .c_str()),
           INVALID_IMAGE);
    EXPECT(cuModuleLoadData(&m, mini_ptx().c_str()), OK);
    Handle f = nullptr;
    EXPECT(cuModuleGetFunction(&f, m, "no_such_kernel"), NOT_FOUND);
    EXPECT(cuModuleLoadData(&m, "\x7f" "ELF\x02\x01\x01"), NOT_SUPPORTED);
    EXPECT(cuModuleLoadData(&m, "not ptx at all"), INVALID_PTX);
}

void case_ptx_version() {
    open_device();
    Handle m = nullptr;
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "9.1").c_str()), UNSUPPORTED_PTX_VERSION);
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "10.0").c_str()), UNSUPPORTED_PTX_VERSION);
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a", "8.8").c_str()), OK);
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_80", "9.0").c_str()), OK);  // portable PTX runs on 9.0
}

void case_cc80() {  // FAKE_CUDA_CC=8.0
    open_device();
    int v = -1;
    EXPECT(cuDeviceGetAttribute(&v, 75, 0), OK);
    TRUE(v == 8, "major %d", v);
    EXPECT(cuDeviceGetAttribute(&v, 76, 0), OK);
    TRUE(v == 0, "minor %d", v);
    EXPECT(cuDeviceGetAttribute(&v, 97, 0), OK);
    TRUE(v == 166912, "opt-in shared memory %d, expected 166912 (163 KiB)", v);
    EXPECT(cuDeviceGetAttribute(&v, 16, 0), OK);
    TRUE(v == 108, "SMs %d", v);
    Handle m = nullptr;
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90a").c_str()), INVALID_PTX);
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_90").c_str()), INVALID_PTX);
    EXPECT(cuModuleLoadData(&m, mini_ptx("sm_86").c_str()), INVALID_PTX);
    EXPECT(cuModuleLoadData(&g_module, mini_ptx("sm_80").c_str()), OK);
    Handle enc = function("encoder_forward_f32");
    EXPECT(cuFuncSetAttribute(enc, 8, 166912), OK);
    EXPECT(cuFuncSetAttribute(enc, 8, 166913), INVALID_VALUE);
    char name[128];
    EXPECT(cuDeviceGetName(name, 128, 0), OK);
    TRUE(strstr(name, "sm_80") != nullptr, "name %s", name);
}

void case_cc90() {  // the default
    open_device();
    int v = -1;
    EXPECT(cuDeviceGetAttribute(&v, 75, 0), OK);
    TRUE(v == 9, "major %d", v);
    EXPECT(cuDeviceGetAttribute(&v, 76, 0), OK);
    TRUE(v == 0, "minor %d", v);
    EXPECT(cuDeviceGetAttribute(&v, 97, 0), OK);
    TRUE(v == 232448, "opt-in shared memory %d, expected 232448 (227 KiB)", v);
    EXPECT(cuDeviceGetAttribute(&v, 115, 0), OK);
    TRUE(v == 1, "memory pools %d", v);
    EXPECT(cuDeviceGetAttribute(&v, 9999, 0), INVALID_VALUE);
}

void case_bad_cc() {  // FAKE_CUDA_CC=5.2
    EXPECT(cuInit(0u), INVALID_VALUE);
}

void case_not_initialised() {
    int n = 0;
    EXPECT(cuDeviceGetCount(&n), NOT_INITIALIZED);
    EXPECT(cuInit(0u), OK);
    EXPECT(cuDeviceGetCount(&n), OK);
    TRUE(n == 1, "%d devices", n);
}

void case_devices() {  // FAKE_CUDA_DEVICES=3
    int n = 0, d = -1, used = -1;
    EXPECT(cuInit(0u), OK);
    EXPECT(cuDeviceGetCount(&n), OK);
    TRUE(n == 3, "%d devices", n);
    EXPECT(cuDeviceGet(&d, 3), INVALID_DEVICE);
    EXPECT(cuDeviceGet(&d, 2), OK);
    TRUE(d == 2, "device %d", d);
    EXPECT(cuDevicePrimaryCtxRetain(&g_ctx, 2), OK);
    EXPECT(cuCtxSetCurrent(g_ctx), OK);
    EXPECT(cuCtxGetDevice(&used), OK);
    TRUE(used == 2, "the context's device is %d", used);
    Handle other = nullptr;
    EXPECT(cuDevicePrimaryCtxRetain(&other, 1), NOT_SUPPORTED);
}

void case_memory_limit() {  // FAKE_CUDA_MEM_MB=64
    open_device();
    size_t free_b = 0, total = 0;
    EXPECT(cuMemGetInfo_v2(&free_b, &total), OK);
    TRUE(total == 64u << 20 && free_b == total, "memory %zu free of %zu", free_b, total);
    CUdeviceptr big = alloc(60u << 20), more = 0;
    EXPECT(cuMemGetInfo_v2(&free_b, &total), OK);
    TRUE(free_b == 4u << 20, "%zu free after 60 MiB", free_b);
    EXPECT(cuMemAllocAsync(&more, (size_t)8 << 20, (Handle) nullptr), OUT_OF_MEMORY);
    EXPECT(cuMemFreeAsync(big, (Handle) nullptr), OK);
    EXPECT(cuMemAllocAsync(&more, (size_t)8 << 20, (Handle) nullptr), OK);
}

void case_counters() {  // FAKE_CUDA_COUNTERS=<file>
    open_with_module();
    Encoder e;
    e.upload_all();  // 4 allocations, 3 uploads
    EXPECT(cuMemsetD8Async(e.out, 0, 4 * e.N * e.C, (Handle) nullptr), OK);
    EXPECT(e.launch(e.grid()), OK);
    EXPECT(cuStreamSynchronize((Handle) nullptr), OK);
    TRUE(e.wrong() == 0, "wrong results");  // 1 download
    EXPECT(cuStreamSynchronize((Handle) nullptr), OK);
    EXPECT(cuCtxSynchronize(), OK);
    Handle a, b;
    float ms = -1;
    EXPECT(cuEventCreate(&a, 0u), OK);
    EXPECT(cuEventCreate(&b, 0u), OK);
    EXPECT(cuEventRecord(a, (Handle) nullptr), OK);
    EXPECT(cuEventRecord(b, (Handle) nullptr), OK);
    EXPECT(cuEventSynchronize(b), OK);
    EXPECT(cuEventElapsedTime_v2(&ms, a, b), OK);
    TRUE(ms >= 0, "elapsed %f ms", ms);
    EXPECT(cuEventDestroy_v2(a), OK);
    EXPECT(cuEventDestroy_v2(b), OK);
    EXPECT(cuMemFreeAsync(e.out, (Handle) nullptr), OK);
}
void case_counters_stderr() {  // FAKE_CUDA_COUNTERS=1
    open_with_module();
    Encoder e;
    e.upload_all();
    EXPECT(e.launch(e.grid()), OK);
}

void case_log() {  // FAKE_CUDA_LOG=<file>
    open_with_module();
    Encoder e;
    e.upload_all();
    EXPECT(e.launch(e.grid()), OK);
    EXPECT(e.launch(e.grid(), 2048), INVALID_VALUE);
}

// Out-of-bounds accesses: these children must die, naming kernel, block, thread and allocation.
void case_oob_write_guard() {
    open_with_module();
    Encoder e;
    e.upload_all(4096);  // 1024 floats (a whole page: it ends at the guard page)
    e.N = 40;            // then write 40 × 33 = 1320 of them
    e.tokens.assign(40, 1);
    e.inp = upload(e.tokens);
    e.launch(e.grid());
    fail(__LINE__, "the out-of-bounds write did not abort");
}
void case_oob_read_guard() {
    open_with_module();
    Encoder e;
    e.N = 100;  // reads inp[0..99] from a 64-int (256-byte) buffer
    e.tokens.assign(100, 1);
    e.upload_all(4 * 100 * 33, 256);
    e.launch(e.grid());
    fail(__LINE__, "the out-of-bounds read did not abort");
}
void* oob_thread(void*) {
    case_oob_read_guard();
    return nullptr;
}
void case_oob_in_thread() {  // the reporter needs an alternate signal stack on every launching thread
    pthread_t t;
    pthread_create(&t, nullptr, oob_thread, nullptr);
    pthread_join(t, nullptr);
}
void case_oob_write_slack() {
    open_with_module();
    Encoder e;
    e.upload_all(4 * e.N * e.C - 8);  // 1840 bytes (slack to 2048): the last 2 floats land in the slack
    e.launch(e.grid());
    fail(__LINE__, "the out-of-bounds write into the slack was not reported");
}
// A __shared__ array indexed out of bounds (the default build has -fsanitize=bounds): attention
// with a head dimension above the kernel's maximum of 128 overruns its tiles.
void case_shared_bounds() {
    open_with_module();
    int B = 1, T = 16, C = 136, NH = 1;
    CUdeviceptr out = alloc(4 * T * C), lse = alloc(4 * T), qkv = alloc(4 * T * 3 * C);
    EXPECT(cuMemsetD8Async(qkv, 0, 4 * T * 3 * C, (Handle) nullptr), OK);
    void* p[] = {&out, &lse, &qkv, &B, &T, &C, &NH};
    cuLaunchKernel(function("attention_forward_f32"), 1u, 1u, 1u, 128u, 1u, 1u, 0u, (Handle) nullptr, p, (void**)nullptr);
    fail(__LINE__, "the out-of-bounds shared-memory index was not reported");
}
void case_host_access() {
    open_device();
    CUdeviceptr p = alloc(1024);
    volatile char* host = (volatile char*)(uintptr_t)p;
    printf("  (reading the guard page from the host)\n");
    fflush(stdout);
    (void)host[1024];
    fail(__LINE__, "the host read past the allocation did not abort");
}
void case_not_ours() {
    open_device();
    volatile int* null = nullptr;
    (void)*(null + 1);  // not device memory, not in a launch: the default action (SIGSEGV)
    fail(__LINE__, "a NULL dereference did not crash");
}

// Host threads at once (cargo test runs tests in parallel threads): the fake serialises them.
void* thread_main(void* arg) {
    EXPECT(cuCtxSetCurrent(g_ctx), OK);
    const int m = 33 + (int)(intptr_t)arg;
    const double err = matmul_error(m, 70, 40);
    TRUE(err < 2e-6, "thread %d: matmul_f32 error %.2e", (int)(intptr_t)arg, err);
    return nullptr;
}
void case_threads() {
    open_with_module();
    pthread_t t[3];
    for (intptr_t i = 0; i < 3; i++) pthread_create(&t[i], nullptr, thread_main, (void*)i);
    for (auto& x : t) pthread_join(x, nullptr);
}

// cudarc's probe: dlopen by name (LD_LIBRARY_PATH), dlclose, then the real load.
void case_probe_reload() {
    void* probe = dlopen("libcuda.so", RTLD_LAZY | RTLD_LOCAL);
    TRUE(probe != nullptr, "dlopen(\"libcuda.so\") through LD_LIBRARY_PATH failed: %s", dlerror());
    if (probe) dlclose(probe);
    open_with_module();
    Encoder e;
    e.upload_all();
    EXPECT(e.launch(e.grid()), OK);
    TRUE(e.wrong() == 0, "wrong results after a reload");
}

// The real nvcc PTX (selftest.sh compiles kernels/*.cu as build.rs does): every entry loads, has
// the C++ source's parameters, and the fake's static shared memory equals ptxas -v's.
void case_real_ptx() {
    open_device();
    std::map<std::string, int> ptxas;  // "sm_90a NAME" -> bytes
    {
        const std::string report = read_file(std::string(g_ptx_dir) + "/ptxas.txt");
        std::string name, arch;
        size_t pos = 0;
        while (pos < report.size()) {
            size_t eol = report.find('\n', pos);
            if (eol == std::string::npos) eol = report.size();
            const std::string line = report.substr(pos, eol - pos);
            pos = eol + 1;
            if (size_t q = line.find("Compiling entry function '"); q != std::string::npos) {
                const size_t a = q + 26, b = line.find('\'', a), c = line.find('\'', b + 1), d = line.find('\'', c + 1);
                name = line.substr(a, b - a);
                arch = line.substr(c + 1, d - c - 1);
                ptxas[arch + " " + name] = 0;  // ptxas leaves out "0 bytes smem"
            } else if (size_t s = line.find(" bytes smem"); s != std::string::npos && !name.empty()) {
                const size_t comma = line.rfind(',', s);
                ptxas[arch + " " + name] = atoi(line.c_str() + comma + 1);
            }
        }
    }
    DIR* dir = opendir(g_ptx_dir);
    TRUE(dir != nullptr, "no directory %s", g_ptx_dir);
    if (!dir) return;
    int entries = 0, compared = 0;
    while (dirent* de = readdir(dir)) {
        const std::string file = de->d_name;
        if (file.size() < 4 || file.substr(file.size() - 4) != ".ptx") continue;
        const std::string text = read_file(std::string(g_ptx_dir) + "/" + file);
        const std::string arch = file.find("compute_90a") != std::string::npos ? "sm_90a" : "sm_80";
        Handle m = nullptr;
        EXPECT(cuModuleLoadData(&m, text.c_str()), OK);
        if (!m) {
            printf("  %s did not load\n", file.c_str());
            continue;
        }
        for (size_t q = text.find(".visible .entry "); q != std::string::npos; q = text.find(".visible .entry ", q + 1)) {
            const size_t a = q + 16, b = text.find('(', a);
            const std::string name = text.substr(a, b - a);
            Handle f = nullptr;
            EXPECT(cuModuleGetFunction(&f, m, name.c_str()), OK);
            int smem = -1, threads = -1;
            EXPECT(cuFuncGetAttribute(&smem, 1, f), OK);
            EXPECT(cuFuncGetAttribute(&threads, 0, f), OK);
            entries++;
            auto it = ptxas.find(arch + " " + name);
            if (it != ptxas.end()) {
                compared++;
                TRUE(it->second == smem, "%s %s: %d bytes of static shared memory, ptxas says %d", arch.c_str(),
                     name.c_str(), smem, it->second);
            }
        }
        EXPECT(cuModuleUnload(m), OK);
    }
    closedir(dir);
    TRUE(entries > 0, "no .ptx files in %s", g_ptx_dir);
    printf("  %d entries loaded from the real PTX; static shared memory equals ptxas -v for %d of them\n", entries,
           compared);
}

// ---- page-locked memory, streams, capture and graphs -------------------------------------------------
// f32_to_floatx_bf16(bf16* out, const float* in, long long n), from kernels/optimizer.cu: the
// kernel the capture cases record between their copies.
const char* kConvertPtx =
    "\n.visible .entry f32_to_floatx_bf16(\n\t.param .u64 v0,\n\t.param .u64 v1,\n\t.param .u64 v2\n)\n"
    ".maxntid 256, 1, 1\n{\n\tret;\n}\n";

// bf16 of an f32 that bf16 holds exactly (the cases' values): its upper 16 bits.
uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)(u >> 16);
}

// A training step in miniature, as finch's captured step does it: upload from page-locked memory,
// a kernel, download into page-locked memory, all on a created non-blocking stream.
struct Step {
    static constexpr int N = 1000;
    Handle stream = nullptr;
    float* in = nullptr;     // page-locked, N floats
    uint16_t* out = nullptr; // page-locked, N bf16
    CUdeviceptr d_in = 0, d_out = 0;
    // What the launch's kernelParams point at: the values are copied when the launch is captured.
    CUdeviceptr arg_out = 0, arg_in = 0;
    long long count = 600;  // elements the launch converts (of N)
    Handle graph = nullptr, exec = nullptr;
    void setup() {
        open_with_module(mini_ptx("sm_90a", "9.0", nullptr, ".f32", kConvertPtx));
        EXPECT(cuStreamCreate(&stream, 1u), OK);  // CU_STREAM_NON_BLOCKING, as cudarc's new_stream
        EXPECT(cuMemHostAlloc((void**)&in, (size_t)4 * N, 0u), OK);
        EXPECT(cuMemHostAlloc((void**)&out, (size_t)2 * N, 4u), OK);  // CU_MEMHOSTALLOC_WRITECOMBINED
        d_in = alloc(4 * N);
        d_out = alloc(2 * N);
        arg_out = d_out, arg_in = d_in;
    }
    CUresult launch(unsigned block = 256) {
        void* args[3] = {&arg_out, &arg_in, &count};
        return cuLaunchKernel(function("f32_to_floatx_bf16"), (unsigned)(N + 255) / 256, 1u, 1u, block, 1u, 1u, 0u,
                              stream, args, (void**)nullptr);
    }
    void record() {
        EXPECT(cuMemcpyHtoDAsync_v2(d_in, in, (size_t)4 * N, stream), OK);
        EXPECT(launch(), OK);
        EXPECT(cuMemcpyDtoHAsync_v2(out, d_out, (size_t)2 * N, stream), OK);
    }
    void capture() {
        EXPECT(cuStreamBeginCapture_v2(stream, MODE_GLOBAL), OK);
        record();
        EXPECT(cuStreamEndCapture(stream, &graph), OK);
        EXPECT(cuGraphInstantiateWithFlags(&exec, graph, 0ull), OK);
    }
    void fill(int r) {
        for (int i = 0; i < N; i++) in[i] = (float)(i % 50 - 25) * 0.25f + (float)r;
    }
    // out after a run on fill(r): the first 600 converted, the rest untouched (0xFF from allocation).
    int wrong(int r) const {
        int bad = 0;
        for (int i = 0; i < N; i++) bad += out[i] != (i < 600 ? bf16_bits((float)(i % 50 - 25) * 0.25f + (float)r) : 0xffff);
        return bad;
    }
    void begin(int mode = MODE_GLOBAL) { EXPECT(cuStreamBeginCapture_v2(stream, mode), OK); }
    // A capture a refusal invalidated: it says so, takes no more work, and ends without a graph.
    void invalidated(const char* after, Handle s = nullptr) {
        if (!s) s = stream;
        int status = -1;
        if (cuStreamIsCapturing(s, &status) != OK || status != 2)
            fail(__LINE__, "after %s: capture status %d, expected 2 (invalidated)", after, status);
        if (cuMemsetD8Async(d_out, (unsigned char)0, (size_t)2, s) != CAPTURE_INVALIDATED)
            fail(__LINE__, "after %s: work on the invalidated capture was not refused", after);
        Handle got = (Handle)1;
        if (cuStreamEndCapture(s, &got) != CAPTURE_INVALIDATED || got != nullptr)
            fail(__LINE__, "after %s: cuStreamEndCapture did not return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED and no graph",
                 after);
        if (cuStreamIsCapturing(s, &status) != OK || status != 0)
            fail(__LINE__, "after %s: the stream still captures (status %d)", after, status);
    }
};

bool json_has(const char* want) {
    char json[8192];
    fake_cuda_counters_json(json, sizeof json);
    if (strstr(json, want)) return true;
    printf("  counters lack %s:\n  %s\n", want, json);
    return false;
}

void case_pinned() {
    open_device();
    void *a = nullptr, *b = nullptr, *none = nullptr;
    EXPECT(cuMemHostAlloc(&a, (size_t)4096, 0u), OK);
    EXPECT(cuMemHostAlloc(&b, (size_t)100, 7u), OK);  // PORTABLE | DEVICEMAP | WRITECOMBINED
    TRUE(a && (uintptr_t)a % 4096 == 0 && b && (uintptr_t)b % 4096 == 0, "page-locked memory at %p, %p", a, b);
    TRUE(((unsigned char*)a)[4095] == 0xff && ((unsigned char*)b)[99] == 0xff, "fresh page-locked memory is not 0xFF");
    memset(a, 1, 4096);  // the host may use it
    EXPECT(cuMemHostAlloc(&none, (size_t)64, 8u), INVALID_VALUE);
    EXPECT(cuMemHostAlloc(&none, (size_t)0, 0u), INVALID_VALUE);
    EXPECT(cuMemHostAlloc((void**)nullptr, (size_t)64, 0u), INVALID_VALUE);
    int local = 0;
    CUdeviceptr device = alloc(256);
    EXPECT(cuMemFreeHost((char*)a + 16), INVALID_VALUE);  // not the start
    EXPECT(cuMemFreeHost((void*)&local), INVALID_VALUE);   // pageable memory
    EXPECT(cuMemFreeHost((void*)(uintptr_t)device), INVALID_VALUE);
    EXPECT(cuMemFreeHost(a), OK);
    EXPECT(cuMemFreeHost(a), INVALID_VALUE);  // double free
    TRUE(json_has("\"pinned\": {\"allocs\": 2, \"alloc_bytes\": 4196, \"frees\": 1, \"live_bytes\": 100}"), "counters");
}

// The step captured once and replayed 3 times, the page-locked input refilled before each replay;
// the launch's argument values are the ones at capture time.
void case_graph_replay() {
    Step t;
    t.setup();
    int status = -1;
    EXPECT(cuStreamIsCapturing(t.stream, &status), OK);
    TRUE(status == 0, "capture status %d before capture", status);
    t.fill(7);
    EXPECT(cuStreamBeginCapture_v2(t.stream, MODE_GLOBAL), OK);
    EXPECT(cuStreamIsCapturing(t.stream, &status), OK);
    TRUE(status == 1, "capture status %d during capture", status);
    t.record();
    EXPECT(cuStreamEndCapture(t.stream, &t.graph), OK);
    TRUE(t.graph != nullptr, "no graph");
    // Nothing ran while capturing.
    TRUE(t.out[0] == 0xffff && json_has("\"launches\": 0,") && json_has("\"htod\": {\"count\": 0,"),
         "work ran during the capture");
    // The host variables the launch pointed at change (or die): the graph keeps the captured values.
    t.count = 1000;
    t.arg_out = t.arg_in = 0;
    EXPECT(cuGraphInstantiateWithFlags(&t.exec, t.graph, 0ull), OK);
    EXPECT(cuGraphDestroy(t.graph), OK);  // the exec keeps its own copy
    EXPECT(cuGraphUpload(t.exec, t.stream), OK);
    for (int r = 0; r < 3; r++) {
        t.fill(r);  // the copy node reads the page-locked input when the graph runs
        EXPECT(cuGraphLaunch(t.exec, t.stream), OK);
        EXPECT(cuStreamSynchronize(t.stream), OK);
        const int bad = t.wrong(r);
        TRUE(bad == 0, "replay %d: %d of %d outputs wrong (out[0] %#x, out[600] %#x)", r, bad, Step::N, t.out[0],
             t.out[600]);
    }
    for (const char* want :
         {"\"launches\": 3, \"per_kernel\": {\"f32_to_floatx_bf16\": {\"launches\": 3, \"blocks\": 12, \"threads\": 3072,",
          "\"htod\": {\"count\": 3, \"bytes\": 12000}", "\"dtoh\": {\"count\": 3, \"bytes\": 6000}",
          "\"syncs\": {\"total\": 3, \"stream\": 3, \"context\": 0, \"event\": 0, \"blocking_copies\": 0}",
          "\"graphs\": {\"captures\": 1, \"instantiated\": 1, \"launches\": 3, \"uploads\": 1, \"replayed_launches\": 3, "
          "\"replayed_copies\": 6, \"replayed_memsets\": 0}",
          "\"pinned\": {\"allocs\": 2, \"alloc_bytes\": 6000, \"frees\": 0, \"live_bytes\": 6000}",
          "\"host_copies\": {\"pinned\": 6, \"pinned_bytes\": 18000, \"pageable\": 0, \"pageable_bytes\": 0}",
          "\"errors\": 0"})
        TRUE(json_has(want), "counters");
    EXPECT(cuGraphExecDestroy(t.exec), OK);
    EXPECT(cuGraphLaunch(t.exec, t.stream), INVALID_VALUE);  // destroyed
    EXPECT(cuStreamDestroy_v2(t.stream), OK);
}

// Work forked to a second stream through an event and joined back is captured as one graph.
void case_graph_fork_join() {
    Step t;
    t.setup();
    Handle side = nullptr, forked = nullptr, joined = nullptr;
    EXPECT(cuStreamCreate(&side, 1u), OK);
    EXPECT(cuEventCreate(&forked, 2u), OK);  // CU_EVENT_DISABLE_TIMING, as cudarc's default
    EXPECT(cuEventCreate(&joined, 2u), OK);
    t.begin();
    EXPECT(cuMemcpyHtoDAsync_v2(t.d_in, t.in, (size_t)4 * Step::N, t.stream), OK);
    EXPECT(cuEventRecord(forked, t.stream), OK);
    EXPECT(cuStreamWaitEvent(side, forked, 0u), OK);  // side joins the capture
    int status = -1;
    EXPECT(cuStreamIsCapturing(side, &status), OK);
    TRUE(status == 1, "the forked stream's capture status is %d", status);
    std::swap(t.stream, side);
    EXPECT(t.launch(), OK);  // on the forked stream
    std::swap(t.stream, side);
    EXPECT(cuEventRecord(joined, side), OK);
    EXPECT(cuStreamWaitEvent(t.stream, joined, 0u), OK);
    EXPECT(cuMemcpyDtoHAsync_v2(t.out, t.d_out, (size_t)2 * Step::N, t.stream), OK);
    EXPECT(cuStreamEndCapture(t.stream, &t.graph), OK);
    EXPECT(cuStreamIsCapturing(side, &status), OK);
    TRUE(status == 0, "the forked stream still captures (status %d)", status);
    EXPECT(cuGraphInstantiateWithFlags(&t.exec, t.graph, 1ull), OK);  // AUTO_FREE_ON_LAUNCH
    t.fill(5);
    EXPECT(cuGraphLaunch(t.exec, t.stream), OK);
    EXPECT(cuStreamSynchronize(t.stream), OK);
    TRUE(t.wrong(5) == 0, "fork/join replay: %d outputs wrong", t.wrong(5));
    TRUE(json_has("\"replayed_launches\": 1, \"replayed_copies\": 2,"), "counters");
    // The events stand for graph nodes now: the host cannot wait on them, even after the capture.
    EXPECT(cuEventQuery(joined), CAPTURED_EVENT);
}

// Synchronising what a capture only records: the stream, the context, an event recorded in it.
void case_capture_sync() {
    Step t;
    t.setup();
    Handle e = nullptr;
    EXPECT(cuEventCreate(&e, 0u), OK);
    t.begin();
    t.record();
    EXPECT(cuStreamSynchronize(t.stream), CAPTURE_UNSUPPORTED);
    t.invalidated("cuStreamSynchronize");
    t.begin();
    EXPECT(cuStreamQuery(t.stream), CAPTURE_UNSUPPORTED);
    t.invalidated("cuStreamQuery");
    t.begin(MODE_RELAXED);  // even in relaxed mode
    EXPECT(cuCtxSynchronize(), CAPTURE_UNSUPPORTED);
    t.invalidated("cuCtxSynchronize");
    t.begin();
    EXPECT(cuEventRecord(e, t.stream), OK);
    EXPECT(cuEventSynchronize(e), CAPTURED_EVENT);
    t.invalidated("cuEventSynchronize");
    t.begin();
    EXPECT(cuEventRecord(e, t.stream), OK);
    EXPECT(cuEventQuery(e), CAPTURED_EVENT);
    t.invalidated("cuEventQuery");
    EXPECT(cuEventSynchronize(e), CAPTURED_EVENT);  // still a captured event after the capture
    EXPECT(cuEventRecord(e, t.stream), OK);         // until recorded outside one
    EXPECT(cuEventSynchronize(e), OK);
    EXPECT(cuStreamSynchronize(t.stream), OK);
    // Nothing ran, and only the two syncs that happened count.
    TRUE(json_has("\"launches\": 0,") &&
             json_has("\"syncs\": {\"total\": 2, \"stream\": 1, \"context\": 0, \"event\": 1, \"blocking_copies\": 0}"),
         "counters");
}

// Allocation, free and copies a capture refuses, and those it leaves alone.
void case_capture_memory() {
    Step t;
    t.setup();
    std::vector<float> pageable(Step::N);
    CUdeviceptr p = 0;
    t.begin();
    EXPECT(cuMemcpyHtoD_v2(t.d_in, pageable.data(), (size_t)16), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemcpyHtoD_v2");
    t.begin();
    EXPECT(cuMemcpyDtoH_v2(pageable.data(), t.d_in, (size_t)16), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemcpyDtoH_v2");
    t.begin();
    EXPECT(cuMemAlloc_v2(&p, (size_t)256), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemAlloc_v2");
    t.begin();
    EXPECT(cuMemFree_v2(t.d_in), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemFree_v2");
    t.begin();
    EXPECT(cuMemFreeHost((void*)t.in), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemFreeHost");
    t.begin();
    EXPECT(cuMemAllocAsync(&p, (size_t)256, t.stream), NOT_SUPPORTED);  // a graph memory node: not emulated
    t.invalidated("cuMemAllocAsync on the capturing stream");
    t.begin();
    EXPECT(cuMemFreeAsync(t.d_in, t.stream), INVALID_VALUE);  // not a graph allocation
    t.invalidated("cuMemFreeAsync on the capturing stream");
    t.begin();
    EXPECT(cuMemcpyHtoDAsync_v2(t.d_in, pageable.data(), (size_t)16, t.stream), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemcpyHtoDAsync_v2 from pageable memory");
    t.begin();
    EXPECT(cuMemcpyDtoHAsync_v2(pageable.data(), t.d_in, (size_t)16, t.stream), CAPTURE_UNSUPPORTED);
    t.invalidated("cuMemcpyDtoHAsync_v2 to pageable memory");
    t.begin();
    EXPECT(cuMemcpyHtoDAsync_v2(t.d_in, t.in + 1, (size_t)4 * Step::N, t.stream), CAPTURE_UNSUPPORTED);
    t.invalidated("a copy running past the end of page-locked memory");
    // Stream-ordered allocation on another (not capturing) stream is no business of the capture,
    // and a relaxed capture allows the synchronous calls.
    t.begin();
    EXPECT(cuMemAllocAsync(&p, (size_t)256, (Handle) nullptr), OK);
    EXPECT(cuMemFreeAsync(p, (Handle) nullptr), OK);
    EXPECT(cuStreamEndCapture(t.stream, &t.graph), OK);
    TRUE(t.graph != nullptr, "no graph");
    t.begin(MODE_RELAXED);
    EXPECT(cuMemAlloc_v2(&p, (size_t)256), OK);
    EXPECT(cuMemFree_v2(p), OK);
    t.record();
    EXPECT(cuStreamEndCapture(t.stream, &t.graph), OK);
    TRUE(t.graph != nullptr, "no graph from the relaxed capture");
    // Outside a capture, copies with pageable memory work (the driver stages them).
    EXPECT(cuMemcpyHtoDAsync_v2(t.d_in, pageable.data(), (size_t)16, t.stream), OK);
    TRUE(json_has("\"host_copies\": {\"pinned\": 0, \"pinned_bytes\": 0, \"pageable\": 1, \"pageable_bytes\": 16}"),
         "counters");
}

// Beginning and ending captures, forks never joined, events and streams across captures.
void case_capture_streams() {
    Step t;
    t.setup();
    Handle side = nullptr, blocking = nullptr, e = nullptr, graph = nullptr, exec = nullptr;
    EXPECT(cuStreamCreate(&side, 1u), OK);
    EXPECT(cuStreamCreate(&blocking, 0u), OK);
    EXPECT(cuEventCreate(&e, 2u), OK);
    EXPECT(cuStreamBeginCapture_v2((Handle) nullptr, MODE_GLOBAL), CAPTURE_UNSUPPORTED);
    EXPECT(cuStreamBeginCapture_v2(t.stream, 3), INVALID_VALUE);
    EXPECT(cuStreamEndCapture(t.stream, &graph), ILLEGAL_STATE);  // never begun
    t.begin();
    EXPECT(cuStreamBeginCapture_v2(t.stream, MODE_GLOBAL), ILLEGAL_STATE);  // twice
    t.invalidated("a second cuStreamBeginCapture_v2");
    // Ending on a stream that joined, not on the origin.
    t.begin();
    EXPECT(cuEventRecord(e, t.stream), OK);
    EXPECT(cuStreamWaitEvent(side, e, 0u), OK);
    EXPECT(cuStreamEndCapture(side, &graph), CAPTURE_UNMATCHED);
    t.invalidated("cuStreamEndCapture on the joined stream");
    int status = -1;
    EXPECT(cuStreamIsCapturing(side, &status), OK);
    TRUE(status == 0, "the joined stream still captures (status %d)", status);
    // A fork never joined back.
    t.begin();
    EXPECT(cuEventRecord(e, t.stream), OK);
    EXPECT(cuStreamWaitEvent(side, e, 0u), OK);
    EXPECT(cuMemsetD8Async(t.d_out, (unsigned char)0, (size_t)2, side), OK);
    graph = (Handle)1;
    EXPECT(cuStreamEndCapture(t.stream, &graph), CAPTURE_UNJOINED);
    TRUE(graph == nullptr, "a graph from an unjoined capture");
    // Waiting on an event recorded outside the capture.
    EXPECT(cuEventRecord(e, side), OK);
    t.begin();
    EXPECT(cuStreamWaitEvent(t.stream, e, 0u), CAPTURE_ISOLATION);
    t.invalidated("a wait on an event recorded outside the capture");
    EXPECT(cuStreamWaitEvent(t.stream, e, 1u), INVALID_VALUE);  // CU_EVENT_WAIT_EXTERNAL outside capture
    // Two captures that would merge.
    t.begin();
    EXPECT(cuStreamBeginCapture_v2(side, MODE_GLOBAL), OK);
    EXPECT(cuEventRecord(e, t.stream), OK);
    EXPECT(cuStreamWaitEvent(side, e, 0u), CAPTURE_MERGE);
    t.invalidated("a wait merging two captures");
    t.invalidated("a wait merging two captures (the other capture)", side);
    // A blocking stream captures: the legacy stream cannot be used meanwhile.
    EXPECT(cuStreamBeginCapture_v2(blocking, MODE_GLOBAL), OK);
    EXPECT(cuStreamIsCapturing((Handle) nullptr, &status), CAPTURE_IMPLICIT);
    EXPECT(cuMemsetD8Async(t.d_out, (unsigned char)0, (size_t)2, (Handle) nullptr), CAPTURE_IMPLICIT);
    t.invalidated("work on the legacy stream", blocking);
    // A launch refused at capture invalidates the capture too.
    t.begin();
    EXPECT(t.launch(2048), INVALID_VALUE);
    t.invalidated("a refused launch");
    // A capturing stream cannot be destroyed.
    t.begin();
    EXPECT(cuStreamDestroy_v2(t.stream), CAPTURE_UNSUPPORTED);
    t.invalidated("cuStreamDestroy_v2");
    // Instantiation flags.
    t.begin();
    t.record();
    EXPECT(cuStreamEndCapture(t.stream, &graph), OK);
    EXPECT(cuGraphInstantiateWithFlags(&exec, graph, 5ull), INVALID_VALUE);  // AUTO_FREE | DEVICE_LAUNCH
    EXPECT(cuGraphInstantiateWithFlags(&exec, graph, 2ull), INVALID_VALUE);  // UPLOAD: WithParams only
    EXPECT(cuGraphInstantiateWithFlags(&exec, graph, 9ull), OK);             // AUTO_FREE | USE_NODE_PRIORITY
    EXPECT(cuGraphDestroy(graph), OK);
    EXPECT(cuGraphDestroy(graph), INVALID_VALUE);
    EXPECT(cuGraphExecDestroy(exec), OK);
}

// One thread's capture and another thread's calls: global mode prohibits unsafe calls in every
// thread, thread-local mode only in its own; a non-relaxed capture ends in the thread that began it.
void* unsafe_alloc_thread(void* arg) {
    EXPECT(cuCtxSetCurrent(g_ctx), OK);
    CUdeviceptr p = 0;
    *(CUresult*)arg = cuMemAlloc_v2(&p, (size_t)256);
    if (p) EXPECT(cuMemFree_v2(p), OK);
    return nullptr;
}
struct EndAttempt {
    Handle stream;
    CUresult r;
};
void* end_capture_thread(void* arg) {
    EndAttempt* a = (EndAttempt*)arg;
    EXPECT(cuCtxSetCurrent(g_ctx), OK);
    Handle graph = nullptr;
    a->r = cuStreamEndCapture(a->stream, &graph);
    return nullptr;
}
void case_capture_threads() {
    Step t;
    t.setup();
    CUresult r = -1;
    pthread_t th;
    t.begin(MODE_THREAD_LOCAL);
    pthread_create(&th, nullptr, unsafe_alloc_thread, &r);
    pthread_join(th, nullptr);
    TRUE(r == OK, "another thread's cuMemAlloc_v2 during a thread-local capture returned %d", r);
    EXPECT(cuStreamEndCapture(t.stream, &t.graph), OK);
    t.begin(MODE_GLOBAL);
    pthread_create(&th, nullptr, unsafe_alloc_thread, &r);
    pthread_join(th, nullptr);
    TRUE(r == CAPTURE_UNSUPPORTED, "another thread's cuMemAlloc_v2 during a global capture returned %d", r);
    t.invalidated("another thread's cuMemAlloc_v2");
    t.begin(MODE_GLOBAL);
    EndAttempt attempt{t.stream, -1};
    pthread_create(&th, nullptr, end_capture_thread, &attempt);
    pthread_join(th, nullptr);
    TRUE(attempt.r == CAPTURE_WRONG_THREAD, "cuStreamEndCapture from another thread returned %d", attempt.r);
    t.invalidated("cuStreamEndCapture from another thread");
}

// What can change between capture and replay is checked again when the graph runs: here the
// device faults, as a GPU would (CUDA_ERROR_ILLEGAL_ADDRESS, and the context is dead).
void case_replay_freed_buffer() {
    Step t;
    t.setup();
    t.capture();
    EXPECT(cuGraphLaunch(t.exec, t.stream), OK);
    EXPECT(cuMemFreeAsync(t.d_out, (Handle) nullptr), OK);
    EXPECT(cuGraphLaunch(t.exec, t.stream), ILLEGAL_ADDRESS);
    EXPECT(cuStreamSynchronize(t.stream), ILLEGAL_ADDRESS);
}
void case_replay_freed_pinned() {
    Step t;
    t.setup();
    t.capture();
    EXPECT(cuMemFreeHost((void*)t.in), OK);
    EXPECT(cuGraphLaunch(t.exec, t.stream), ILLEGAL_ADDRESS);
}

// A host function after the step's copy out: it checks what the step produced for the round it set
// up, then refills the page-locked input for the next round (host memory: allowed), and tries a
// CUDA call (refused: a host function must not call the CUDA API).
struct HostSeen {
    Step* step;
    int round = 0;
    std::vector<int> wrong;  // per run: outputs wrong for the round it ran in
    std::vector<CUresult> inner;
};
void host_fn_check(void* p) {
    HostSeen* h = (HostSeen*)p;
    h->wrong.push_back(h->step->wrong(h->round));
    h->step->fill(++h->round);
    h->inner.push_back(cuMemsetD8Async(h->step->d_out, (unsigned char)0, (size_t)2, h->step->stream));
}
void case_host_function() {
    Step t;
    t.setup();
    HostSeen h{&t};
    t.fill(0);
    // Outside a capture: it runs before cuLaunchHostFunc returns, after the work before it.
    t.record();
    EXPECT(cuLaunchHostFunc(t.stream, host_fn_check, (void*)&h), OK);
    TRUE(h.wrong.size() == 1 && h.wrong[0] == 0 && h.round == 1, "the host function did not run at once (%zu runs)",
         h.wrong.size());
    EXPECT(cuLaunchHostFunc(t.stream, (void (*)(void*)) nullptr, (void*)&h), INVALID_VALUE);
    // Captured: nothing runs; each replay calls it after the step, and it sees that replay's data.
    t.begin();
    t.record();
    EXPECT(cuLaunchHostFunc(t.stream, host_fn_check, (void*)&h), OK);
    EXPECT(cuStreamEndCapture(t.stream, &t.graph), OK);
    EXPECT(cuGraphInstantiateWithFlags(&t.exec, t.graph, 0ull), OK);
    TRUE(h.wrong.size() == 1, "the host function ran during the capture");
    for (int r = 0; r < 3; r++) {
        EXPECT(cuGraphLaunch(t.exec, t.stream), OK);
        EXPECT(cuStreamSynchronize(t.stream), OK);
    }
    TRUE(h.wrong.size() == 4 && h.round == 4, "%zu runs, round %d after 3 replays (expected 4 runs, round 4)",
         h.wrong.size(), h.round);
    for (size_t i = 0; i < h.wrong.size(); i++) TRUE(h.wrong[i] == 0, "run %zu: %d outputs wrong", i, h.wrong[i]);
    for (size_t i = 0; i < h.inner.size(); i++)
        TRUE(h.inner[i] == NOT_PERMITTED, "run %zu: a CUDA call inside the host function returned %d", i, h.inner[i]);
    TRUE(json_has("\"host_functions\": {\"run\": 4, \"replayed\": 3, \"seconds\": "), "counters");
    TRUE(json_has("\"replayed_launches\": 3, \"replayed_copies\": 6, "), "counters");
    // A NULL function in a capture is refused and invalidates it.
    t.begin();
    EXPECT(cuLaunchHostFunc(t.stream, (void (*)(void*)) nullptr, (void*)&h), INVALID_VALUE);
    t.invalidated("a NULL host function");
}

// ---- the table of cases, and the parent's side ------------------------------------------------------
enum Ending { PASSES, ABORTS, CRASHES, EXITS };  // EXITS: non-zero, as a sanitizer does
struct Case {
    const char* name;
    void (*run)();
    std::vector<std::pair<std::string, std::string>> env;
    std::vector<std::string> stderr_has;  // substrings, in any order
    Ending ending = PASSES;
    std::vector<std::string> stderr_lacks;
};

std::vector<Case> cases() {
    const std::string counters = g_tmp + "/counters.%p.json", log = g_tmp + "/calls.log";
    std::vector<Case> c = {
        {"a normal launch: encoder_forward_f32 and matmul_f32 match the CPU", case_launches, {}, {}},
        {"more than 1024 threads, or more than __launch_bounds__", case_block_too_big, {},
         {"cuLaunchKernel: encoder_forward_f32 grid (2,1,1) block (2048,1,1) smem 0: a block must be within",
          "(CUDA_ERROR_INVALID_VALUE)",
          "encoder_forward_f32 grid (2,1,1) block (512,1,1) smem 0: 512 threads per block exceed the kernel's "
          "__launch_bounds__ (.maxntid 256) (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)"}},
        {"gridDim.y or .z above 65535, .x above 2^31-1", case_grid_too_big, {},
         {"grid (2,65536,1) block (256,1,1) smem 0: the grid must be within",
          "grid (2,1,65536) block (256,1,1) smem 0: the grid must be within",
          "grid (2147483648,1,1) block (256,1,1)"}},
        {"dynamic shared memory: 48 KiB unless raised, 227 KiB in all", case_dynamic_smem, {},
         {"smem 49153: 49153 bytes of dynamic shared memory exceed the kernel's limit of 49152",
          "raise it with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)",
          "smem 100001: 100001 bytes of dynamic shared memory exceed the kernel's limit of 100000",
          "cuFuncSetAttribute: encoder_forward_f32: 232449 bytes of dynamic shared memory + 0 static exceed the "
          "232448 bytes a block may have on sm_90",
          "matmul_f32: 195585 bytes of dynamic shared memory + 36864 static exceed",
          "smem 232449: 232449 bytes of dynamic + 0 of static shared memory exceed the sm_90 maximum of 232448"}},
        {"a host pointer as a kernel argument; the context then stays dead", case_bad_pointers_host, {},
         {"encoder_forward_f32 grid (2,1,1) block (256,1,1) smem 0: argument 2",
          "points into no live device allocation (a host pointer, or not a pointer?) (CUDA_ERROR_ILLEGAL_ADDRESS)"}},
        {"a misaligned float* argument", case_bad_pointers_misaligned, {},
         {"encoder_forward_f32 grid (2,1,1) block (256,1,1) smem 0: argument 2",
          "is not 4-byte aligned for its type (CUDA_ERROR_MISALIGNED_ADDRESS)"}},
        {"a freed buffer as a kernel argument", case_bad_pointers_freed, {},
         {"encoder_forward_f32 grid (2,1,1) block (256,1,1) smem 0: argument 3",
          "points into allocation #4 (924 bytes), which was freed (use after free) (CUDA_ERROR_ILLEGAL_ADDRESS)"}},
        {"copies and memsets past the end, after free; double free", case_copies, {},
         {"cuMemcpyHtoDAsync_v2: destination", "runs 4 bytes past the end of allocation #2 (56 bytes",
          "cuMemcpyDtoHAsync_v2: source", "runs 8 bytes past the end of allocation #2",
          "cuMemsetD8Async: destination", "runs 1 bytes past the end",
          "cuMemcpyDtoDAsync_v2: source", "is in allocation #2, already freed (use after free)",
          "double free of allocation #2 (56 bytes) (CUDA_ERROR_INVALID_VALUE)",
          "is inside allocation #1 (1848 bytes", "not its start",
          "cuMemAllocAsync: 0 bytes: the driver refuses empty allocations"}},
        {"PTX parameters that differ from the C++ source's", case_signature, {},
         {"kernel encoder_forward_f32: the PTX's parameters (.u64 .u64 .u64 .u64 .u32 .u32) differ from those of the "
          "C++ source compiled into the fake (ptr ptr ptr ptr int32 int32 int32), from parameter 6",
          "(.u64 .u64 .u64 .u64 .u32 .u32 .u64) differ",
          "kernel crossentropy_forward_f32: the PTX's parameters (.u64 .u64 .u64 .u64 .u32 .u32 .u32 .u32) differ "
          "from those of the C++ source compiled into the fake (ptr ptr ptr ptr int32 int32 int32 float), from "
          "parameter 7",
          "kernel no_such_kernel is in the PTX but not compiled into the fake driver",
          "(CUDA_ERROR_INVALID_IMAGE)", "cuModuleGetFunction: no kernel no_such_kernel in this module (", "(CUDA_ERROR_NOT_FOUND)",
          "no .version or .target directive: not PTX text (CUDA_ERROR_INVALID_PTX)"}},
        {"PTX newer than driver 580 accepts", case_ptx_version, {},
         {"PTX ISA 9.1 is newer than driver 580 (CUDA 13.0) compiles (at most 9.0)",
          "PTX ISA 10.0 is newer", "(CUDA_ERROR_UNSUPPORTED_PTX_VERSION)"}},
        {"FAKE_CUDA_CC=8.0: A100 limits, sm_90a and sm_86 PTX refused", case_cc80, {{"FAKE_CUDA_CC", "8.0"}},
         {"PTX for .target sm_90a cannot run on this sm_80 device (arch-specific PTX runs only on its exact compute "
          "capability) (CUDA_ERROR_INVALID_PTX)",
          "PTX for .target sm_90 cannot run on this sm_80 device (CUDA_ERROR_INVALID_PTX)",
          "PTX for .target sm_86 cannot run", "166913 bytes of dynamic shared memory + 0 static exceed the 166912"}},
        {"FAKE_CUDA_CC unset: H100 limits", case_cc90, {}, {"attribute 9999 is not emulated"}},
        {"FAKE_CUDA_CC=5.2 is refused", case_bad_cc, {{"FAKE_CUDA_CC", "5.2"}},
         {"cuInit: FAKE_CUDA_CC=5.2 is not an emulated device"}},
        {"calls before cuInit", case_not_initialised, {}, {"cuDeviceGetCount: cuInit has not been called"}},
        {"FAKE_CUDA_DEVICES=3: three devices, one per process", case_devices, {{"FAKE_CUDA_DEVICES", "3"}},
         {"cuDeviceGet: device 3: the fake has 3 (FAKE_CUDA_DEVICES)",
          "device 1: this process already uses device 2, and the fake emulates one device per process"}},
        {"FAKE_CUDA_MEM_MB=64: cuMemGetInfo and CUDA_ERROR_OUT_OF_MEMORY", case_memory_limit,
         {{"FAKE_CUDA_MEM_MB", "64"}},
         {"cuMemAllocAsync: 8388608 bytes: 62914560 bytes in use + 8388608 asked > 67108864 bytes of device memory "
          "(FAKE_CUDA_MEM_MB sets the device's size) (CUDA_ERROR_OUT_OF_MEMORY)"}},
        {"FAKE_CUDA_COUNTERS=<file>: the JSON written at exit", case_counters, {{"FAKE_CUDA_COUNTERS", counters}}, {}},
        {"FAKE_CUDA_COUNTERS=1: the summary on stderr", case_counters_stderr, {{"FAKE_CUDA_COUNTERS", "1"}},
         {"[fake-cuda] counters of process", "kernel launches            1", "encoder_forward_f32",
          "host->device copies        3", "[fake-cuda] counters {\"pid\": "}},
        {"FAKE_CUDA_LOG=<file>: one line per call", case_log, {{"FAKE_CUDA_LOG", log}},
         {"block (2048,1,1)"}},
        {"an out-of-bounds write hits the guard page", case_oob_write_guard, {},
         {"[fake-cuda] out-of-bounds write in kernel encoder_forward_f32 (grid (6,1,1), block (256,1,1), smem 0) at "
          "block (4,0,0), thread (",
          "bytes past the end of allocation #1 (4096 bytes at"},
         ABORTS},
        {"an out-of-bounds read hits the guard page", case_oob_read_guard, {},
         {"[fake-cuda] out-of-bounds read in kernel encoder_forward_f32 (grid (13,1,1), block (256,1,1), smem 0) at "
          "block (",
          "bytes past the end of allocation #2 (256 bytes at"},
         ABORTS},
        {"an out-of-bounds read in a second host thread", case_oob_in_thread, {},
         {"[fake-cuda] out-of-bounds read in kernel encoder_forward_f32 (grid (13,1,1)"},
         ABORTS},
        {"an out-of-bounds write into the slack before the guard page", case_oob_write_slack, {},
         {"[fake-cuda] out-of-bounds write in kernel encoder_forward_f32 grid (2,1,1) block (256,1,1) smem 0 (found "
          "after it ran, so the block and thread are unknown): bytes 0..7 past the end of allocation #1 (1840 bytes"},
         ABORTS},
        {"a __shared__ array indexed out of bounds (UBSan bounds)", case_shared_bounds, {},
         {"kernels/attention.cu:", "out of bounds for type 'float [128]'",
          "[fake-cuda] the error above happened in kernel attention_forward_f32 (grid (1,1,1), block (128,1,1), smem 0) "
          "at block (0,0,0), thread ("},
         EXITS},
        {"a host access to device memory", case_host_access, {},
         {"[fake-cuda] host read of device memory outside any kernel launch: address",
          "is 0 bytes past the end of allocation #1 (1024 bytes at"},
         ABORTS},
        {"a segfault that is not the fake's is left alone", case_not_ours, {}, {}, CRASHES, {"[fake-cuda]"}},
        {"three host threads at once", case_threads, {}, {}},
        {"page-locked memory: cuMemHostAlloc, cuMemFreeHost and their refusals", case_pinned, {},
         {"cuMemHostAlloc: flags 0x8: only CU_MEMHOSTALLOC_PORTABLE (1), _DEVICEMAP (2) and _WRITECOMBINED (4) exist "
          "(CUDA_ERROR_INVALID_VALUE)",
          "cuMemHostAlloc: 0 bytes: an empty page-locked allocation (CUDA_ERROR_INVALID_VALUE)",
          "cuMemHostAlloc: NULL result pointer", "is inside page-locked allocation #1 (4096 bytes at",
          "was not allocated by cuMemHostAlloc (CUDA_ERROR_INVALID_VALUE)", "is device memory (cuMemFree frees it)",
          "double free of page-locked allocation #1 (4096 bytes) (CUDA_ERROR_INVALID_VALUE)"}},
        {"a captured step (copy in, kernel, copy out) replayed 3 times on new page-locked input", case_graph_replay,
         {},
         {"cuGraphLaunch: ", "is not an instantiated graph (CUDA_ERROR_INVALID_VALUE)"}},
        {"work forked to another stream and joined back is captured into one graph", case_graph_fork_join, {},
         {"cuEventQuery: event ", "was last recorded in a capturing stream (capture #1, since ended)",
          "(CUDA_ERROR_CAPTURED_EVENT)"}},
        {"capture: synchronising the stream, the context or a captured event is refused and invalidates it",
         case_capture_sync, {},
         {"cuStreamSynchronize: stream ", "is capturing (capture #1 on stream ",
          "global mode): its work is recorded, not run, so there is nothing to wait for",
          "(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)", "cuMemsetD8Async: stream ",
          "global mode, invalidated by an earlier refusal (cuStreamSynchronize: stream ",
          "cuStreamEndCapture: capture #1 on stream ", "it ends without a graph (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)",
          "cuStreamQuery: stream ", "so it has no status to query (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)",
          "cuCtxSynchronize: a stream is capturing (capture #3 on stream ", "relaxed mode): synchronising the context",
          "cuEventSynchronize: event ", "was last recorded in a capturing stream (capture #4, still active)",
          "cuEventQuery: event ", "(capture #5, still active)", "(capture #5, since ended)", "(CUDA_ERROR_CAPTURED_EVENT)"}},
        {"capture: blocking copies, synchronous allocation and free, pageable async copies are refused",
         case_capture_memory, {},
         {"cuMemcpyHtoD_v2: a blocking (non-Async) host<->device copy is not permitted during stream capture "
          "(capture #1 on stream ",
          "begun by this thread)", "cuMemcpyDtoH_v2: a blocking (non-Async) host<->device copy is not permitted",
          "cuMemAlloc_v2: cuMemAlloc_v2 (a synchronous allocation) is not permitted during stream capture",
          "cuMemFree_v2: cuMemFree_v2 (a synchronous free) is not permitted",
          "cuMemFreeHost: cuMemFreeHost (it synchronises the device) is not permitted",
          "cuMemAllocAsync: 256 bytes on stream ", "CUDA would add a graph memory node, which this fake does not "
          "emulate; allocate before cuStreamBeginCapture (CUDA_ERROR_NOT_SUPPORTED)",
          "cuMemFreeAsync: ", "must free a graph allocation, but this is allocation #1 allocated outside the graph",
          "cuMemcpyHtoDAsync_v2: a copy from pageable host memory cannot be captured (host range ",
          "is pageable memory, not page-locked (cuMemHostAlloc)",
          "cuMemcpyDtoHAsync_v2: a copy to pageable host memory cannot be captured",
          "runs 4 bytes past the end of page-locked allocation #1 (4000 bytes)"}},
        {"capture: begin and end, unmatched and unjoined forks, isolation, merges, the legacy stream",
         case_capture_streams, {},
         {"cuStreamBeginCapture_v2: the legacy stream (", "cannot be captured",
          "capture mode 3: not GLOBAL (0), THREAD_LOCAL (1) or RELAXED (2)",
          "is not capturing: no cuStreamBeginCapture on it to end (CUDA_ERROR_ILLEGAL_STATE)",
          "is already capturing (capture #1 on stream ", "(CUDA_ERROR_ILLEGAL_STATE)",
          "joined the capture through an event (capture #2 on stream ",
          "the capture ends on the stream that began it (CUDA_ERROR_STREAM_CAPTURE_UNMATCHED)",
          "has captured work (node 0) the origin stream ", "(CUDA_ERROR_STREAM_CAPTURE_UNJOINED)",
          "recorded outside the capture: captured work cannot depend on uncaptured work",
          "(CUDA_ERROR_STREAM_CAPTURE_ISOLATION)", "the flag is valid only during stream capture",
          "two captures cannot merge (CUDA_ERROR_STREAM_CAPTURE_MERGE)",
          "cuStreamIsCapturing: the legacy stream (", "is implicitly part of capture #",
          "cuMemsetD8Async: the legacy stream (", "cannot be used while a blocking stream captures",
          "(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT)",
          "cuLaunchKernel: f32_to_floatx_bf16 grid (4,1,1) block (2048,1,1) smem 0: a block must be within",
          "end the capture before destroying the stream",
          "flags 0x5: AUTO_FREE_ON_LAUNCH and DEVICE_LAUNCH cannot be combined",
          "flags 0x2: cuGraphInstantiateWithFlags takes", "cuGraphDestroy: ", "is not a graph"}},
        {"capture modes across threads: global, thread-local, and ending in another thread", case_capture_threads, {},
         {"cuMemAlloc_v2: cuMemAlloc_v2 (a synchronous allocation) is not permitted during stream capture (capture #2 "
          "on stream ",
          "begun by another thread)", "cuStreamEndCapture: capture #3 on stream ",
          "was begun by another thread: only a relaxed-mode capture may end in another thread "
          "(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD)"}},
        {"a replay after a kernel's buffer was freed faults", case_replay_freed_buffer, {},
         {"cuGraphLaunch: graph exec #1 node 1 of 3 (f32_to_floatx_bf16 grid (4,1,1) block (256,1,1) smem 0): argument 0",
          "points into allocation #2 (2000 bytes), which was freed (use after free) (CUDA_ERROR_ILLEGAL_ADDRESS)"}},
        {"a replay after its page-locked input was freed faults", case_replay_freed_pinned, {},
         {"cuGraphLaunch: graph exec #1 node 0 of 3 (cuMemcpyHtoDAsync_v2(",
          "is in page-locked allocation #1, freed by cuMemFreeHost (CUDA_ERROR_ILLEGAL_ADDRESS)"}},
        {"a host function (cuLaunchHostFunc): at once, and captured and replayed 3 times on changed data",
         case_host_function, {},
         {"cuLaunchHostFunc: NULL host function (userData ", "(CUDA_ERROR_INVALID_VALUE)",
          "cuMemsetD8Async: called from inside a host function (cuLaunchHostFunc(",
          "called from inside a host function (graph exec #1 node 3 of 4 (cuLaunchHostFunc(",
          "a host function must not call the CUDA API (CUDA_ERROR_NOT_PERMITTED)",
          "cuStreamEndCapture: capture #2 on stream ", "cuLaunchHostFunc: NULL host function"}},
        {"loaded by name, unloaded and loaded again (cudarc's probe)", case_probe_reload, {}, {}},
    };
    if (g_ptx_dir) c.push_back({"the real nvcc PTX of kernels/*.cu", case_real_ptx, {}, {}});
    return c;
}

// Runs one case in a child; returns true if it passed.
bool run_case(const Case& c) {
    int err_pipe[2];
    if (pipe(err_pipe) != 0) return false;
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        close(err_pipe[0]);
        dup2(err_pipe[1], 2);
        for (auto& [k, v] : c.env) setenv(k.c_str(), v.c_str(), 1);
        g_lib = dlopen(g_library, RTLD_LAZY | RTLD_LOCAL);
        if (!g_lib) {
            printf("  cannot load %s: %s\n", g_library, dlerror());
            exit(1);
        }
        c.run();
        fflush(stdout);
        exit(g_failures ? 1 : 0);
    }
    close(err_pipe[1]);
    std::string err;
    char buf[4096];
    ssize_t n;
    while ((n = read(err_pipe[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)n);
    close(err_pipe[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    bool ok = true;
    auto problem = [&](const std::string& what) {
        printf("  FAIL: %s\n", what.c_str());
        ok = false;
    };
    switch (c.ending) {
        case PASSES:
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                problem(WIFSIGNALED(status) ? "died of signal " + std::to_string(WTERMSIG(status)) : "failed");
            break;
        case ABORTS:
            if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGABRT)
                problem("should have aborted (SIGABRT); status " + std::to_string(status));
            break;
        case EXITS:
            if (!WIFEXITED(status) || WEXITSTATUS(status) == 0)
                problem("should have exited with an error; status " + std::to_string(status));
            break;
        case CRASHES:
            if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGSEGV)
                problem("should have died of SIGSEGV; status " + std::to_string(status));
            break;
    }
    for (const std::string& s : c.stderr_has)
        if (err.find(s) == std::string::npos) problem("stderr lacks \"" + s + "\"");
    for (const std::string& s : c.stderr_lacks)
        if (err.find(s) != std::string::npos) problem("stderr has \"" + s + "\"");
    // Files the knobs write.
    if (c.run == case_counters) {
        std::string json = read_file(g_tmp + "/counters." + std::to_string(pid) + ".json");
        for (const char* want :
             {"\"compute_capability\": \"9.0\", \"launches\": 1, \"per_kernel\": {\"encoder_forward_f32\": "
              "{\"launches\": 1, \"blocks\": 2, \"threads\": 512, \"seconds\": ",
              "\"htod\": {\"count\": 3, \"bytes\": 7580}", "\"dtoh\": {\"count\": 1, \"bytes\": 1848}",
              "\"memsets\": {\"count\": 1, \"bytes\": 1848}",
              "\"syncs\": {\"total\": 4, \"stream\": 2, \"context\": 1, \"event\": 1, \"blocking_copies\": 0}",
              "\"memory\": {\"allocs\": 4, \"alloc_bytes\": 9428, \"frees\": 1, ", "\"errors\": 0"})
            if (json.find(want) == std::string::npos) problem(std::string("counters JSON lacks ") + want);
        if (json.empty()) problem("no counters file " + g_tmp + "/counters." + std::to_string(pid) + ".json");
    }
    if (c.run == case_log) {
        const std::string log = read_file(g_tmp + "/calls.log");
        for (const char* want : {"[fake-cuda] cuInit(0) = CUDA_SUCCESS", "[fake-cuda] cuMemAllocAsync(1848 bytes) -> ",
                                 "[fake-cuda] cuLaunchKernel(encoder_forward_f32 grid (2,1,1) block (256,1,1) smem 0) ",
                                 "block (2048,1,1) smem 0: a block must be within", "= CUDA_ERROR_INVALID_VALUE",
                                 "entry matmul_f32: 14 params, at most 128 threads, 36864 bytes static shared memory"})
            if (log.find(want) == std::string::npos) problem(std::string("the call log lacks ") + want);
    }
    if (!ok) {
        printf("  --- its stderr:\n%s  ---\n", err.c_str());
    } else if (c.ending != PASSES && !err.empty()) {
        // Show what a death looks like.
        const size_t at = err.find("[fake-cuda]");
        const std::string line = at == std::string::npos ? "" : err.substr(at, err.find('\n', at) - at);
        if (!line.empty()) printf("  %s\n", line.c_str());
    }
    return ok;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: selftest LIBRARY [PTX_DIR]\n");
        return 2;
    }
    g_library = argv[1];
    g_ptx_dir = argc > 2 ? argv[2] : nullptr;
    // The cases set the knobs they test; none may leak in from the caller's environment.
    for (const char* knob : {"FAKE_CUDA_CC", "FAKE_CUDA_MEM_MB", "FAKE_CUDA_DEVICES", "FAKE_CUDA_LOG", "FAKE_CUDA_COUNTERS"})
        unsetenv(knob);
    const char* tmpdir = getenv("TMPDIR");
    std::string tmpl = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/fake-cuda-selftest.XXXXXX";
    if (!mkdtemp(tmpl.data())) {
        perror(tmpl.c_str());
        return 2;
    }
    g_tmp = tmpl;
    int failed = 0, n = 0;
    for (const Case& c : cases()) {
        printf("%s\n", c.name);
        const bool ok = run_case(c);
        failed += !ok;
        n++;
    }
    if (system(("rm -rf '" + g_tmp + "'").c_str()) != 0) fprintf(stderr, "cannot remove %s\n", g_tmp.c_str());
    printf("%s: %d of %d cases passed\n", failed ? "FAILED" : "ok", n - failed, n);
    return failed ? 1 : 0;
}
