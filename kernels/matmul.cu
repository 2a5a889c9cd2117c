// Matrix multiplication with fused epilogues, and the bias gradient (src/cpu/matmul.rs).
//
// One strided kernel serves the three training products (the host picks the strides, so
// transposes cost no copies):
//   forward  Y  = X·W + b      (optionally GELU: writes the pre-activation and GELU(·))
//   backward dX = dY·Wᵀ        (optionally times GELU'(pre-activation), for the MLP)
//            dW += Xᵀ·dY       (fp32 output, accumulated into the gradient buffer)
// bf16 storage runs on tensor cores (WMMA 16×16×16, fp32 accumulate); f32 storage runs on
// CUDA cores in plain fp32, so --precision f32 can be checked tightly against the CPU. Each output
// element is summed in a fixed k order: results are bit-reproducible.
//
// This is the correct, simple version (one 64×64 tile per block, no pipelining); the Matmul issue
// replaces the insides behind the same signature.
//
// Launch configuration:
//   matmul_{bf16,f32}, matmul_f32out_{bf16,f32}: grid (ceil(N/64), ceil(M/64)), block 128, smem 0 (static)
//   bias_grad_{bf16,f32}: grid ceil(N/32), block 256
#include <mma.h>
#include <type_traits>
#include "common.cuh"

#define TILE_M 64
#define TILE_N 64
#define TILE_K 32
#define THREADS 128
#define PAD_AB 8  // keeps WMMA's 32-byte alignment and ldm % 8 == 0 while skewing banks
#define PAD_C 4

// Loads the (TILE_M × TILE_K) tile of A at (m0, k0) into shared memory as row-major floats or
// bf16, zero outside the matrix. Threads walk the contiguous dimension of A so global reads
// coalesce whichever way A is transposed.
template <typename S, typename floatX>
__device__ __forceinline__ void load_tile_a(S (*tile)[TILE_K + PAD_AB], const floatX* a, int M, int K, long long a_rs,
                                            long long a_cs, int m0, int k0) {
    const bool k_contiguous = a_cs == 1;
    for (int idx = threadIdx.x; idx < TILE_M * TILE_K; idx += THREADS) {
        int i = k_contiguous ? idx / TILE_K : idx % TILE_M;
        int kk = k_contiguous ? idx % TILE_K : idx / TILE_M;
        int m = m0 + i, k = k0 + kk;
        float x = (m < M && k < K) ? to_float(a[m * a_rs + k * a_cs]) : 0.0f;
        tile[i][kk] = from_float<S>(x);
    }
}

// Loads the (TILE_K × TILE_N) tile of B at (k0, n0), likewise.
template <typename S, typename floatX>
__device__ __forceinline__ void load_tile_b(S (*tile)[TILE_N + PAD_AB], const floatX* b, int K, int N, long long b_rs,
                                            long long b_cs, int k0, int n0) {
    const bool n_contiguous = b_cs == 1;
    for (int idx = threadIdx.x; idx < TILE_K * TILE_N; idx += THREADS) {
        int kk = n_contiguous ? idx / TILE_N : idx % TILE_K;
        int j = n_contiguous ? idx % TILE_N : idx / TILE_K;
        int k = k0 + kk, n = n0 + j;
        float x = (k < K && n < N) ? to_float(b[k * b_rs + n * b_cs]) : 0.0f;
        tile[kk][j] = from_float<S>(x);
    }
}

