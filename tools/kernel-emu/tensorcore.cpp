// The tensor-core instructions of kernels/tensorcore.cuh as the emulator runs them (cuda_shim.h,
// section "tensor-core instructions"):
//   - every fragment layout, element by element, against tables transcribed from CUTLASS CuTe
//     (evaluated here as CuTe evaluates a Layout), and CuTe's tables against the PTX ISA's
//     fragment formulas: two independent sources, neither of them the emulator's own formulas;
//   - ldmatrix feeding mma with the addressing a kernel uses, all four operand orientations;
//   - mma numerics against a double-precision reference, and that C accumulates;
//   - pack_bf16x2's rounding; cp.async landing only at its wait_group (NaN before), groups and
//     uncommitted copies; dynamic shared memory (size, alignment, poisoned per block);
//   - that each check fires, in child processes (h::expect_failure).
#include <array>

#include "../../kernels/tensorcore.cuh"
#include "harness.h"

using namespace h;

// ==== the independent sources ===================================================================
//
// CUTLASS (github.com/NVIDIA/cutlass) at commit 7107b05535f8977f5ecb9d01ee203205b1fd9bc4; the files
// read last changed in aeba0d3723b8c226b7180a59081ae1cdfdf087a8 (include/cute/atom/mma_traits_sm80.hpp)
// and 0d2b201e8c1c4a03efa6e9c468161916e2334725 (include/cute/atom/copy_traits_sm75.hpp,
// include/cute/arch/copy_sm75.hpp, include/cute/arch/mma_sm80.hpp).
//
// A CuTe Layout maps a coordinate to an index: index = Σ coordinate_i · stride_i, and a 1-D
// coordinate of a (nested) shape is split colexicographically, the first sub-shape varying fastest.
// Each layout below is rank 2, (thread, value); each mode's nested shape and stride are flattened
// into (shape, stride) pairs, which splits a coordinate exactly as the nesting does.
using Mode = std::vector<std::pair<int, int>>;
struct CuteLayout {
    Mode thr, val;
    static int eval(const Mode& m, int c) {
        int idx = 0;
        for (auto [shape, stride] : m) {
            idx += c % shape * stride;
            c /= shape;
        }
        return idx;
    }
    static int size(const Mode& m) {
        int n = 1;
        for (auto [shape, stride] : m) n *= shape;
        return n;
    }
    int operator()(int t, int v) const { return eval(thr, t) + eval(val, v); }
};

// mma_traits_sm80.hpp: MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN> derives from
// MMA_Traits<SM80_16x8x16_F16F16F16F16_TN>, whose layouts are
//   using ALayout = Layout<Shape <Shape < _4,_8>,Shape < _2,_2,  _2>>,
//                          Stride<Stride<_32,_1>,Stride<_16,_8,_128>>>;
//   using BLayout = Layout<Shape <Shape < _4,_8>,Shape <_2, _2>>,
//                          Stride<Stride<_16,_1>,Stride<_8,_64>>>;
//   using CLayout = SM80_16x8_Row;
// with, in the same file,
//   using SM80_16x8_Row = Layout<Shape <Shape < _4,_8>,Shape < _2,_2>>,
//                                Stride<Stride<_32,_1>,Stride<_16,_8>>>;
// They map (thread, value) to a coordinate of the M×K (A), N×K (B) or M×N (C, D) matrix encoded
// column-major, (m, k) -> m + k·M (media/docs/cpp/cute/0t_mma_atom.md: "ALayout: Mapping of
// (thread,value) pairs to coordinates in the MxK A matrix", "(m, k) == m + k * M"); M = 16, N = 8.
// The values are the bf16 (A, B) or fp32 (C, D) elements in register order: mma_unpack
// (include/cute/atom/mma_traits.hpp) recasts the fragment of values to the instruction's
// registers (ARegisters = uint32_t[4], BRegisters = uint32_t[2], C/D = float[4] in mma_sm80.hpp),
// so values 2i and 2i+1 share register i, 2i in the low half (the GPU is little-endian).
const CuteLayout kMmaA{{{4, 32}, {8, 1}}, {{2, 16}, {2, 8}, {2, 128}}};
const CuteLayout kMmaB{{{4, 16}, {8, 1}}, {{2, 8}, {2, 64}}};
const CuteLayout kMmaC{{{4, 32}, {8, 1}}, {{2, 16}, {2, 8}}};

