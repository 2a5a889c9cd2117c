// Matrix multiplication with fused epilogues, and the bias gradient (src/cpu/matmul.rs).
//
// One strided interface serves the three training products (the host picks the strides, so
// transposes cost no copies):
//   forward  Y  = X·W + b      (optionally GELU: writes the pre-activation and GELU(·))
//   backward dX = dY·Wᵀ        (optionally times GELU'(pre-activation), for the MLP)
//            dW += Xᵀ·dY       (fp32 output, accumulated into the gradient buffer)
//
// bf16 runs on tensor cores (tensorcore.cuh: mma.sync m16n8k16, ldmatrix, cp.async), from
// Ampere on. A block computes a BM×BN tile of C with 64×32 warp tiles, streaming BK=32-deep slices
// of A and B through a STAGES-deep cp.async pipeline in dynamic shared memory. Each operand must
// have one contiguous dimension (stride 1): A is k-contiguous (row-major) or m-contiguous, B is
// k-contiguous or n-contiguous. Shared-memory tiles keep global memory's orientation, rows of 16-
// byte chunks XOR-swizzled so that ldmatrix's eight row reads hit distinct banks; the operand
// whose contiguous dimension is not k is read with ldmatrix.trans, so no transpose is ever copied.
// Chunks that are in bounds and 16-byte aligned travel by cp.async (rows past the matrix
// zero-filled); the rest (odd shapes: K or N not a multiple of 8) are loaded element by element.
// The fp32 result is staged through shared memory for the epilogue, which reads and writes 16
// bytes per thread where the shape allows.
//
// f32 storage runs on CUDA cores in plain fp32, so --precision f32 can be checked tightly against
// the CPU. Either way each output element is summed by one thread (or one mma lane) in a fixed k
// order, with no split-k and no atomics: results are bit-reproducible, and the same whichever
// tensor-core variant computes them.
//
// Launch configuration (src/cuda/ops.rs, MATMUL_VARIANTS):
//   matmul_tc128x128_bf16, matmul_tc128x128_f32out_bf16:
//       grid (ceil(N/128), ceil(M/128)), block 256, dynamic smem 67584 B (cuFuncSetAttribute)
//   matmul_tc128x64_bf16, matmul_tc128x64_f32out_bf16:
//       grid (ceil(N/64), ceil(M/128)), block 128, dynamic smem 49152 B (cuFuncSetAttribute)
//   matmul_f32, matmul_f32out_f32: grid (ceil(N/64), ceil(M/64)), block 128, smem 0 (static)
//   bias_grad_partial_{bf16,f32}: block 256, any grid (blocks take units of 64 rows × 256
//       columns grid-stride): the host uses min(units, 8 · SMs); partials of ceil(M/64) × N floats
//   bias_grad_reduce: grid ceil(N/256), block 256
#include <type_traits>
#include "common.cuh"
#include "tensorcore.cuh"

// ---- bf16 on tensor cores ------------------------------------------------------------------------

#define TC_BK 32
#define TC_STAGES 4
#define TC_WARP_M 64  // each warp: 4 m16 tiles × 4 n8 tiles
#define TC_WARP_N 32
#define TC_EPI_PAD 4  // floats of padding per row of the staged fp32 tile

// The block's tile of C: BM×BN, THREADS = 32 · (BM/64) · (BN/32) threads.
template <int BM, int BN>
struct TcTile {
    static constexpr int WARPS_M = BM / TC_WARP_M, WARPS_N = BN / TC_WARP_N;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int A_ELEMS = BM * TC_BK, B_ELEMS = TC_BK * BN;
    static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
    static constexpr int PIPE_BYTES = TC_STAGES * STAGE_ELEMS * 2;
    static constexpr int EPI_BYTES = BM * (BN + TC_EPI_PAD) * 4;
    static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
};

