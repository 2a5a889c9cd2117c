// LayerNorm over the C channels of each of N rows (CPU reference: src/cpu/layernorm.rs).
//
// Launch configuration (every kernel: block 256 = 8 warps, dynamic shared memory 0 bytes). Any
// grid is correct: rows and workers are taken grid-stride, so the host sizes grids from the SM
// count, and no result depends on the grid.
//   layernorm_forward_{bf16,f32}           one warp per row: grid min(ceil(N/8), 4 · SMs)
//   residual_layernorm_forward_{bf16,f32}  one warp per row: grid min(ceil(N/8), 4 · SMs)
//   layernorm_backward_{bf16,f32}          G workers (one warp each; G fixed by the host from N
//                                          alone, G <= 2048): grid min(ceil(G/8), 4 · SMs). The
//                                          host allocates partials of G * 2C floats.
//   layernorm_param_grads_reduce           grid ceil(2C/256) (one thread per column of the (G, 2C)
//                                          partials)
//
// Every kernel works for any C >= 1 and N >= 1. With C a multiple of 8 and 16-byte aligned
// pointers, a lane takes 8 consecutive channels per access (c = 8·lane, 8·lane + 256, ...); else
// one (c = lane, lane + 32, ...). Which one depends on C and the pointers only, so the plain and
// the fused forward sum a row in the same order (--recompute relies on it). Rows are re-read from
// global memory for each pass (they stay in L1/L2) rather than cached in registers, since C can
// be 2048.
//
// No pointer is __restrict__: the backward's dinp may alias dresidual, and a residual may be
// written in place over inp1. Every such element is read and then written by the same thread.
#include "common.cuh"

#define LN_BLOCK 256

// W consecutive values at p as floats (W = 8: one 16-byte access; W = 1: one element).
template <int W, typename T>
__device__ __forceinline__ void load_w(float* v, const T* p) {
    if constexpr (W == 8)
        load8(v, p);
    else
        v[0] = to_float(p[0]);
}
template <int W, typename T>
__device__ __forceinline__ void store_w(T* p, const float* v) {
    if constexpr (W == 8)
        store8(p, v);
    else
        p[0] = from_float<T>(v[0]);
}

// The rows a warp takes: row = its global warp index, then every (warps in the grid)-th.
#define FOR_EACH_WARP_ROW(row, N)                                                                     \
    for (int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < (N); row += gridDim.x * (blockDim.x / 32))