// copy_traits_sm75.hpp: for each ldmatrix form, SrcLayout and DstLayout map (thread, value bit)
// to an abstract bit index (include/cute/atom/copy_traits.hpp: "(Logical src thread id (tid),
// Logical src value id (vid)) -> bit"); a bit moves from the source (thread, bit) to the destination
// (thread, bit) with the same index. A source thread's value is the 128-bit row at its address
// (copy_sm75.hpp: copy(uint128_t const& smem_src, ...)), bit b being bit b % 16 of the b / 16-th
// 16-bit element; a destination thread's value bit v is bit v % 32 of register v / 32
// (DRegisters = uint32_t[N]). copy_sm75.hpp pairs each with its instruction:
//   SM75_U32x1_LDSM_N  "ldmatrix.sync.aligned.x1.m8n8.shared.b16"
//   SM75_U32x2_LDSM_N  "ldmatrix.sync.aligned.x2.m8n8.shared.b16"
//   SM75_U32x4_LDSM_N  "ldmatrix.sync.aligned.x4.m8n8.shared.b16"
//   SM75_U16x2_LDSM_T  "ldmatrix.sync.aligned.x1.trans.m8n8.shared.b16"
//   SM75_U16x4_LDSM_T  "ldmatrix.sync.aligned.x2.trans.m8n8.shared.b16"
//   SM75_U16x8_LDSM_T  "ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16"
struct Ldsm {
    const char* cute_name;
    int n;
    bool trans;
    CuteLayout src, dst;
};
const Ldsm kLdsm[6] = {
    // SrcLayout = Layout<Shape <Shape <  _8,_4>,_128>, Stride<Stride<_128,_0>,  _1>>;
    // DstLayout = Layout<Shape <_32,_32>, Stride<_32, _1>>;
    {"SM75_U32x1_LDSM_N", 1, false, {{{8, 128}, {4, 0}}, {{128, 1}}}, {{{32, 32}}, {{32, 1}}}},
    // SrcLayout = Layout<Shape <Shape < _16,_2>,_128>, Stride<Stride<_128,_0>,  _1>>;
    // DstLayout = Layout<Shape <_32,Shape <_32,   _2>>, Stride<_32,Stride< _1,_1024>>>;
    {"SM75_U32x2_LDSM_N", 2, false, {{{16, 128}, {2, 0}}, {{128, 1}}}, {{{32, 32}}, {{32, 1}, {2, 1024}}}},
    // SrcLayout = Layout<Shape < _32,_128>, Stride<_128,  _1>>;
    // DstLayout = Layout<Shape <_32,Shape <_32,   _4>>, Stride<_32,Stride< _1,_1024>>>;
    {"SM75_U32x4_LDSM_N", 4, false, {{{32, 128}}, {{128, 1}}}, {{{32, 32}}, {{32, 1}, {4, 1024}}}},
    // SrcLayout = Layout<Shape <Shape <  _8,_4>,_128>, Stride<Stride<_128,_0>,  _1>>;
    // DstLayout = Layout<Shape <Shape <  _4, _8>,Shape <_16,  _2>>, Stride<Stride<_256,_16>,Stride< _1,_128>>>;
    {"SM75_U16x2_LDSM_T", 1, true, {{{8, 128}, {4, 0}}, {{128, 1}}}, {{{4, 256}, {8, 16}}, {{16, 1}, {2, 128}}}},
    // SrcLayout = Layout<Shape <Shape < _16,_2>,_128>, Stride<Stride<_128,_0>,  _1>>;
    // DstLayout = Layout<Shape <Shape <  _4, _8>,Shape <_16,  _2,   _2>>,
    //                    Stride<Stride<_256,_16>,Stride< _1,_128,_1024>>>;
    {"SM75_U16x4_LDSM_T", 2, true, {{{16, 128}, {2, 0}}, {{128, 1}}},
     {{{4, 256}, {8, 16}}, {{16, 1}, {2, 128}, {2, 1024}}}},
    // SrcLayout = Layout<Shape < _32,_128>, Stride<_128,  _1>>;
    // DstLayout = Layout<Shape <Shape <  _4, _8>,Shape <_16,  _2,   _4>>,
    //                    Stride<Stride<_256,_16>,Stride< _1,_128,_1024>>>;
    {"SM75_U16x8_LDSM_T", 4, true, {{{32, 128}}, {{128, 1}}}, {{{4, 256}, {8, 16}}, {{16, 1}, {2, 128}, {4, 1024}}}},
};

