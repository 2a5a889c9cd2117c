// RMSNorm over the C channels of each of N rows, the Llama family's norm (CPU reference:
// src/cpu/rmsnorm.rs): out = x · rstd · weight with rstd = 1/sqrt(mean(x²) + eps); no centring,
// no bias. rstd is saved (N, fp32) for the backward.
//
// Launch configuration (every kernel: block 256 = 8 warps, dynamic shared memory 0 bytes). Any
// grid is correct: rows and workers are taken grid-stride, so the host sizes grids from the SM
// count, and no result depends on the grid (as kernels/layernorm.cu).
//   rmsnorm_forward_{bf16,f32}           one warp per row: grid min(ceil(N/8), 4 · SMs)
//   residual_rmsnorm_forward_{bf16,f32}  one warp per row: grid min(ceil(N/8), 4 · SMs)
//   rmsnorm_backward_{bf16,f32}          G workers (one warp each; G fixed by the host from N
//                                        alone, G = clamp(N, 1, 2048) as layernorm_backward):
//                                        grid min(ceil(G/8), 4 · SMs). The host allocates
//                                        partials of G * C floats (less than the LayerNorm's
//                                        G * 2C, so its scratch serves).
//   rmsnorm_param_grads_reduce           grid ceil(C/256) (one thread per column of the (G, C)
//                                        partials)
//
// Every kernel works for any C >= 1 and N >= 1. With C a multiple of 8 and 16-byte aligned
// pointers, a lane takes 8 consecutive channels per access (c = 8·lane, 8·lane + 256, ...); else
// one (c = lane, lane + 32, ...). Which one depends on C and the pointers only, so the plain and
// the fused forward sum a row in the same order (--recompute relies on it).
//
// No pointer is __restrict__: the backward's dinp may alias dresidual, and a residual may be
// written in place over inp1. Every such element is read and then written by the same thread.
#include "llama.cuh"

#define RMS_BLOCK 256

// The rows a warp takes: row = its global warp index, then every (warps in the grid)-th. The
// row is the same for all lanes, so a warp leaves whole and no shuffle is left short.
#define RMS_FOR_EACH_WARP_ROW(row, N)                                                                 \
    for (int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < (N); row += gridDim.x * (blockDim.x / 32))

// The output pass over one row whose sum of squares (this lane's share) is already known. Must be
// called by all 32 lanes of the warp (warp_sum shuffles with the full mask).
template <int W, typename floatX>
__device__ __forceinline__ void rmsnorm_row(floatX* out, float* rstd, const floatX* x, const floatX* weight, float sq,
                                            int row, int C, float eps, int lane) {
    const float inv_c = 1.0f / (float)C;  // as the CPU: sum * (1/C)
    const float ms = warp_sum(sq) * inv_c;
    const float r = 1.0f / sqrtf(ms + eps);  // IEEE sqrt and divide, not rsqrtf: f32 stays close to the CPU
    for (int c = lane * W; c < C; c += 32 * W) {
        float v[W], w[W];
        load_n<W>(v, x + c);
        load_n<W>(w, weight + c);
        for (int e = 0; e < W; e++) v[e] = v[e] * r * w[e];
        store_n<W>(out + c, v);
    }
    if (lane == 0) rstd[row] = r;
}

template <int W, typename floatX>
__device__ __forceinline__ void rmsnorm_forward_impl(floatX* out, float* rstd, const floatX* inp, const floatX* weight,
                                                     int N, int C, float eps) {
    const int lane = threadIdx.x % 32;
    RMS_FOR_EACH_WARP_ROW(row, N) {
        const size_t off = (size_t)row * C;
        float sq = 0.0f;
        for (int c = lane * W; c < C; c += 32 * W) {
            float v[W];
            load_n<W>(v, inp + off + c);
            for (int e = 0; e < W; e++) sq += v[e] * v[e];
        }
        rmsnorm_row<W>(out + off, rstd, inp + off, weight, sq, row, C, eps, lane);
    }
}

// residual = inp1 + inp2 (rounded to floatX and stored), then RMSNorm of the stored residual, so
// out is exactly the RMSNorm of what the next layer reads back as its residual.
template <int W, typename floatX>
__device__ __forceinline__ void residual_rmsnorm_forward_impl(floatX* residual, floatX* out, float* rstd,
                                                              const floatX* inp1, const floatX* inp2,
                                                              const floatX* weight, int N, int C, float eps) {
    const int lane = threadIdx.x % 32;
    RMS_FOR_EACH_WARP_ROW(row, N) {
        const size_t off = (size_t)row * C;
        floatX* res = residual + off;
        float sq = 0.0f;
        for (int c = lane * W; c < C; c += 32 * W) {
            float a[W], b[W], v[W];
            load_n<W>(a, inp1 + off + c);
            load_n<W>(b, inp2 + off + c);
            for (int e = 0; e < W; e++) v[e] = to_float(from_float<floatX>(a[e] + b[e]));  // the stored value
            store_n<W>(res + c, v);  // exact: v is already rounded
            for (int e = 0; e < W; e++) sq += v[e] * v[e];
        }
        // The output pass reads res[c] for the same c this lane wrote, so it sees its own stores.
        rmsnorm_row<W>(out + off, rstd, res, weight, sq, row, C, eps, lane);
    }
}

