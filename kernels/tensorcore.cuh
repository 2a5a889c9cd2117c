// Device wrappers for the tensor-core instructions of the bf16 matmul, sm_80 and later: the warp-wide
// mma.sync m16n8k16 (bf16 × bf16 + fp32), ldmatrix (.x1/.x2/.x4, with or without .trans) from
// shared memory, and 16-byte cp.async global → shared copies (zero-fill form) with commit/wait
// groups, plus the launch's dynamic shared memory. Under nvcc each wrapper is the one PTX
// instruction named in its comment; under tools/kernel-emu (g++ through cuda_shim.h, which defines
// FINCH_EMULATOR) each calls the emulation there, which checks what the hardware requires (all 32
// lanes, the same instruction on each, 16-byte aligned shared-memory rows and copies) and lands a
// cp.async copy only at its wait_group (its destination reads as NaN until then). Fragment layouts
// are the PTX ISA's (section "Matrix Fragments for mma.m16n8k16 with floating point type", and
// ldmatrix's): a uint32_t register holds two bf16, the lower-index element in the low 16 bits;
// tools/kernel-emu/tensorcore.cpp checks the emulated layouts against CUTLASS CuTe's tables. At
// the end, the tile primitives matmul.cu and attention.cu share: the swizzled shared-memory tile
// layout and the loader of one 16-byte chunk of it.
#pragma once
#include <stdint.h>
#include <cuda_bf16.h>  // under tools/kernel-emu: its stand-in, which is the emulator (cuda_shim.h)

#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/tensorcore.cuh: mma.sync with bf16 and cp.async need sm_80 or later"
#endif

namespace tc {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// D += A·B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (D and C are the same registers).
// a: 4 regs (8 bf16) of the 16×16 A fragment, b: 2 regs (4 bf16) of the 16×8 B fragment, d: 4 fp32.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16, N = 1, 2, 4. Each lane passes ITS row address (lanes 0-7:
// rows of matrix 0, 8-15: matrix 1, ...; for .x1 only lanes 0-7's addresses are used, for .x2 lanes 0-15).
template <int N>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const uint32_t p = smem_addr(smem_row);
    if constexpr (N == 1) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
    } else if constexpr (N == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(p));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(p));
    }
}
template <int N>
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&r)[N], const void* smem_row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const uint32_t p = smem_addr(smem_row);
    if constexpr (N == 1) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
    } else if constexpr (N == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(p));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(p));
    }
}

// cp.async.cg.shared.global [dst], [src], 16, src_size: copies 16 bytes global -> shared; when `valid` is false,
// src_size is 0 and the 16 destination bytes are zero-filled (src is not read, but must still be an address).
// The "memory" clobbers keep the compiler from moving shared-memory accesses across the copy's issue and wait.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
                 "l"(__cvta_generic_to_global(gmem_src)), "r"(valid ? 16 : 0)
                 : "memory");
}
// cp.async.commit_group: closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// cp.async.wait_group N: waits until at most the newest N committed groups of this thread are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two floats rounded to bf16 (nearest, ties to even) in one register: `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));  // the first source goes to the high half
    return r;
}

}  // namespace tc

// The launch's dynamic shared memory (cuLaunchKernel's sharedMemBytes) as a `T*` named `name`, 128-byte aligned.
// Use it at function scope in a __global__ or __device__ function. (One byte array, declared once here, for every
// use: `extern __shared__ T name[]` in each function would conflict between uses with different T.)
extern __shared__ __align__(128) unsigned char finch_dynamic_smem_[];
#define FINCH_DYNAMIC_SMEM(T, name) T* const name = reinterpret_cast<T*>(finch_dynamic_smem_)

#elif defined(FINCH_EMULATOR)
// Under tools/kernel-emu: the emulation in cuda_shim.h (see the section "tensor-core instructions" there). Each
// wrapper also takes its caller's source line (default arguments, invisible to callers), so that lanes reaching
// the same instruction from different places are reported.

namespace tc {

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu::mma_m16n8k16_bf16(d, a, b, file, line);
}
template <int N>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row, const char* file = __builtin_FILE(),
                                         int line = __builtin_LINE()) {
    emu::ldmatrix<N>(r, smem_row, false, file, line);
}
template <int N>
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&r)[N], const void* smem_row,
                                               const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu::ldmatrix<N>(r, smem_row, true, file, line);
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid,
                                            const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu::cp_async_16(smem_dst, gmem_src, valid, file, line);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
    emu::cp_async_wait(N);
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__float2bfloat16_rn(lo).__x | (uint32_t)__float2bfloat16_rn(hi).__x << 16;
}

}  // namespace tc

#define FINCH_DYNAMIC_SMEM(T, name) T* const name = reinterpret_cast<T*>(::emu::dynamic_smem())

#else
#error "kernels/tensorcore.cuh: compile with nvcc, or with g++ through tools/kernel-emu (cuda_shim.h)"
#endif

// ---- tile primitives over the wrappers, shared by matmul.cu and attention.cu ------------------
namespace tc {

// The element offset of (row, col) in a shared tile whose rows hold W bf16 (W/8 chunks of 16
// bytes): the chunk index is XORed with a few row bits, so the 8 rows one ldmatrix reads (same
// logical chunk) land in 8 different 16-byte bank groups. With 64-byte rows two rows share each
// 128-byte bank line, hence the shift.
template <int W>
__device__ __forceinline__ int swizzle(int row, int col) {
    constexpr int chunks = W / 8;
    constexpr int rows_per_line = W >= 64 ? 1 : 128 / (W * 2);
    constexpr int mask = chunks < 8 ? chunks - 1 : 7;
    const int chunk = (col / 8) ^ ((row / rows_per_line) & mask);
    return row * W + chunk * 8 + col % 8;
}

// One operand tile in shared memory: `rows` × `W` bf16, rows along global memory's strided
// dimension and W along its contiguous one. Loads chunk `idx` of the tile for the slice starting
// at (r0, c0) of a matrix whose element (r, c) is g[r·rs + c] (c contiguous), with extents
// (R, C). `aligned`: g is 16-byte aligned and rs a multiple of 8, so every in-bounds chunk may
// travel by cp.async.
template <int W>
__device__ __forceinline__ void load_chunk(__nv_bfloat16* tile, int idx, const __nv_bfloat16* g, long long rs, int r0, int c0, int R, int C,
                                           bool aligned) {
    const int row = idx / (W / 8), col = (idx % (W / 8)) * 8;
    const int r = r0 + row, c = c0 + col;
    __nv_bfloat16* dst = tile + swizzle<W>(row, col);
    if (r >= R || c >= C) {
        // Wholly outside: zero-fill. The source is not read, but must be an aligned address.
        cp_async_16(dst, reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(g) & ~uintptr_t(15)), false);
    } else if (aligned && c + 8 <= C) {
        cp_async_16(dst, g + r * rs + c, true);
    } else {
        // Straddles the edge, or misaligned: element by element, zeros past the edge.
        const __nv_bfloat16* src = g + r * rs;
        for (int j = 0; j < 8; j++) dst[j] = c + j < C ? src[c + j] : __float2bfloat16_rn(0.0f);
    }
}

}  // namespace tc