// The PTX ISA (docs.nvidia.com/cuda/parallel-thread-execution; ISA 8.7 numbering):
// §9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type", .bf16 A (a0..a7, four
// .f16x2-style registers, "Elements (low to high)"), B (b0..b3, two registers), .f32 C/D (c0..c3):
//   groupID = %laneid >> 2, threadID_in_group = %laneid % 4
//   A: row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise;
//      col = (threadID_in_group * 2) + (i & 0x1) for ai where i < 4, the same + 8 for i >= 4
//   B: row = (threadID_in_group * 2) + (i & 0x1) for bi where i < 2, the same + 8 for i >= 2;
//      col = groupID
//   C: row = groupID for ci where i < 2, groupID + 8 for i >= 2; col = (threadID_in_group * 2) + (i & 0x1)
// (A is M×K = 16×16, row = m, col = k; B is K×N = 16×8, row = k, col = n; C is M×N.)
struct RowCol {
    int row, col;
};
RowCol ptx_a(int lane, int i) {
    const int g = lane >> 2, t = lane % 4;
    return {(i < 2 || (i >= 4 && i < 6)) ? g : g + 8, t * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}
RowCol ptx_b(int lane, int i) { return {(lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0), lane >> 2}; }
RowCol ptx_c(int lane, int i) { return {i < 2 ? lane >> 2 : (lane >> 2) + 8, (lane % 4) * 2 + (i & 1)}; }
// §9.7.14.5.15 ldmatrix: "Addresses addr0–addr7 correspond to the rows of the first matrix,
// addresses addr8–addr15 correspond to the rows of the second matrix, and so on" (threads 0–7 give
// addr0–addr7, ...); "Each thread in a warp loads fragments of a row, with thread 0 receiving the
// first fragment in its register r, and so on. A group of four threads loads an entire row of the
// matrix" (Figure 104: lane l holds elements 2·(l % 4) and 2·(l % 4) + 1 of row l / 4); "When .num
// = .x2, the elements of the second matrix are loaded in the next destination register"; ".trans
// indicates that the matrix is loaded in column-major format" (Figure 104 read down the columns:
// lane l holds element l / 4 of rows 2·(l % 4) and 2·(l % 4) + 1).
// Register j, half h of lane l: which lane's row address, and which 16-bit element of that row.
RowCol ptx_ldmatrix(int lane, int j, int h, bool trans) {
    const int g = lane / 4, t = lane % 4;
    return trans ? RowCol{8 * j + 2 * t + h, g} : RowCol{8 * j + g, 2 * t + h};
}

// ---- what the CuTe tables say -------------------------------------------------------------------
// ldmatrix per CuTe: register j, half h of lane l comes from which source lane's row, which element;
// checks on the way that every 16-bit element moves whole, from a lane whose address the PTX ISA
// says is used (below 8·N). Returns false (with *why) if the table does not say that.
bool cute_ldmatrix(const Ldsm& f, int lane, int j, int h, RowCol* out, std::string* why) {
    const int nthr = CuteLayout::size(f.src.thr), nval = CuteLayout::size(f.src.val);
    std::vector<std::pair<int, int>> inv(32 * 128 * 4, {-1, -1});  // bit -> the lowest (src thread, src bit)
    for (int t = 0; t < nthr; t++)
        for (int b = 0; b < nval; b++) {
            const int idx = f.src(t, b);
            if (idx < 0 || idx >= (int)inv.size()) return *why = "source bit index out of range", false;
            if (inv[idx].first < 0) inv[idx] = {t, b};
        }
    const int first = f.dst(lane, 32 * j + 16 * h);
    const auto [st, sb] = inv[first];
    if (st < 0) return *why = fmt("destination bit %d has no source", first), false;
    if (sb % 16 != 0) return *why = "an element does not start at a 16-bit boundary", false;
    for (int q = 0; q < 16; q++) {
        const int idx = f.dst(lane, 32 * j + 16 * h + q);
        if (inv[idx].first != st || inv[idx].second != sb + q)
            return *why = fmt("bit %d of lane %d register %d half %d does not follow the element", q, lane, j, h), false;
    }
    if (st >= 8 * f.n) return *why = fmt("a source lane %d >= 8·%d", st, f.n), false;
    *out = {st, sb / 16};
    return true;
}

// ==== device code ===============================================================================

// One warp per block, block b runs case b: lane l of case b reads its registers from slot b·32 + l.
// `reps` products accumulate into the same D (registers a: 4·reps per slot, b: 2·reps).
__device__ void k_mma(float* d, const uint32_t* a, const uint32_t* b, const float* c, int reps) {
    const int s = blockIdx.x * 32 + threadIdx.x;
    float acc[4];
    for (int i = 0; i < 4; i++) acc[i] = c[4 * s + i];
    for (int r = 0; r < reps; r++) {
        const uint32_t ra[4] = {a[(reps * s + r) * 4], a[(reps * s + r) * 4 + 1], a[(reps * s + r) * 4 + 2],
                                a[(reps * s + r) * 4 + 3]};
        const uint32_t rb[2] = {b[(reps * s + r) * 2], b[(reps * s + r) * 2 + 1]};
        tc::mma_m16n8k16_bf16(acc, ra, rb);
    }
    for (int i = 0; i < 4; i++) d[4 * s + i] = acc[i];
}

// ldmatrix of 64 rows of 8 u16 (content), from static or dynamic shared memory: lane l passes row
// sel[l], or when sel[l] < 0 a deliberately bad address (misaligned, not shared memory), which a
// lane whose address the instruction does not use may hold. out[4·l + j] = register j of lane l.
template <int N, bool T>
__device__ void k_ldmatrix(uint32_t* out, const uint16_t* content, const int* sel, bool dynamic) {
    __shared__ __align__(16) uint16_t st[64 * 8];
    FINCH_DYNAMIC_SMEM(uint16_t, dy);
    uint16_t* s = dynamic ? dy : st;
    const int lane = threadIdx.x;
    for (int i = lane; i < 64 * 8; i += 32) s[i] = content[i];
    __syncwarp();
    const void* p = sel[lane] >= 0 ? (const void*)(s + 8 * sel[lane]) : (const void*)((const char*)content + 3);
    uint32_t r[N];
    if (T) tc::ldmatrix_trans<N>(r, p);
    else tc::ldmatrix<N>(r, p);
    for (int j = 0; j < N; j++) out[4 * lane + j] = r[j];
}

// D = A·B through shared memory and ldmatrix, as a kernel does: A 16×16 stored row-major
// (a_mk: [m][k], ldmatrix.x4) or column-major ([k][m], ldmatrix.x4.trans); B 16×8 stored [n][k]
// (b_nk, ldmatrix.x2) or [k][n] (ldmatrix.x2.trans). Rows are 24 elements apart (48 bytes: 16-byte
// aligned, not a power of two). d: lane l's four fp32.
constexpr int kLd = 24;
__device__ void k_ld_mma(float* d, const bf16* a, const bf16* b, bool a_mk, bool b_nk) {
    __shared__ __align__(16) bf16 as[16 * kLd], bs[16 * kLd];
    const int lane = threadIdx.x;
    for (int i = lane; i < 16 * kLd; i += 32) as[i] = a[i], bs[i] = b[i];
    __syncwarp();
    uint32_t ra[4], rb[2];
    if (a_mk) tc::ldmatrix<4>(ra, &as[(lane % 16) * kLd + (lane / 16) * 8]);
    else tc::ldmatrix_trans<4>(ra, &as[(lane % 8 + (lane / 16) * 8) * kLd + ((lane / 8) % 2) * 8]);
    if (b_nk) tc::ldmatrix<2>(rb, &bs[(lane % 8) * kLd + ((lane / 8) % 2) * 8]);
    else tc::ldmatrix_trans<2>(rb, &bs[(lane % 16) * kLd]);
    float acc[4] = {0, 0, 0, 0};
    tc::mma_m16n8k16_bf16(acc, ra, rb);
    for (int i = 0; i < 4; i++) d[4 * lane + i] = acc[i];
}

__device__ void k_pack(uint32_t* out, const float* lo, const float* hi, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = tc::pack_bf16x2(lo[i], hi[i]);
}

// 16 threads copy 64 floats of g into static or dynamic shared memory, chunk t (floats 4t..4t+3)
// from g + 4t when t < valid_chunks, else zero-filled with the source one past g's end (not read).
// out[0..63]: what each thread reads of its chunk before the wait; out[64..127]: after it.
__device__ void k_cp_basic(float* out, const float* g, int valid_chunks, bool dynamic) {
    __shared__ __align__(16) float st[64];
    FINCH_DYNAMIC_SMEM(float, dy);
    float* s = dynamic ? dy : st;
    const int t = threadIdx.x;
    if (t >= 16) return;
    tc::cp_async_16(s + 4 * t, t < valid_chunks ? g + 4 * t : g + 64, t < valid_chunks);
    tc::cp_async_commit();
    for (int e = 0; e < 4; e++) out[4 * t + e] = s[4 * t + e];
    tc::cp_async_wait<0>();
    for (int e = 0; e < 4; e++) out[64 + 4 * t + e] = s[4 * t + e];
}

// One thread: group 0 = chunk 0, group 1 = chunk 1, then chunk 2 issued but not committed.
// Snapshots of s[0..15] (4 chunks of 4 floats) into out[16·i ..], i = 0..4: after wait<1>, after
// wait<0>, after commit (group 2) + wait<0>; then chunk 3 as group 3, followed by an empty group
// 4: after wait<2> (group 3 is one of the newest two: pending), after wait<1> (landed).
__device__ void k_cp_groups(float* out, const float* g) {
    __shared__ __align__(16) float s[16];
    auto snap = [&](int i) {
        for (int e = 0; e < 16; e++) out[16 * i + e] = s[e];
    };
    tc::cp_async_16(s + 0, g + 0, true);
    tc::cp_async_commit();  // group 0
    tc::cp_async_16(s + 4, g + 4, true);
    tc::cp_async_commit();  // group 1
    tc::cp_async_16(s + 8, g + 8, true);  // not committed
    tc::cp_async_wait<1>();
    snap(0);  // chunk 0 landed; chunk 1 (the newest group) and chunk 2 (uncommitted) pending
    tc::cp_async_wait<0>();
    snap(1);  // chunks 0, 1; chunk 2 still pending (wait_group does not wait for uncommitted copies)
    tc::cp_async_commit();  // group 2: chunk 2
    tc::cp_async_wait<0>();
    snap(2);  // chunks 0, 1, 2
    tc::cp_async_16(s + 12, g + 12, true);
    tc::cp_async_commit();  // group 3: chunk 3
    tc::cp_async_commit();  // group 4: empty
    tc::cp_async_wait<2>();
    snap(3);  // chunk 3 pending: groups 3 and 4 are the newest two
    tc::cp_async_wait<1>();
    snap(4);  // chunk 3 landed: only the empty group 4 may remain
}

// Dynamic shared memory: out[0], out[1]: its address mod 128 and mod 256; block 0 writes every
// float of it, then each block b copies it to out[2 + b·n ..] (blocks > 0 must see NaN).
__device__ void k_dyn(float* out, int n) {
    FINCH_DYNAMIC_SMEM(float, s);
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = (float)((uintptr_t)s % 128), out[1] = (float)((uintptr_t)s % 256);
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = (float)i;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[2 + blockIdx.x * n + i] = s[i];
}

// Kernels that break a rule, one per `which` (see the expect_failure calls in main).
__device__ void k_bad(int which, float* g, float* gdst) {
    __shared__ __align__(16) uint16_t s[32 * 8];
    __shared__ __align__(16) float sf[64];
    FINCH_DYNAMIC_SMEM(float, dy);
    const int lane = threadIdx.x % 32;
    uint32_t r4[4], r2[2];
    const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float d[4] = {0, 0, 0, 0};
    switch (which) {
        case 0:  // lane 31 leaves before the mma
            if (lane == 31) return;
            tc::mma_m16n8k16_bf16(d, a, b);
            break;
        case 1:  // launched with 48 threads: the second warp has 16
            tc::mma_m16n8k16_bf16(d, a, b);
            break;
        case 2:  // .x4 on half the warp, .x2 on the other
            if (lane < 16) tc::ldmatrix<4>(r4, s + 8 * lane);
            else tc::ldmatrix<2>(r2, s + 8 * lane);
            break;
        case 3:  // mma on half the warp, ldmatrix on the other
            if (lane < 16) tc::mma_m16n8k16_bf16(d, a, b);
            else tc::ldmatrix<4>(r4, s + 8 * lane);
            break;
        case 4:  // the same instruction, reached from two places (divergent branches)
            if (lane < 16) {
                tc::mma_m16n8k16_bf16(d, a, b);
            } else {
                tc::mma_m16n8k16_bf16(d, a, b);
            }
            break;
        case 5:  // lane 5's row 8 bytes off
            tc::ldmatrix<4>(r4, (const char*)(s + 8 * lane) + (lane == 5 ? 8 : 0));
            break;
        case 6:  // lane 3's row in global memory
            tc::ldmatrix_trans<4>(r4, lane == 3 ? (const void*)g : (const void*)(s + 8 * lane));
            break;
        case 7:  // lane 9's row runs past the end of the dynamic shared memory (launched with 264 bytes)
            tc::ldmatrix<2>(r2, lane == 9 ? (const void*)((const char*)dy + 256) : (const void*)(s + 8 * lane));
            break;
        case 8:
            if (lane == 0) tc::cp_async_16((char*)sf + 8, g, true);
            break;
        case 9:
            if (lane == 0) tc::cp_async_16(sf, g + 1, true);
            break;
        case 10:
            if (lane == 0) tc::cp_async_16(gdst, g, true);
            break;
        case 11:
            if (lane == 0) tc::cp_async_16(sf, sf + 32, true);
            break;
        case 12:  // ends with a committed copy in flight
            if (lane == 0) tc::cp_async_16(sf, g, true), tc::cp_async_commit();
            break;
        case 13:  // ends with an uncommitted copy (wait_group does not wait for it)
            if (lane == 0) tc::cp_async_16(sf, g, true), tc::cp_async_wait<0>();
            break;
        case 14:  // a store to the destination while the copy is in flight
            if (lane == 0) {
                tc::cp_async_16(sf, g, true);
                tc::cp_async_commit();
                sf[1] = 1.0f;
                tc::cp_async_wait<0>();
            }
            break;
        case 15:  // two copies in flight to one destination
            if (lane == 0) {
                tc::cp_async_16(sf, g, true);
                tc::cp_async_16(sf, g + 4, true);
                tc::cp_async_commit();
                tc::cp_async_wait<0>();
            }
            break;
        case 16:  // the source written while the copy is in flight
            if (lane == 0) {
                tc::cp_async_16(sf, g, true);
                tc::cp_async_commit();
                g[2] = 7.0f;
                tc::cp_async_wait<0>();
            }
            break;
        case 17:  // a read one float past the dynamic shared memory (launched with 256 bytes)
            if (lane == 0) g[0] = dy[64];
            break;
    }
    (void)r2;
}

// ==== host side =================================================================================

uint32_t bf16_bits(float x) { return __float2bfloat16_rn(x).__x; }
float bf16_value(uint32_t bits) {
    const uint32_t u = bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Exact-size, 64-byte aligned host buffers ("global memory"): ASan flags a byte past the end.
template <typename T>
struct Buf {
    T* p = nullptr;
    size_t n = 0;
    explicit Buf(size_t count, T fill = T()) : n(count) {
        if (posix_memalign((void**)&p, 64, count * sizeof(T)) != 0) abort();
        for (size_t i = 0; i < n; i++) p[i] = fill;
    }
    ~Buf() { free(p); }
    Buf(const Buf&) = delete;
    T& operator[](size_t i) { return p[i]; }
};

// One mma case as matrices: A (m, k), B (k, n), C (m, n); to and from the registers per CuTe.
struct MmaMats {
    float A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
};
void to_regs(const MmaMats& mm, uint32_t* a, uint32_t* b, float* c) {  // a[32·4], b[32·2], c[32·4]
    for (int t = 0; t < 32; t++) {
        for (int i = 0; i < 4; i++) a[4 * t + i] = 0, c[4 * t + i] = 0;
        b[2 * t] = b[2 * t + 1] = 0;
        for (int v = 0; v < 8; v++) {
            const int idx = kMmaA(t, v), m = idx % 16, k = idx / 16;
            a[4 * t + v / 2] |= bf16_bits(mm.A[m][k]) << (16 * (v % 2));
        }
        for (int v = 0; v < 4; v++) {
            const int idx = kMmaB(t, v), n = idx % 8, k = idx / 8;
            b[2 * t + v / 2] |= bf16_bits(mm.B[k][n]) << (16 * (v % 2));
        }
        for (int v = 0; v < 4; v++) {
            const int idx = kMmaC(t, v), m = idx % 16, n = idx / 16;
            c[4 * t + v] = mm.C[m][n];
        }
    }
}
void from_regs(const float* d, float D[16][8]) {
    for (int t = 0; t < 32; t++)
        for (int v = 0; v < 4; v++) {
            const int idx = kMmaC(t, v);
            D[idx % 16][idx / 16] = d[4 * t + v];
        }
}

// Runs cases.size() mma cases (one block each) and returns each D read back through CuTe's CLayout.
std::vector<std::array<std::array<float, 8>, 16>> run_mma(const std::vector<MmaMats>& cases) {
    const size_t n = cases.size();
    Buf<uint32_t> a(n * 128), b(n * 64);
    Buf<float> c(n * 128), d(n * 128, NAN);
    for (size_t i = 0; i < n; i++) to_regs(cases[i], &a[i * 128], &b[i * 64], &c[i * 128]);
    emu::launch("mma", (unsigned)n, 32, [&] { k_mma(d.p, a.p, b.p, c.p, 1); });
    std::vector<std::array<std::array<float, 8>, 16>> out(n);
    for (size_t i = 0; i < n; i++) {
        float D[16][8];
        from_regs(&d[i * 128], D);
        for (int m = 0; m < 16; m++)
            for (int j = 0; j < 8; j++) out[i][m][j] = D[m][j];
    }
    return out;
}

void test_tables() {
    // CuTe's mma layouts are bijections onto the matrices and equal the PTX ISA's formulas.
    auto check = [](const char* what, const CuteLayout& l, int vals, int rows, RowCol (*ptx)(int, int)) {
        std::vector<int> seen(16 * 16, 0);
        int mismatches = 0, dup = 0;
        for (int t = 0; t < 32; t++)
            for (int v = 0; v < vals; v++) {
                const int idx = l(t, v);
                const int r = idx % rows, cidx = idx / rows;  // (m or n, k) for A and B, (m, n) for C
                if (seen[idx]++) dup++;
                const RowCol p = ptx(t, v);
                // PTX's (row, col) is A (m, k), B (k, n), C (m, n); CuTe's B is (n, k).
                const bool b = rows == 8;
                if (b ? (p.row != cidx || p.col != r) : (p.row != r || p.col != cidx)) mismatches++;
            }
        Case k(fmt("CuTe %s equals the PTX ISA's fragment formulas (%d elements)", what, 32 * vals));
        k.expect("one lane and value per element", dup == 0);
        k.expect("same (row, col) for every (lane, value)", mismatches == 0);
    };
    check("SM80_16x8x16 ALayout", kMmaA, 8, 16, ptx_a);
    check("SM80_16x8x16 BLayout", kMmaB, 4, 8, ptx_b);
    check("SM80_16x8x16 CLayout", kMmaC, 4, 16, ptx_c);
    for (const Ldsm& f : kLdsm) {
        int mismatches = 0;
        std::string why;
        for (int l = 0; l < 32 && why.empty(); l++)
            for (int j = 0; j < f.n && why.empty(); j++)
                for (int h = 0; h < 2 && why.empty(); h++) {
                    RowCol c;
                    if (!cute_ldmatrix(f, l, j, h, &c, &why)) break;
                    const RowCol p = ptx_ldmatrix(l, j, h, f.trans);
                    mismatches += p.row != c.row || p.col != c.col;
                }
        Case k(fmt("CuTe %s equals the PTX ISA's ldmatrix .x%d%s layout (%d elements)", f.cute_name, f.n,
                   f.trans ? ".trans" : "", 64 * f.n));
        k.expect("whole 16-bit elements from lanes 0..8N-1", why.empty());
        k.expect("same (row, element) for every (lane, register, half)", mismatches == 0);
        if (!why.empty()) k.errs += " (" + why + ")";
    }
}

// Every element of A, B and C alone (one-hot), through the emulated mma, against CuTe's layouts.
// A one-hot at (m0, k0) with B[k][n] = 1 + n + 8k (all distinct) gives D[m0][n] = B[k0][n] and zeros;
// B one-hot at (k0, n0) with A[m][k] = 1 + m + 16k gives D[m][n0] = A[m][k0]; C one-hot gives D = C.
// Everything is a small integer, so exact; a wrong element anywhere changes D.
void test_mma_layouts() {
    for (int op = 0; op < 3; op++) {
        const CuteLayout& l = op == 0 ? kMmaA : op == 1 ? kMmaB : kMmaC;
        const int vals = op == 0 ? 8 : 4;
        std::vector<MmaMats> cases;
        std::vector<std::pair<int, int>> where;  // the (row, col) of the matrix that is one-hot
        for (int t = 0; t < 32; t++)
            for (int v = 0; v < vals; v++) {
                MmaMats mm;
                const int idx = l(t, v);
                if (op == 0) {
                    for (int k = 0; k < 16; k++)
                        for (int n = 0; n < 8; n++) mm.B[k][n] = (float)(1 + n + 8 * k);
                    mm.A[idx % 16][idx / 16] = 1.0f;
                    where.push_back({idx % 16, idx / 16});
                } else if (op == 1) {
                    for (int m = 0; m < 16; m++)
                        for (int k = 0; k < 16; k++) mm.A[m][k] = (float)(1 + m + 16 * k);
                    mm.B[idx / 8][idx % 8] = 1.0f;
                    where.push_back({idx / 8, idx % 8});
                } else {
                    mm.C[idx % 16][idx / 16] = 1.0f;
                    where.push_back({idx % 16, idx / 16});
                }
                cases.push_back(mm);
            }
        const auto got = run_mma(cases);
        int wrong = 0;
        std::string first;
        for (size_t i = 0; i < cases.size(); i++) {
            const auto [r0, c0] = where[i];
            for (int m = 0; m < 16; m++)
                for (int n = 0; n < 8; n++) {
                    const float want = op == 0   ? (m == r0 ? cases[i].B[c0][n] : 0.0f)
                                       : op == 1 ? (n == c0 ? cases[i].A[m][r0] : 0.0f)
                                                 : (m == r0 && n == c0 ? 1.0f : 0.0f);
                    if (!(got[i][m][n] == want)) {
                        if (wrong++ == 0)
                            first = fmt(" (first: lane %zu value %zu, D[%d][%d] = %g, want %g)", i / vals, i % vals, m, n,
                                        got[i][m][n], want);
                    }
                }
        }
        Case k(fmt("mma %s fragment: each of its %d elements one-hot, D exact per CuTe's layouts",
                   op == 0 ? "A" : op == 1 ? "B" : "C", 32 * vals));
        k.expect("all D exact", wrong == 0);
        if (wrong) k.errs += first;
    }
    // Every element distinct at once: A, B, C small integers (|D| < 2^24, so exact in any order).
    std::vector<MmaMats> cases(8);
    Rng r(11);
    for (auto& mm : cases) {
        for (int m = 0; m < 16; m++)
            for (int k = 0; k < 16; k++) mm.A[m][k] = (float)(r.below(255) - 127);
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 8; n++) mm.B[k][n] = (float)(r.below(255) - 127);
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 8; n++) mm.C[m][n] = (float)(r.below(20001) - 10000);
    }
    const auto got = run_mma(cases);
    int wrong = 0;
    for (size_t i = 0; i < cases.size(); i++)
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 8; n++) {
                double want = cases[i].C[m][n];
                for (int k = 0; k < 16; k++) want += (double)cases[i].A[m][k] * cases[i].B[k][n];
                wrong += got[i][m][n] != want;
            }
    Case k("mma with every element distinct (8 cases of integer A, B, C): D = C + A·B exactly");
    k.expect("all exact", wrong == 0);
}