// C[m, n] = Σ_k A[m, k]·B[k, n] with A[m, k] = a[m·a_rs + k·a_cs] and B[k, n] = b[k·b_rs + n·b_cs],
// then per element, in this order:
//   x = C + bias[n]                                   (bias may be NULL)
//   if pre_gelu:   pre_gelu[m, n] = x; x = gelu(x)    (GELU of the stored, rounded value)
//   if gelu_input: x = x · gelu'(gelu_input[m, n])
//   out[m, n] = x, or out[m, n] + x when accumulate
// out, pre_gelu and gelu_input are row-major (M, N).
template <typename floatX, typename OutT>
__device__ void matmul(OutT* out, const floatX* a, const floatX* b, const floatX* bias, floatX* pre_gelu,
                       const floatX* gelu_input, int M, int N, int K, long long a_rs, long long a_cs, long long b_rs,
                       long long b_cs, int accumulate) {
    __shared__ __align__(128) float c_tile[TILE_M][TILE_N + PAD_C];
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;

    if constexpr (std::is_same<floatX, bf16>::value) {
        // Tensor cores: 4 warps in a 2×2 grid, each owning a 32×32 piece as 2×2 WMMA fragments.
        using namespace nvcuda;
        __shared__ __align__(128) bf16 a_tile[TILE_M][TILE_K + PAD_AB];
        __shared__ __align__(128) bf16 b_tile[TILE_K][TILE_N + PAD_AB];
        const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
        for (int k0 = 0; k0 < K; k0 += TILE_K) {
            load_tile_a(a_tile, a, M, K, a_rs, a_cs, m0, k0);
            load_tile_b(b_tile, b, K, N, b_rs, b_cs, k0, n0);
            __syncthreads();
            for (int kk = 0; kk < TILE_K; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb[2];
                for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], &a_tile[wm + 16 * i][kk], TILE_K + PAD_AB);
                for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], &b_tile[kk][wn + 16 * j], TILE_N + PAD_AB);
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
            }
            __syncthreads();
        }
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
                wmma::store_matrix_sync(&c_tile[wm + 16 * i][wn + 16 * j], acc[i][j], TILE_N + PAD_C,
                                        wmma::mem_row_major);
    } else {
        // CUDA cores in fp32: thread (ty, tx) of a 16×8 grid owns rows ty·4..+4, columns tx·8..+8.
        __shared__ float a_tile[TILE_M][TILE_K + PAD_AB];
        __shared__ float b_tile[TILE_K][TILE_N + PAD_AB];
        const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
        float acc[4][8];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;
        for (int k0 = 0; k0 < K; k0 += TILE_K) {
            load_tile_a(a_tile, a, M, K, a_rs, a_cs, m0, k0);
            load_tile_b(b_tile, b, K, N, b_rs, b_cs, k0, n0);
            __syncthreads();
            for (int kk = 0; kk < TILE_K; kk++) {
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
    }
    __syncthreads();

    // Epilogue, with consecutive threads on consecutive columns so global writes coalesce.
    for (int idx = threadIdx.x; idx < TILE_M * TILE_N; idx += THREADS) {
        const int i = idx / TILE_N, j = idx % TILE_N, m = m0 + i, n = n0 + j;
        if (m >= M || n >= N) continue;
        const long long o = (long long)m * N + n;
        float x = c_tile[i][j];
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
}

// dbias[n] += Σ_m dout[m, n] (fp32). Block: 32 columns × 8 row groups; row group r sums rows
// r, r+8, r+16, ... then group sums are added in order r = 0..7: a fixed order, no atomics.
template <typename floatX>
__device__ void bias_grad(float* dbias, const floatX* dout, int M, int N) {
    __shared__ float partial[8][32];
    const int col = blockIdx.x * 32 + threadIdx.x % 32, group = threadIdx.x / 32;
    float acc = 0.0f;
    if (col < N)
        for (int m = group; m < M; m += 8) acc += to_float(dout[(long long)m * N + col]);
    partial[group][threadIdx.x % 32] = acc;
    __syncthreads();
    if (group == 0 && col < N) {
        float total = 0.0f;
        for (int r = 0; r < 8; r++) total += partial[r][threadIdx.x];
        dbias[col] += total;
    }
}

#define MATMUL_PARAMS(OutT, floatX)                                                                             \
    (OutT * out, const floatX* a, const floatX* b, const floatX* bias, floatX* pre_gelu, const floatX* gelu_input, \
     int M, int N, int K, long long a_rs, long long a_cs, long long b_rs, long long b_cs, int accumulate)
#define MATMUL_ARGS (out, a, b, bias, pre_gelu, gelu_input, M, N, K, a_rs, a_cs, b_rs, b_cs, accumulate)
#define EXPORT(suffix, floatX)                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) matmul_##suffix MATMUL_PARAMS(floatX, floatX) {          \
        matmul<floatX, floatX> MATMUL_ARGS;                                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) matmul_f32out_##suffix MATMUL_PARAMS(float, floatX) {    \
        matmul<floatX, float> MATMUL_ARGS;                                                                          \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) bias_grad_##suffix(float* dbias, const floatX* dout, int M, int N) { \
        bias_grad<floatX>(dbias, dout, M, N);                                                                       \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