// The main loop for one orientation of A (A_KC: k-contiguous) and B (B_KC: k-contiguous),
// leaving the block's fp32 sums in shared memory as a row-major BM × (BN + TC_EPI_PAD) tile.
template <int BM, int BN, bool A_KC, bool B_KC>
__device__ __forceinline__ void tc_mainloop(bf16* smem, const bf16* a, const bf16* b, int M, int N, int K, long long a_rs,
                                            long long a_cs, long long b_rs, long long b_cs) {
    using T = TcTile<BM, BN>;
    // Shared tiles: A as [BM][BK] (k-contiguous) or [BK][BM]; B as [BN][BK] or [BK][BN].
    constexpr int AW = A_KC ? TC_BK : BM, BW = B_KC ? TC_BK : BN;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = (warp / T::WARPS_N) * TC_WARP_M, wn = (warp % T::WARPS_N) * TC_WARP_N;
    const long long a_stride = A_KC ? a_rs : a_cs, b_stride = B_KC ? b_cs : b_rs;
    const bool a_aligned = ((uintptr_t)a % 16 == 0) && a_stride % 8 == 0;
    const bool b_aligned = ((uintptr_t)b % 16 == 0) && b_stride % 8 == 0;

    auto load_stage = [&](int stage, int k0) {
        bf16* as = smem + stage * T::STAGE_ELEMS;
        bf16* bs = as + T::A_ELEMS;
        for (int idx = tid; idx < T::A_ELEMS / 8; idx += T::THREADS) {
            if (A_KC) tc::load_chunk<AW>(as, idx, a, a_stride, m0, k0, M, K, a_aligned);  // rows m, columns k
            else tc::load_chunk<AW>(as, idx, a, a_stride, k0, m0, K, M, a_aligned);       // rows k, columns m
        }
        for (int idx = tid; idx < T::B_ELEMS / 8; idx += T::THREADS) {
            if (B_KC) tc::load_chunk<BW>(bs, idx, b, b_stride, n0, k0, N, K, b_aligned);  // rows n, columns k
            else tc::load_chunk<BW>(bs, idx, b, b_stride, k0, n0, K, N, b_aligned);       // rows k, columns n
        }
    };

    float acc[4][4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int v = 0; v < 4; v++) acc[i][j][v] = 0.0f;

    const int k_tiles = (K + TC_BK - 1) / TC_BK;
    // Prologue: STAGES-1 slices in flight. Every iteration commits a group, empty or not, so that
    // wait<STAGES-2> always means "the slice about to be used has landed".
    for (int s = 0; s < TC_STAGES - 1; s++) {
        if (s < k_tiles) load_stage(s, s * TC_BK);
        tc::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; kt++) {
        tc::cp_async_wait<TC_STAGES - 2>();
        __syncthreads();  // slice kt visible to all; every warp is done with slice kt-1's buffer
        const int next = kt + TC_STAGES - 1;
        if (next < k_tiles) load_stage(next % TC_STAGES, next * TC_BK);
        tc::cp_async_commit();

        const bf16* as = smem + (kt % TC_STAGES) * T::STAGE_ELEMS;
        const bf16* bs = as + T::A_ELEMS;
        for (int kk = 0; kk < TC_BK; kk += 16) {
            uint32_t af[4][4], bfr[4][2];
            for (int i = 0; i < 4; i++) {
                const int m = wm + i * 16;
                // x4 matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15);
                // lane l gives row l%8 of matrix l/8.
                if (A_KC) {
                    tc::ldmatrix<4>(af[i], as + tc::swizzle<AW>(m + lane % 16, kk + (lane / 16) * 8));
                } else {
                    tc::ldmatrix_trans<4>(af[i], as + tc::swizzle<AW>(kk + (lane / 16) * 8 + lane % 8, m + ((lane / 8) % 2) * 8));
                }
            }
            for (int j = 0; j < 4; j += 2) {
                const int n = wn + j * 8;
                // x4 matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15):
                // b0, b1 of n-tile j, then of n-tile j+1.
                uint32_t r[4];
                if (B_KC) {
                    tc::ldmatrix<4>(r, bs + tc::swizzle<BW>(n + (lane / 16) * 8 + lane % 8, kk + ((lane / 8) % 2) * 8));
                } else {
                    tc::ldmatrix_trans<4>(r, bs + tc::swizzle<BW>(kk + ((lane / 8) % 2) * 8 + lane % 8, n + (lane / 16) * 8));
                }
                bfr[j][0] = r[0], bfr[j][1] = r[1], bfr[j + 1][0] = r[2], bfr[j + 1][1] = r[3];
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) tc::mma_m16n8k16_bf16(acc[i][j], af[i], bfr[j]);
        }
    }
    tc::cp_async_wait<0>();
    __syncthreads();  // the pipeline's buffers become the epilogue's

    // C fragment: c0, c1 at (row g, columns 2q, 2q+1), c2, c3 at row g+8; g = lane/4, q = lane%4.
    float* c_tile = reinterpret_cast<float*>(smem);
    constexpr int LD = BN + TC_EPI_PAD;
    const int g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            const int r = wm + i * 16 + g, c = wn + j * 8 + 2 * q;
            c_tile[r * LD + c] = acc[i][j][0];
            c_tile[r * LD + c + 1] = acc[i][j][1];
            c_tile[(r + 8) * LD + c] = acc[i][j][2];
            c_tile[(r + 8) * LD + c + 1] = acc[i][j][3];
        }
    __syncthreads();
}