// Random bf16 A1, B1, A2, B2 and fp32 C: D = C + A1·B1 + A2·B2 through two chained mma (C
// accumulates in the registers). Products of bf16 values are exact in fp32, so D's only errors are
// the 32 fp32 additions; for recursive summation in ANY order, |D - exact| <= γ_32 · Σ|terms| with
// γ_n = n·u / (1 - n·u), u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, §4.2).
// That bound per element is the tolerance (and reported: the largest error / bound).
void test_mma_numerics() {
    const int ncases = 64, reps = 2;
    Rng r(5);
    Buf<uint32_t> a(ncases * 32 * 4 * reps), b(ncases * 32 * 2 * reps);
    Buf<float> c(ncases * 128), d(ncases * 128, NAN);
    std::vector<MmaMats> mats(ncases * reps);
    for (int i = 0; i < ncases; i++)
        for (int rep = 0; rep < reps; rep++) {
            MmaMats& mm = mats[i * reps + rep];
            for (int m = 0; m < 16; m++)
                for (int k = 0; k < 16; k++) mm.A[m][k] = bf16_value(bf16_bits(r.normal()));
            for (int k = 0; k < 16; k++)
                for (int n = 0; n < 8; n++) mm.B[k][n] = bf16_value(bf16_bits(r.normal()));
            for (int m = 0; m < 16; m++)
                for (int n = 0; n < 8; n++) mm.C[m][n] = rep == 0 ? 4.0f * r.normal() : 0.0f;
            uint32_t ra[128], rb[64];
            float rc[128];
            to_regs(mm, ra, rb, rc);
            for (int t = 0; t < 32; t++) {
                const int s = i * 32 + t;
                for (int q = 0; q < 4; q++) a[(reps * s + rep) * 4 + q] = ra[4 * t + q];
                for (int q = 0; q < 2; q++) b[(reps * s + rep) * 2 + q] = rb[2 * t + q];
                if (rep == 0)
                    for (int q = 0; q < 4; q++) c[4 * s + q] = rc[4 * t + q];
            }
        }
    emu::launch("mma chained", ncases, 32, [&] { k_mma(d.p, a.p, b.p, c.p, reps); });
    const double u = std::ldexp(1.0, -24), gamma = 32 * u / (1 - 32 * u);
    double worst_ratio = 0;
    int over = 0, nonfinite = 0;
    for (int i = 0; i < ncases; i++) {
        float D[16][8];
        from_regs(&d[i * 128], D);
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 8; n++) {
                double exact = mats[i * reps].C[m][n], mag = std::fabs(exact);
                for (int rep = 0; rep < reps; rep++)
                    for (int k = 0; k < 16; k++) {
                        const double p = (double)mats[i * reps + rep].A[m][k] * mats[i * reps + rep].B[k][n];
                        exact += p;
                        mag += std::fabs(p);
                    }
                if (!std::isfinite(D[m][n])) {
                    nonfinite++;
                    continue;
                }
                const double ratio = std::fabs(D[m][n] - exact) / (gamma * mag);
                worst_ratio = std::max(worst_ratio, ratio);
                over += ratio > 1;
            }
    }
    Case k(fmt("mma numerics: %d cases of D = C + A1·B1 + A2·B2 (random bf16, fp32 C) vs double", ncases));
    k.expect("all finite", nonfinite == 0);
    k.expect("|error| <= γ_32·Σ|terms| everywhere", over == 0);
    k.errs += fmt(" (largest error / bound %.3f)", worst_ratio);
    // and the error is not zero by accident of an exact computation somewhere else:
    k.expect("some rounding happened (fp32, not double)", worst_ratio > 0);
}

