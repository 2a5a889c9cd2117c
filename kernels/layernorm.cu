// LayerNorm over the C channels of each of N rows (CPU reference: src/cpu/layernorm.rs).
//
// Launch configuration (every kernel: dynamic shared memory 0 bytes)
//   layernorm_forward_{bf16,f32}           grid ceil(N/8), block 256 (8 warps, one warp per row), smem 0
//   residual_layernorm_forward_{bf16,f32}  grid ceil(N/8), block 256 (8 warps, one warp per row), smem 0
//   layernorm_backward_{bf16,f32}          block 256 (fixed), grid = min(ceil(N/8), 128), smem 0.
//                                          G = 8 * gridDim.x workers (one per warp), G <= 1024;
//                                          the host allocates partials of G * 2C floats. Any
//                                          gridDim.x >= 1 is correct; it only changes G.
//   layernorm_param_grads_reduce           grid ceil(2C/256), block 256 (one thread per column of
//                                          the (G, 2C) partials), smem 0; G = 8 * the backward's
//                                          gridDim.x.
//
// Every kernel works for any C >= 1 and N >= 1: lanes stride over channels (c = lane, lane+32, ...)
// so C need not be a multiple of 32, and nothing is vectorised, so no alignment is assumed.
// Rows are re-read from global memory for each pass (they stay in L1/L2) rather than cached in
// registers, since C can be 2048.
//
// No pointer is __restrict__: the backward's dinp may alias dresidual, and a residual may be
// written in place over inp1. Every such element is read and then written by the same thread.
#include "common.cuh"

#define LN_BLOCK 256

// Passes 2 and 3 over one row whose channel sum (this lane's share) is already known: the
// variance as the mean of squared deviations (more accurate than E[x^2] - E[x]^2), then the output.
// Must be called by all 32 lanes of the warp (warp_sum shuffles with the full mask).
template <typename floatX>
__device__ __forceinline__ void layernorm_row(floatX* out, float* mean, float* rstd, const floatX* x,
                                              const floatX* weight, const floatX* bias, float sum, int row,
                                              int C, float eps, int lane) {
    const float inv_c = 1.0f / (float)C;  // as the CPU: sum * (1/C)
    const float mu = warp_sum(sum) * inv_c;
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float d = to_float(x[c]) - mu;
        sq += d * d;
    }
    const float var = warp_sum(sq) * inv_c;
    const float r = 1.0f / sqrtf(var + eps);  // IEEE sqrt and divide, not rsqrtf: f32 stays close to the CPU
    for (int c = lane; c < C; c += 32) {
        const float n = (to_float(x[c]) - mu) * r;
        out[c] = from_float<floatX>(n * to_float(weight[c]) + to_float(bias[c]));
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

template <typename floatX>
__device__ __forceinline__ void layernorm_forward_impl(floatX* out, float* mean, float* rstd, const floatX* inp,
                                                       const floatX* weight, const floatX* bias, int N, int C,
                                                       float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    // row is the same for all lanes of a warp, so a warp leaves whole and no shuffle is left short.
    if (row >= N) return;
    const size_t off = (size_t)row * C;
    const floatX* x = inp + off;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += to_float(x[c]);
    layernorm_row(out + off, mean, rstd, x, weight, bias, sum, row, C, eps, lane);
}

// residual = inp1 + inp2 (rounded to floatX and stored), then LayerNorm of the stored residual,
// so out is exactly the LayerNorm of what the next layer reads back as its residual.
template <typename floatX>
__device__ __forceinline__ void residual_layernorm_forward_impl(floatX* residual, floatX* out, float* mean,
                                                                float* rstd, const floatX* inp1, const floatX* inp2,
                                                                const floatX* weight, const floatX* bias, int N,
                                                                int C, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // warp-uniform, as in the forward
    const size_t off = (size_t)row * C;
    floatX* res = residual + off;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const floatX v = from_float<floatX>(to_float(inp1[off + c]) + to_float(inp2[off + c]));
        res[c] = v;
        sum += to_float(v);  // the rounded value, as later passes read it back
    }
    // Later passes read res[c] for the same c this lane wrote, so they see its own stores.
    layernorm_row(out + off, mean, rstd, res, weight, bias, sum, row, C, eps, lane);
}