// The epilogue of element (m, n), x its sum; see `matmul` below for the order of operations.
template <typename floatX, typename OutT>
__device__ __forceinline__ void epilogue_one(OutT* out, const floatX* bias, floatX* pre_gelu, const floatX* gelu_input,
                                             int accumulate, long long o, int n, float x) {
    if (bias != nullptr) x += to_float(bias[n]);
    if (pre_gelu != nullptr) {
        floatX stored = from_float<floatX>(x);
        pre_gelu[o] = stored;
        x = gelu(to_float(stored));
    }
    if (gelu_input != nullptr) x *= gelu_grad(to_float(gelu_input[o]));
    if (accumulate) x += to_float(out[o]);
    out[o] = from_float<OutT>(x);
}

// The epilogue over the staged tile: each thread takes runs of 8 columns of a row, moving 16
// bytes per load and store when N and the pointers allow, element by element otherwise.
template <int BM, int BN, typename OutT>
__device__ __forceinline__ void tc_epilogue(const float* c_tile, OutT* out, const bf16* bias, bf16* pre_gelu,
                                            const bf16* gelu_input, int M, int N, int accumulate) {
    using T = TcTile<BM, BN>;
    constexpr int LD = BN + TC_EPI_PAD;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const bool vec = N % 8 == 0 && aligned16(out) && (bias == nullptr || aligned16(bias)) &&
                     (pre_gelu == nullptr || aligned16(pre_gelu)) && (gelu_input == nullptr || aligned16(gelu_input));
    for (int idx = threadIdx.x; idx < BM * BN / 8; idx += T::THREADS) {
        const int i = idx / (BN / 8), j = (idx % (BN / 8)) * 8, m = m0 + i, n = n0 + j;
        if (m >= M || n >= N) continue;
        const long long o = (long long)m * N + n;
        float x[8];
        for (int e = 0; e < 8; e++) x[e] = c_tile[i * LD + j + e];
        if (!(vec && n + 8 <= N)) {
            for (int e = 0; e < 8 && n + e < N; e++)
                epilogue_one<bf16, OutT>(out, bias, pre_gelu, gelu_input, accumulate, o + e, n + e, x[e]);
            continue;
        }
        // 16-byte vectors: 8 bf16, or 2 × 4 floats.
        if (bias != nullptr) {
            uint4 v = *reinterpret_cast<const uint4*>(bias + n);
            const bf16* bv = reinterpret_cast<const bf16*>(&v);
            for (int e = 0; e < 8; e++) x[e] += to_float(bv[e]);
        }
        if (pre_gelu != nullptr) {
            uint4 v;
            bf16* pv = reinterpret_cast<bf16*>(&v);
            for (int e = 0; e < 8; e++) {
                pv[e] = __float2bfloat16_rn(x[e]);
                x[e] = gelu(to_float(pv[e]));
            }
            *reinterpret_cast<uint4*>(pre_gelu + o) = v;
        }
        if (gelu_input != nullptr) {
            uint4 v = *reinterpret_cast<const uint4*>(gelu_input + o);
            const bf16* gv = reinterpret_cast<const bf16*>(&v);
            for (int e = 0; e < 8; e++) x[e] *= gelu_grad(to_float(gv[e]));
        }
        if constexpr (std::is_same<OutT, float>::value) {
            float4* dst = reinterpret_cast<float4*>(out + o);
            for (int h = 0; h < 2; h++) {
                float4 v = accumulate ? dst[h] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                v.x += x[4 * h], v.y += x[4 * h + 1], v.z += x[4 * h + 2], v.w += x[4 * h + 3];
                dst[h] = v;
            }
        } else {
            uint4 v;
            bf16* ov = reinterpret_cast<bf16*>(&v);
            if (accumulate) v = *reinterpret_cast<const uint4*>(out + o);
            for (int e = 0; e < 8; e++) ov[e] = __float2bfloat16_rn(accumulate ? to_float(ov[e]) + x[e] : x[e]);
            *reinterpret_cast<uint4*>(out + o) = v;
        }
    }
}