// Each ldmatrix form, from static and from dynamic shared memory, against CuTe's tables: 64 rows of
// distinct values, lane l pointing at row (13·l + 5) % 64 (rows in no particular order), lanes whose
// address the instruction does not use holding a bad one.
void test_ldmatrix_layouts() {
    Buf<uint16_t> content(64 * 8);
    for (int i = 0; i < 64 * 8; i++) content[i] = (uint16_t)(0x4000 + i);
    for (const Ldsm& f : kLdsm)
        for (int dynamic = 0; dynamic < 2; dynamic++) {
            Buf<int> sel(32);
            for (int l = 0; l < 32; l++) sel[l] = l < 8 * f.n ? (13 * l + 5) % 64 : -1;
            Buf<uint32_t> out(32 * 4, 0xdeadbeef);
            const size_t smem = dynamic ? 64 * 8 * 2 : 0;
            emu::launch("ldmatrix", 1, 32, smem, [&] {
                const bool dy = dynamic;
                if (f.n == 1 && !f.trans) k_ldmatrix<1, false>(out.p, content.p, sel.p, dy);
                if (f.n == 2 && !f.trans) k_ldmatrix<2, false>(out.p, content.p, sel.p, dy);
                if (f.n == 4 && !f.trans) k_ldmatrix<4, false>(out.p, content.p, sel.p, dy);
                if (f.n == 1 && f.trans) k_ldmatrix<1, true>(out.p, content.p, sel.p, dy);
                if (f.n == 2 && f.trans) k_ldmatrix<2, true>(out.p, content.p, sel.p, dy);
                if (f.n == 4 && f.trans) k_ldmatrix<4, true>(out.p, content.p, sel.p, dy);
            });
            int wrong = 0;
            std::string why, first;
            for (int l = 0; l < 32; l++)
                for (int j = 0; j < f.n; j++)
                    for (int h = 0; h < 2; h++) {
                        RowCol src;
                        if (!cute_ldmatrix(f, l, j, h, &src, &why)) continue;
                        const uint16_t want = content[8 * sel[src.row] + src.col];
                        const uint16_t got = (uint16_t)(out[4 * l + j] >> (16 * h));
                        if (got != want && wrong++ == 0)
                            first = fmt(" (first: lane %d register %d half %d = %#x, want %#x)", l, j, h, got, want);
                    }
            Case k(fmt("ldmatrix.x%d%s from %s shared memory vs CuTe %s (%d elements)", f.n, f.trans ? ".trans" : "",
                       dynamic ? "dynamic" : "static", f.cute_name, 64 * f.n));
            k.expect("table read", why.empty());
            k.expect("every element", wrong == 0);
            k.errs += first;
        }
}

