// Global gradient norm, AdamW on fp32 master weights, and storage-type conversions
// (src/cpu/optimizer.rs).
//
// Launch configuration (n elements):
//   grad_norm_squares: grid G (the host fixes G, so the result does not depend on the device), block 256
//   grad_norm_finish:  grid 1, block 256
//   adamw:             grid ceil(n / 256), block 256 (one launch per parameter tensor)
//   f32_to_floatx, floatx_to_f32: grid ceil(n / 256), block 256
#include "common.cuh"

// Sum in double over a block of exactly 256 threads, in a fixed tree order; valid in thread 0.
__device__ double block_sum_double_256(double v) {
    __shared__ double partial[256];
    partial[threadIdx.x] = v;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    return partial[0];
}

// partials[block] = Σ grads[i]² over the block's grid-stride share of i. Each thread sums its
// elements in float (a few hundred at most for GPT-2 sizes), blocks combine in double.
extern "C" __global__ void __launch_bounds__(256) grad_norm_squares(double* partials, const float* grads, long long n) {
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = grads[i];
        acc += g * g;
    }
    double total = block_sum_double_256((double)acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// out[0] = Σ partials[0..G] (the squared global norm), in a fixed order.
extern "C" __global__ void __launch_bounds__(256) grad_norm_finish(double* out, const double* partials, int G) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) acc += partials[i];
    double total = block_sum_double_256(acc);
    if (threadIdx.x == 0) out[0] = total;
}

// One AdamW step for n elements of one tensor, torch's single-tensor formula with the scalars
// formed in double on the host and rounded once (as the CPU does):
//   g ← grad·grad_scale (the clipping factor, 1 when not clipping);  p ← p·decay;
//   m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²;  p ← p − step_size · m / (sqrt(v)/bc2_sqrt + eps);
// then params (the floatX copy the forward reads) ← round(p).
template <typename floatX>
__device__ void adamw(floatX* params, float* master, const float* grads, float* m, float* v, long long n, float grad_scale,
                      float step_size, float bc2_sqrt, float one_minus_beta1, float beta2, float one_minus_beta2, float eps,
                      float decay) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i] * grad_scale;
    float p = master[i] * decay;
    float mi = m[i];
    mi += one_minus_beta1 * (g - mi);
    float vi = v[i] * beta2 + one_minus_beta2 * g * g;
    p -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    master[i] = p;
    m[i] = mi;
    v[i] = vi;
    params[i] = from_float<floatX>(p);
}

template <typename floatX>
__device__ void f32_to_floatx(floatX* out, const float* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<floatX>(in[i]);
}

template <typename floatX>
__device__ void floatx_to_f32(float* out, const floatX* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = to_float(in[i]);
}

#define EXPORT(suffix, floatX)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) adamw_##suffix(                                                   \
        floatX* params, float* master, const float* grads, float* m, float* v, long long n, float grad_scale,          \
        float step_size, float bc2_sqrt, float one_minus_beta1, float beta2, float one_minus_beta2, float eps,         \
        float decay) {                                                                                                  \
        adamw<floatX>(params, master, grads, m, v, n, grad_scale, step_size, bc2_sqrt, one_minus_beta1, beta2,          \
                      one_minus_beta2, eps, decay);                                                                     \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) f32_to_floatx_##suffix(floatX* out, const float* in, long long n) { \
        f32_to_floatx<floatX>(out, in, n);                                                                              \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) floatx_to_f32_##suffix(float* out, const floatX* in, long long n) { \
        floatx_to_f32<floatX>(out, in, n);                                                                              \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