// The tensor-core matmul: the orientation of each operand picks the main loop.
template <int BM, int BN, typename OutT>
__device__ void matmul_tc(OutT* out, const bf16* a, const bf16* b, const bf16* bias, bf16* pre_gelu,
                          const bf16* gelu_input, int M, int N, int K, long long a_rs, long long a_cs, long long b_rs,
                          long long b_cs, int accumulate) {
    FINCH_DYNAMIC_SMEM(bf16, smem);
    const bool a_kc = a_cs == 1, b_kc = b_rs == 1;
    if (a_kc && b_kc) tc_mainloop<BM, BN, true, true>(smem, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
    else if (a_kc) tc_mainloop<BM, BN, true, false>(smem, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
    else if (b_kc) tc_mainloop<BM, BN, false, true>(smem, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
    else tc_mainloop<BM, BN, false, false>(smem, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
    tc_epilogue<BM, BN, OutT>(reinterpret_cast<const float*>(smem), out, bias, pre_gelu, gelu_input, M, N, accumulate);
}

// ---- f32 on CUDA cores ------------------------------------------------------------------------------

#define SIMT_TM 64
#define SIMT_TN 64
#define SIMT_TK 32
#define SIMT_THREADS 128
#define SIMT_PAD_AB 8
#define SIMT_PAD_C 4

// Loads the (SIMT_TM × SIMT_TK) tile of A at (m0, k0) into shared memory, zero outside the
// matrix. Threads walk the contiguous dimension of A so global reads coalesce whichever way A is
// transposed.
__device__ __forceinline__ void load_tile_a(float (*tile)[SIMT_TK + SIMT_PAD_AB], const float* a, int M, int K, long long a_rs,
                                            long long a_cs, int m0, int k0) {
    const bool k_contiguous = a_cs == 1;
    for (int idx = threadIdx.x; idx < SIMT_TM * SIMT_TK; idx += SIMT_THREADS) {
        int i = k_contiguous ? idx / SIMT_TK : idx % SIMT_TM;
        int kk = k_contiguous ? idx % SIMT_TK : idx / SIMT_TM;
        int m = m0 + i, k = k0 + kk;
        tile[i][kk] = (m < M && k < K) ? a[m * a_rs + k * a_cs] : 0.0f;
    }
}

// Loads the (SIMT_TK × SIMT_TN) tile of B at (k0, n0), likewise.
__device__ __forceinline__ void load_tile_b(float (*tile)[SIMT_TN + SIMT_PAD_AB], const float* b, int K, int N, long long b_rs,
                                            long long b_cs, int k0, int n0) {
    const bool n_contiguous = b_cs == 1;
    for (int idx = threadIdx.x; idx < SIMT_TK * SIMT_TN; idx += SIMT_THREADS) {
        int kk = n_contiguous ? idx / SIMT_TN : idx % SIMT_TK;
        int j = n_contiguous ? idx % SIMT_TN : idx / SIMT_TK;
        int k = k0 + kk, n = n0 + j;
        tile[kk][j] = (k < K && n < N) ? b[k * b_rs + n * b_cs] : 0.0f;
    }
}

// C[m, n] = Σ_k A[m, k]·B[k, n] with A[m, k] = a[m·a_rs + k·a_cs] and B[k, n] = b[k·b_rs + n·b_cs],
// then per element, in this order (the tensor-core kernel's epilogue too):
//   x = C + bias[n]                                   (bias may be NULL)
//   if pre_gelu:   pre_gelu[m, n] = x; x = gelu(x)    (GELU of the stored, rounded value)
//   if gelu_input: x = x · gelu'(gelu_input[m, n])
//   out[m, n] = x, or out[m, n] + x when accumulate
// out, pre_gelu and gelu_input are row-major (M, N). Thread (ty, tx) of a 16×8 grid owns rows
// ty·4..+4, columns tx·8..+8 of the 64×64 tile.
template <typename OutT>
__device__ void matmul_simt(OutT* out, const float* a, const float* b, const float* bias, float* pre_gelu,
                            const float* gelu_input, int M, int N, int K, long long a_rs, long long a_cs, long long b_rs,
                            long long b_cs, int accumulate) {
    __shared__ __align__(128) float c_tile[SIMT_TM][SIMT_TN + SIMT_PAD_C];
    __shared__ float a_tile[SIMT_TM][SIMT_TK + SIMT_PAD_AB];
    __shared__ float b_tile[SIMT_TK][SIMT_TN + SIMT_PAD_AB];
    const int m0 = blockIdx.y * SIMT_TM, n0 = blockIdx.x * SIMT_TN;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    float acc[4][8];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += SIMT_TK) {
        load_tile_a(a_tile, a, M, K, a_rs, a_cs, m0, k0);
        load_tile_b(b_tile, b, K, N, b_rs, b_cs, k0, n0);
        __syncthreads();
        for (int kk = 0; kk < SIMT_TK; kk++) {
            float av[4], bv[8];
            for (int i = 0; i < 4; i++) av[i] = a_tile[ty * 4 + i][kk];
            for (int j = 0; j < 8; j++) bv[j] = b_tile[kk][tx * 8 + j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 8; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 8; j++) c_tile[ty * 4 + i][tx * 8 + j] = acc[i][j];
    __syncthreads();

    // Epilogue, with consecutive threads on consecutive columns so global writes coalesce.
    for (int idx = threadIdx.x; idx < SIMT_TM * SIMT_TN; idx += SIMT_THREADS) {
        const int i = idx / SIMT_TN, j = idx % SIMT_TN, m = m0 + i, n = n0 + j;
        if (m >= M || n >= N) continue;
        epilogue_one<float, OutT>(out, bias, pre_gelu, gelu_input, accumulate, (long long)m * N + n, n, c_tile[i][j]);
    }
}

// dbias[n] += Σ_m dout[m, n] (fp32), in two kernels and a fixed order, without atomics:
// bias_grad_partial cuts dout into units of BIAS_ROWS rows × 256 columns (fixed by M and N, not
// by the device). In a unit, warp w sums rows w, w+8, ... of the unit, each lane 8 columns
// (16-byte loads when N is a multiple of 8); the 8 warps' sums are added in order w = 0..7 into
// partials[row chunk][n]. bias_grad_reduce then adds the chunks in order into dbias.
#define BIAS_ROWS 64
template <typename floatX>
__device__ void bias_grad_partial(float* partials, const floatX* dout, int M, int N) {
    __shared__ float sums[8][256];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int slabs = (N + 255) / 256, units = (M + BIAS_ROWS - 1) / BIAS_ROWS * slabs;
    const bool vec = N % 8 == 0 && aligned16(dout);
    for (int u = blockIdx.x; u < units; u += gridDim.x) {  // uniform across the block
        const int chunk = u / slabs, n0 = (u % slabs) * 256 + lane * 8;
        const int m_end = min(M, (chunk + 1) * BIAS_ROWS);
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int m = chunk * BIAS_ROWS + warp; m < m_end; m += 8) {
            const floatX* row = dout + (long long)m * N;
            if (vec && n0 + 8 <= N) {
                float d[8];
                load8(d, row + n0);
                for (int e = 0; e < 8; e++) acc[e] += d[e];
            } else {
                for (int e = 0; e < 8 && n0 + e < N; e++) acc[e] += to_float(row[n0 + e]);
            }
        }
        for (int e = 0; e < 8; e++) sums[warp][lane * 8 + e] = acc[e];
        __syncthreads();
        const int n = (u % slabs) * 256 + threadIdx.x;
        if (n < N) {
            float total = 0.0f;
            for (int w = 0; w < 8; w++) total += sums[w][threadIdx.x];
            partials[(long long)chunk * N + n] = total;
        }
        __syncthreads();  // sums is rewritten by the next unit
    }
}

// dbias[n] += Σ_chunk partials[chunk][n], chunks in increasing order.
extern "C" __global__ void __launch_bounds__(256) bias_grad_reduce(float* dbias, const float* partials, int chunks,
                                                                   int N) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float total = 0.0f;
    for (int k = 0; k < chunks; k++) total += partials[(long long)k * N + n];
    dbias[n] += total;
}

#define MATMUL_PARAMS(OutT, floatX)                                                                             \
    (OutT * out, const floatX* a, const floatX* b, const floatX* bias, floatX* pre_gelu, const floatX* gelu_input, \
     int M, int N, int K, long long a_rs, long long a_cs, long long b_rs, long long b_cs, int accumulate)
#define MATMUL_ARGS (out, a, b, bias, pre_gelu, gelu_input, M, N, K, a_rs, a_cs, b_rs, b_cs, accumulate)

// The tensor-core variants (bf16 only): MATMUL_VARIANTS in src/cuda/ops.rs lists the same.
#define EXPORT_TC(BM, BN)                                                                                          \
    extern "C" __global__ void __launch_bounds__(TcTile<BM, BN>::THREADS)                                           \
        matmul_tc##BM##x##BN##_bf16 MATMUL_PARAMS(bf16, bf16) {                                                     \
        matmul_tc<BM, BN, bf16> MATMUL_ARGS;                                                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(TcTile<BM, BN>::THREADS)                                           \
        matmul_tc##BM##x##BN##_f32out_bf16 MATMUL_PARAMS(float, bf16) {                                             \
        matmul_tc<BM, BN, float> MATMUL_ARGS;                                                                       \
    }
EXPORT_TC(128, 128)
EXPORT_TC(128, 64)

extern "C" __global__ void __launch_bounds__(SIMT_THREADS) matmul_f32 MATMUL_PARAMS(float, float) {
    matmul_simt<float> MATMUL_ARGS;
}
extern "C" __global__ void __launch_bounds__(SIMT_THREADS) matmul_f32out_f32 MATMUL_PARAMS(float, float) {
    matmul_simt<float> MATMUL_ARGS;
}

#define EXPORT(suffix, floatX)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
        bias_grad_partial_##suffix(float* partials, const floatX* dout, int M, int N) {                     \
        bias_grad_partial<floatX>(partials, dout, M, N);                                                    \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