// ldmatrix feeding mma with a kernel's addressing, each orientation of A and B (integers: exact).
void test_ldmatrix_mma() {
    Rng r(9);
    float A[16][16], B[16][8];
    for (int m = 0; m < 16; m++)
        for (int k = 0; k < 16; k++) A[m][k] = (float)(r.below(33) - 16);
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 8; n++) B[k][n] = (float)(r.below(33) - 16);
    for (int a_mk = 0; a_mk < 2; a_mk++)
        for (int b_nk = 0; b_nk < 2; b_nk++) {
            Buf<bf16> a(16 * kLd, bf16{0xffff}), b(16 * kLd, bf16{0xffff});  // padding: NaN
            for (int m = 0; m < 16; m++)
                for (int k = 0; k < 16; k++) (a_mk ? a[m * kLd + k] : a[k * kLd + m]) = __float2bfloat16_rn(A[m][k]);
            for (int k = 0; k < 16; k++)
                for (int n = 0; n < 8; n++) (b_nk ? b[n * kLd + k] : b[k * kLd + n]) = __float2bfloat16_rn(B[k][n]);
            Buf<float> d(128, NAN);
            emu::launch("ldmatrix + mma", 1, 32, [&] { k_ld_mma(d.p, a.p, b.p, a_mk, b_nk); });
            float D[16][8];
            from_regs(d.p, D);
            int wrong = 0;
            for (int m = 0; m < 16; m++)
                for (int n = 0; n < 8; n++) {
                    double want = 0;
                    for (int k = 0; k < 16; k++) want += (double)A[m][k] * B[k][n];
                    wrong += D[m][n] != want;
                }
            Case k(fmt("ldmatrix%s (A stored %s) + ldmatrix%s (B stored %s) feed mma: D = A·B exactly",
                       a_mk ? ".x4" : ".x4.trans", a_mk ? "[m][k]" : "[k][m]", b_nk ? ".x2" : ".x2.trans",
                       b_nk ? "[n][k]" : "[k][n]"));
            k.expect("all exact", wrong == 0);
        }
}