// Passes 2 and 3 over one row whose channel sum (this lane's share) is already known: the
// variance as the mean of squared deviations (more accurate than E[x^2] - E[x]^2), then the output.
// Must be called by all 32 lanes of the warp (warp_sum shuffles with the full mask).
template <int W, typename floatX>
__device__ __forceinline__ void layernorm_row(floatX* out, float* mean, float* rstd, const floatX* x,
                                              const floatX* weight, const floatX* bias, float sum, int row,
                                              int C, float eps, int lane) {
    const float inv_c = 1.0f / (float)C;  // as the CPU: sum * (1/C)
    const float mu = warp_sum(sum) * inv_c;
    float sq = 0.0f;
    for (int c = lane * W; c < C; c += 32 * W) {
        float v[W];
        load_w<W>(v, x + c);
        for (int e = 0; e < W; e++) {
            const float d = v[e] - mu;
            sq += d * d;
        }
    }
    const float var = warp_sum(sq) * inv_c;
    const float r = 1.0f / sqrtf(var + eps);  // IEEE sqrt and divide, not rsqrtf: f32 stays close to the CPU
    for (int c = lane * W; c < C; c += 32 * W) {
        float v[W], w[W], b[W];
        load_w<W>(v, x + c);
        load_w<W>(w, weight + c);
        load_w<W>(b, bias + c);
        for (int e = 0; e < W; e++) v[e] = (v[e] - mu) * r * w[e] + b[e];
        store_w<W>(out + c, v);
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

template <int W, typename floatX>
__device__ __forceinline__ void layernorm_forward_impl(floatX* out, float* mean, float* rstd, const floatX* inp,
                                                       const floatX* weight, const floatX* bias, int N, int C,
                                                       float eps) {
    const int lane = threadIdx.x % 32;
    // row is the same for all lanes of a warp, so a warp leaves whole and no shuffle is left short.
    FOR_EACH_WARP_ROW(row, N) {
        const size_t off = (size_t)row * C;
        const floatX* x = inp + off;
        float sum = 0.0f;
        for (int c = lane * W; c < C; c += 32 * W) {
            float v[W];
            load_w<W>(v, x + c);
            for (int e = 0; e < W; e++) sum += v[e];
        }
        layernorm_row<W>(out + off, mean, rstd, x, weight, bias, sum, row, C, eps, lane);
    }
}

// residual = inp1 + inp2 (rounded to floatX and stored), then LayerNorm of the stored residual,
// so out is exactly the LayerNorm of what the next layer reads back as its residual.
template <int W, typename floatX>
__device__ __forceinline__ void residual_layernorm_forward_impl(floatX* residual, floatX* out, float* mean,
                                                                float* rstd, const floatX* inp1, const floatX* inp2,
                                                                const floatX* weight, const floatX* bias, int N,
                                                                int C, float eps) {
    const int lane = threadIdx.x % 32;
    FOR_EACH_WARP_ROW(row, N) {  // warp-uniform, as in the forward
        const size_t off = (size_t)row * C;
        floatX* res = residual + off;
        float sum = 0.0f;
        for (int c = lane * W; c < C; c += 32 * W) {
            float a[W], b[W], v[W];
            load_w<W>(a, inp1 + off + c);
            load_w<W>(b, inp2 + off + c);
            for (int e = 0; e < W; e++) v[e] = to_float(from_float<floatX>(a[e] + b[e]));  // the stored value
            store_w<W>(res + c, v);  // exact: v is already rounded
            for (int e = 0; e < W; e++) sum += v[e];
        }
        // Later passes read res[c] for the same c this lane wrote, so they see its own stores.
        layernorm_row<W>(out + off, mean, rstd, res, weight, bias, sum, row, C, eps, lane);
    }
}

// G workers, one warp each: worker g handles rows g, g+G, g+2G, ... and owns row g of partials,
// accumulating into it by read-modify-write of its own columns (each column always by the same
// lane), so there are no atomics and the sums are bit-reproducible. G comes from the host and
// depends on N only; the grid only decides which warp runs which worker.
template <int W, typename floatX>
__device__ __forceinline__ void layernorm_backward_impl(floatX* dinp, const floatX* dresidual, float* partials,
                                                        const floatX* dout, const floatX* inp, const float* mean,
                                                        const float* rstd, const floatX* weight, int N, int C, int G) {
    const int lane = threadIdx.x % 32;
    const float inv_c = 1.0f / (float)C;
    FOR_EACH_WARP_ROW(worker, G) {
        float* pw = partials + (size_t)worker * 2 * C;  // sum of dout * xhat, for dweight
        float* pb = pw + C;                             // sum of dout, for dbias
        if (worker >= N) {
            // No rows for this worker, but the reduce reads every partials row: write zeros.
            for (int c = lane; c < C; c += 32) {
                pw[c] = 0.0f;
                pb[c] = 0.0f;
            }
            continue;  // warp-uniform
        }
        for (int row = worker; row < N; row += G) {  // same trip count for every lane of the warp
            const size_t off = (size_t)row * C;
            const floatX* dy = dout + off;
            const floatX* x = inp + off;
            const float mu = mean[row], r = rstd[row];

            // Pass 1: mean(g) and mean(g * xhat) over the row, g = dout * w.
            float g_sum = 0.0f, gx_sum = 0.0f;
            for (int c = lane * W; c < C; c += 32 * W) {
                float d[W], w[W], v[W];
                load_w<W>(d, dy + c);
                load_w<W>(w, weight + c);
                load_w<W>(v, x + c);
                for (int e = 0; e < W; e++) {
                    const float g = d[e] * w[e];
                    g_sum += g;
                    gx_sum += g * (v[e] - mu) * r;
                }
            }
            const float g_mean = warp_sum(g_sum) * inv_c;
            const float gx_mean = warp_sum(gx_sum) * inv_c;

            // Pass 2: dinp, and this row's share of dweight and dbias.
            const bool first = row == worker;  // first row overwrites the partials row, later ones add
            for (int c = lane * W; c < C; c += 32 * W) {
                float d[W], w[W], v[W], prev[W], dw[W], db[W];
                load_w<W>(d, dy + c);
                load_w<W>(w, weight + c);
                load_w<W>(v, x + c);
                // Read dresidual before writing dinp: they may be the same buffer.
                if (dresidual != nullptr)
                    load_w<W>(prev, dresidual + off + c);
                else
                    for (int e = 0; e < W; e++) prev[e] = 0.0f;
                if (!first) {
                    load_w<W>(dw, pw + c);
                    load_w<W>(db, pb + c);
                }
                for (int e = 0; e < W; e++) {
                    const float xm = v[e] - mu;
                    const float xhat = xm * r;
                    prev[e] += (d[e] * w[e] - g_mean - xhat * gx_mean) * r;
                    dw[e] = first ? d[e] * xm * r : dw[e] + d[e] * xm * r;
                    db[e] = first ? d[e] : db[e] + d[e];
                }
                store_w<W>(dinp + off + c, prev);
                store_w<W>(pw + c, dw);
                store_w<W>(pb + c, db);
            }
        }
    }
}

// The 8-wide path needs every row start 16-byte aligned: C a multiple of 8 and aligned bases.
#define LN_VEC(...) (C % 8 == 0 && aligned16s(__VA_ARGS__))
__device__ __forceinline__ bool aligned16s() { return true; }
template <typename P, typename... Ps>
__device__ __forceinline__ bool aligned16s(const P* p, const Ps*... ps) {
    return (p == nullptr || aligned16(p)) && aligned16s(ps...);
}

#define EXPORT_LAYERNORM(suffix, floatX)                                                                            \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK)                                                         \
        layernorm_forward_##suffix(floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight, \
                                   const floatX* bias, int N, int C, float eps) {                                  \
        if (LN_VEC(out, inp, weight, bias))                                                                         \
            layernorm_forward_impl<8, floatX>(out, mean, rstd, inp, weight, bias, N, C, eps);                      \
        else                                                                                                        \
            layernorm_forward_impl<1, floatX>(out, mean, rstd, inp, weight, bias, N, C, eps);                      \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK) residual_layernorm_forward_##suffix(                    \
        floatX* residual, floatX* out, float* mean, float* rstd, const floatX* inp1, const floatX* inp2,            \
        const floatX* weight, const floatX* bias, int N, int C, float eps) {                                       \
        if (LN_VEC(residual, out, inp1, inp2, weight, bias))                                                        \
            residual_layernorm_forward_impl<8, floatX>(residual, out, mean, rstd, inp1, inp2, weight, bias, N, C, eps); \
        else                                                                                                        \
            residual_layernorm_forward_impl<1, floatX>(residual, out, mean, rstd, inp1, inp2, weight, bias, N, C, eps); \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK) layernorm_backward_##suffix(                            \
        floatX* dinp, const floatX* dresidual, float* partials, const floatX* dout, const floatX* inp,             \
        const float* mean, const float* rstd, const floatX* weight, int N, int C, int G) {                         \
        if (LN_VEC(dinp, dresidual, partials, dout, inp, weight))                                                   \
            layernorm_backward_impl<8, floatX>(dinp, dresidual, partials, dout, inp, mean, rstd, weight, N, C, G); \
        else                                                                                                        \
            layernorm_backward_impl<1, floatX>(dinp, dresidual, partials, dout, inp, mean, rstd, weight, N, C, G); \
    }

FINCH_FOR_EACH_FLOATX(EXPORT_LAYERNORM)

// dweight[c] += sum over g of partials[g][c], dbias[c] += sum over g of partials[g][C + c], summed
// in increasing g so the result is bit-reproducible. One thread per column of the (G, 2C)
// partials: neighbouring threads read neighbouring floats, and the loads of successive g do not
// depend on the running sum, so the unrolled loop keeps several in flight.
extern "C" __global__ void __launch_bounds__(LN_BLOCK)
    layernorm_param_grads_reduce(float* dweight, float* dbias, const float* partials, int G, int C) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= 2 * C) return;  // no shuffles here, so lanes may leave independently
    const size_t stride = 2 * (size_t)C;
    float s = 0.0f;
#pragma unroll 8
    for (int g = 0; g < G; g++) s += partials[g * stride + col];
    if (col < C)
        dweight[col] += s;
    else
        dbias[col - C] += s;
}