// One worker per warp: worker g handles rows g, g+G, g+2G, ... and owns row g of partials,
// accumulating into it by read-modify-write of its own columns (each column always by the same
// lane), so there are no atomics and the sums are bit-reproducible.
template <typename floatX>
__device__ __forceinline__ void layernorm_backward_impl(floatX* dinp, const floatX* dresidual, float* partials,
                                                        const floatX* dout, const floatX* inp, const float* mean,
                                                        const float* rstd, const floatX* weight, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int worker = blockIdx.x * warps + threadIdx.x / 32;
    const int G = gridDim.x * warps;
    float* pw = partials + (size_t)worker * 2 * C;  // sum of dout * xhat, for dweight
    float* pb = pw + C;                             // sum of dout, for dbias
    if (worker >= N) {
        // No rows for this worker, but the reduce reads every partials row: write zeros.
        for (int c = lane; c < C; c += 32) {
            pw[c] = 0.0f;
            pb[c] = 0.0f;
        }
        return;  // warp-uniform
    }
    const float inv_c = 1.0f / (float)C;
    for (int row = worker; row < N; row += G) {  // same trip count for every lane of the warp
        const size_t off = (size_t)row * C;
        const floatX* dy = dout + off;
        const floatX* x = inp + off;
        const float mu = mean[row], r = rstd[row];

        // Pass 1: mean(g) and mean(g * xhat) over the row, g = dout * w.
        float g_sum = 0.0f, gx_sum = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float g = to_float(dy[c]) * to_float(weight[c]);
            g_sum += g;
            gx_sum += g * (to_float(x[c]) - mu) * r;
        }
        const float g_mean = warp_sum(g_sum) * inv_c;
        const float gx_mean = warp_sum(gx_sum) * inv_c;

        // Pass 2: dinp, and this row's share of dweight and dbias.
        const bool first = row == worker;  // first row overwrites the partials row, later ones add
        for (int c = lane; c < C; c += 32) {
            const float dyc = to_float(dy[c]);
            const float xm = to_float(x[c]) - mu;
            const float xhat = xm * r;
            const float d = (dyc * to_float(weight[c]) - g_mean - xhat * gx_mean) * r;
            // Read dresidual before writing dinp: they may be the same buffer.
            const float prev = dresidual ? to_float(dresidual[off + c]) : 0.0f;
            dinp[off + c] = from_float<floatX>(prev + d);
            float dw = dyc * xm * r, db = dyc;
            if (!first) {
                dw = pw[c] + dw;
                db = pb[c] + db;
            }
            pw[c] = dw;
            pb[c] = db;
        }
    }
}

#define EXPORT_LAYERNORM(suffix, floatX)                                                                            \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK)                                                         \
        layernorm_forward_##suffix(floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight, \
                                   const floatX* bias, int N, int C, float eps) {                                  \
        layernorm_forward_impl<floatX>(out, mean, rstd, inp, weight, bias, N, C, eps);                             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK) residual_layernorm_forward_##suffix(                    \
        floatX* residual, floatX* out, float* mean, float* rstd, const floatX* inp1, const floatX* inp2,            \
        const floatX* weight, const floatX* bias, int N, int C, float eps) {                                       \
        residual_layernorm_forward_impl<floatX>(residual, out, mean, rstd, inp1, inp2, weight, bias, N, C, eps);   \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_BLOCK) layernorm_backward_##suffix(                            \
        floatX* dinp, const floatX* dresidual, float* partials, const floatX* dout, const floatX* inp,             \
        const float* mean, const float* rstd, const floatX* weight, int N, int C) {                                \
        layernorm_backward_impl<floatX>(dinp, dresidual, partials, dout, inp, mean, rstd, weight, N, C);           \
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