// pack_bf16x2: round to nearest even, lo in the low half. Expected bits worked out by hand.
void test_pack() {
    struct P {
        float lo, hi;
        uint32_t want;  // ~0u: only "both halves NaN"
    };
    const P ps[] = {
        {1.0f, -2.0f, 0xC0003F80u},
        {1.00390625f, 1.01171875f, 0x3F823F80u},      // 1 + 2^-8 (tie: down to even 1.0), 1 + 3·2^-8 (tie: up to even)
        {1.0f + 0x1p-8f + 0x1p-20f, -0.0f, 0x80003F81u},  // just above the tie: up; -0 keeps its sign
        {3.4e38f, 1e-40f, 0x00017F80u},               // rounds past the largest finite bf16 to inf; a denormal kept
        {NAN, NAN, ~0u},
    };
    const int n = sizeof ps / sizeof ps[0];
    Buf<float> lo(n), hi(n);
    Buf<uint32_t> out(n);
    for (int i = 0; i < n; i++) lo[i] = ps[i].lo, hi[i] = ps[i].hi;
    emu::launch("pack_bf16x2", 1, 32, [&] { k_pack(out.p, lo.p, hi.p, n); });
    int wrong = 0;
    for (int i = 0; i < n; i++) {
        if (ps[i].want == ~0u) {
            auto is_nan = [](uint32_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; };
            wrong += !(is_nan(out[i] & 0xffffu) && is_nan(out[i] >> 16));
        } else {
            wrong += out[i] != ps[i].want;
        }
    }
    Case k("pack_bf16x2: nearest even, ties, -0, overflow to inf, denormal, NaN; lo in the low half");
    k.expect("bits", wrong == 0);
}