// dinp = dresidual (NULL: 0) + rstd · (g − xhat · mean(g · xhat)), g = dout · weight,
// xhat = x · rstd; and the rows' shares of dweight = Σ_rows dout · x · rstd.
// G workers, one warp each: worker g handles rows g, g+G, g+2G, ... and owns row g of partials,
// accumulating into it by read-modify-write of its own columns (each column always by the same
// lane), so there are no atomics and the sums are bit-reproducible. G comes from the host and
// depends on N only; the grid only decides which warp runs which worker.
template <int W, typename floatX>
__device__ __forceinline__ void rmsnorm_backward_impl(floatX* dinp, const floatX* dresidual, float* partials,
                                                      const floatX* dout, const floatX* inp, const floatX* weight,
                                                      const float* rstd, int N, int C, int G) {
    const int lane = threadIdx.x % 32;
    const float inv_c = 1.0f / (float)C;
    RMS_FOR_EACH_WARP_ROW(worker, G) {
        float* pw = partials + (size_t)worker * C;
        if (worker >= N) {
            // No rows for this worker, but the reduce reads every partials row: write zeros.
            for (int c = lane; c < C; c += 32) pw[c] = 0.0f;
            continue;  // warp-uniform
        }
        for (int row = worker; row < N; row += G) {  // same trip count for every lane of the warp
            const size_t off = (size_t)row * C;
            const floatX* dy = dout + off;
            const floatX* x = inp + off;
            const float r = rstd[row];

            // Pass 1: mean(g · xhat) over the row.
            float gx_sum = 0.0f;
            for (int c = lane * W; c < C; c += 32 * W) {
                float d[W], w[W], v[W];
                load_n<W>(d, dy + c);
                load_n<W>(w, weight + c);
                load_n<W>(v, x + c);
                for (int e = 0; e < W; e++) gx_sum += d[e] * w[e] * v[e] * r;
            }
            const float gx_mean = warp_sum(gx_sum) * inv_c;

            // Pass 2: dinp, and this row's share of dweight.
            const bool first = row == worker;  // first row overwrites the partials row, later ones add
            for (int c = lane * W; c < C; c += 32 * W) {
                float d[W], w[W], v[W], prev[W], dw[W];
                load_n<W>(d, dy + c);
                load_n<W>(w, weight + c);
                load_n<W>(v, x + c);
                // Read dresidual before writing dinp: they may be the same buffer.
                if (dresidual != nullptr)
                    load_n<W>(prev, dresidual + off + c);
                else
                    for (int e = 0; e < W; e++) prev[e] = 0.0f;
                if (!first) load_n<W>(dw, pw + c);
                for (int e = 0; e < W; e++) {
                    prev[e] += r * (d[e] * w[e] - v[e] * r * gx_mean);
                    const float share = d[e] * v[e] * r;
                    dw[e] = first ? share : dw[e] + share;
                }
                store_n<W>(dinp + off + c, prev);
                store_n<W>(pw + c, dw);
            }
        }
    }
}

// The 8-wide path needs every row start 16-byte aligned: C a multiple of 8 and aligned bases.
#define RMS_VEC(...) (C % 8 == 0 && all_aligned16(__VA_ARGS__))

#define EXPORT_RMSNORM(suffix, floatX)                                                                             \
    extern "C" __global__ void __launch_bounds__(RMS_BLOCK)                                                       \
        rmsnorm_forward_##suffix(floatX* out, float* rstd, const floatX* inp, const floatX* weight, int N, int C, \
                                 float eps) {                                                                     \
        if (RMS_VEC(out, inp, weight))                                                                             \
            rmsnorm_forward_impl<8, floatX>(out, rstd, inp, weight, N, C, eps);                                    \
        else                                                                                                       \
            rmsnorm_forward_impl<1, floatX>(out, rstd, inp, weight, N, C, eps);                                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(RMS_BLOCK)                                                       \
        residual_rmsnorm_forward_##suffix(floatX* residual, floatX* out, float* rstd, const floatX* inp1,          \
                                          const floatX* inp2, const floatX* weight, int N, int C, float eps) {     \
        if (RMS_VEC(residual, out, inp1, inp2, weight))                                                            \
            residual_rmsnorm_forward_impl<8, floatX>(residual, out, rstd, inp1, inp2, weight, N, C, eps);          \
        else                                                                                                       \
            residual_rmsnorm_forward_impl<1, floatX>(residual, out, rstd, inp1, inp2, weight, N, C, eps);          \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(RMS_BLOCK) rmsnorm_backward_##suffix(                            \
        floatX* dinp, const floatX* dresidual, float* partials, const floatX* dout, const floatX* inp,            \
        const floatX* weight, const float* rstd, int N, int C, int G) {                                           \
        if (RMS_VEC(dinp, dresidual, partials, dout, inp, weight))                                                 \
            rmsnorm_backward_impl<8, floatX>(dinp, dresidual, partials, dout, inp, weight, rstd, N, C, G);         \
        else                                                                                                       \
            rmsnorm_backward_impl<1, floatX>(dinp, dresidual, partials, dout, inp, weight, rstd, N, C, G);         \
    }

FINCH_FOR_EACH_FLOATX(EXPORT_RMSNORM)

// dweight[c] += sum over g of partials[g][c], summed in increasing g so the result is
// bit-reproducible. One thread per column of the (G, C) partials: neighbouring threads read
// neighbouring floats, and the loads of successive g do not depend on the running sum, so the
// unrolled loop keeps several in flight.
extern "C" __global__ void __launch_bounds__(RMS_BLOCK)
    rmsnorm_param_grads_reduce(float* dweight, const float* partials, int G, int C) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= C) return;  // no shuffles here, so lanes may leave independently
    float s = 0.0f;
#pragma unroll 8
    for (int g = 0; g < G; g++) s += partials[(size_t)g * C + col];
    dweight[col] += s;
}