bool all_nan(const float* p, int n) {
    for (int i = 0; i < n; i++)
        if (!std::isnan(p[i])) return false;
    return true;
}

void test_cp_async() {
    for (int dynamic = 0; dynamic < 2; dynamic++) {
        Buf<float> g(64), out(128, -1.0f);
        for (int i = 0; i < 64; i++) g[i] = (float)(i + 1);
        const int valid_chunks = 11;  // chunks 11..15 zero-filled, their source one past g's end
        emu::launch("cp.async basic", 1, 32, dynamic ? 256 : 0, [&] { k_cp_basic(out.p, g.p, valid_chunks, dynamic); });
        bool before = all_nan(out.p, 64), after = true;
        for (int i = 0; i < 64; i++) after &= out[64 + i] == (i / 4 < valid_chunks ? g[i] : 0.0f);
        Case k(fmt("cp.async into %s shared memory: NaN until wait_group, then the data; zero-fill",
                   dynamic ? "dynamic" : "static"));
        k.expect("read before the wait: NaN", before);
        k.expect("after wait<0>: data, zeros where not valid (source not read)", after);
    }
    Buf<float> g(16), out(16 * 5, -1.0f);
    for (int i = 0; i < 16; i++) g[i] = (float)(i + 1);
    emu::launch("cp.async groups", 1, 1, [&] { k_cp_groups(out.p, g.p); });
    auto chunk = [&](int snap, int c, bool landed) {
        const float* p = &out[16 * snap + 4 * c];
        if (!landed) return all_nan(p, 4);
        for (int e = 0; e < 4; e++)
            if (p[e] != g[4 * c + e]) return false;
        return true;
    };
    Case k("cp.async groups: wait<N> lands all but the newest N committed groups");
    k.expect("wait<1>: group 0 landed, group 1 (newest) pending", chunk(0, 0, true) && chunk(0, 1, false));
    k.expect("uncommitted copy pending after wait<1>", chunk(0, 2, false));
    k.expect("wait<0>: groups 0, 1 landed", chunk(1, 0, true) && chunk(1, 1, true));
    k.expect("uncommitted copy still pending after wait<0>", chunk(1, 2, false));
    k.expect("commit + wait<0> lands it", chunk(2, 2, true));
    k.expect("wait<2> with groups 3 and 4 (empty) newest: group 3 pending", chunk(3, 3, false) && chunk(3, 2, true));
    k.expect("wait<1>: group 3 landed", chunk(4, 3, true));
}

void test_dynamic_smem() {
    const int n = 300;  // floats
    Buf<float> out(2 + 3 * n, -1.0f);
    emu::launch("dynamic shared memory", 3, 64, 4 * n, [&] { k_dyn(out.p, n); });
    bool b0 = true;
    for (int i = 0; i < n; i++) b0 &= out[2 + i] == (float)i;
    Case k("dynamic shared memory: the launch's size, 128-byte (not 256-byte) aligned, NaN at every block");
    k.expect("address % 128 == 0, % 256 == 128", out[0] == 0.0f && out[1] == 128.0f);
    k.expect("block 0 reads what it wrote (all 1200 bytes)", b0);
    k.expect("blocks 1, 2 read NaN", all_nan(&out[2 + n], 2 * n));
}

int main() {
    test_tables();
    test_mma_layouts();
    test_mma_numerics();
    test_ldmatrix_layouts();
    test_ldmatrix_mma();
    test_pack();
    test_cp_async();
    test_dynamic_smem();

    Buf<float> g(64, 1.0f), gdst(64);
    auto bad = [&](int which, unsigned threads = 32, size_t smem = 256) {
        return [&, which, threads, smem] { emu::launch("k_bad", 1, threads, smem, [&] { k_bad(which, g.p, gdst.p); }); };
    };
    expect_failure("a lane missing at mma (it returned)", "deadlock", bad(0));
    expect_failure("mma in a partial warp (block of 48 threads)", "need all 32 lanes", bad(1, 48));
    expect_failure("ldmatrix .x4 and .x2 in one warp", "disagree", bad(2));
    expect_failure("mma and ldmatrix in one warp", "disagree", bad(3));
    expect_failure("one mma reached from two source lines", "disagree", bad(4));
    expect_failure("an ldmatrix row 8 bytes off", "lane 5's row address", bad(5));
    expect_failure("an ldmatrix row in global memory", "is not in shared memory", bad(6));
    expect_failure("an ldmatrix row past the end of dynamic shared memory", "is not in shared memory", bad(7, 32, 264));
    expect_failure("a cp.async destination not 16-byte aligned", "destination 0x", bad(8));
    expect_failure("a cp.async source not 16-byte aligned", "source 0x", bad(9));
    expect_failure("a cp.async destination in global memory", "is not in shared memory", bad(10));
    expect_failure("a cp.async source in shared memory", "is in shared memory", bad(11));
    expect_failure("a thread ending with a committed copy in flight", "never landed", bad(12));
    expect_failure("a thread ending with an uncommitted copy", "1 of them never committed", bad(13));
    expect_failure("a store to a cp.async destination before its wait", "destination bytes at", bad(14));
    expect_failure("two cp.async in flight to one destination", "destination bytes at", bad(15));
    expect_failure("a cp.async source written before the wait", "was written while the copy was in flight (between", bad(16));
    expect_failure("more dynamic shared memory than any GPU gives", "bytes of dynamic shared memory", bad(0, 32, 300000));
#ifdef EMU_ASAN
    expect_failure("a read past the end of dynamic shared memory (ASan)", "AddressSanitizer", bad(17));
#endif
    return finish("tensorcore");
}
