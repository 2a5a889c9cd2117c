// Global gradient norm, AdamW on fp32 master weights, and storage-type conversions
// (src/cpu/optimizer.rs).
//
// Launch configuration (n elements):
//   grad_norm_squares: grid G (the host fixes G, so the result does not depend on the device), block 256
//   grad_norm_finish:  grid 1, block 256
//   step_finish:       grid 1, block 32
//   adamw:             grid = chunks in the chunk table, block 256 (one launch for every tensor)
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

// What a training step leaves on the device for the host to read back once, after the update:
// the mean loss (summed by loss_accumulate), the squared gradient norm (grad_norm_finish writes
// it here), then what step_finish derives. The host's struct in src/cuda/model.rs matches.
struct StepState {
    double loss;
    double norm_sq;
    double norm;
    float grad_scale;  // the clipping factor AdamW applies
    int finite;        // the loss and the norm are finite: the update is applied
};

// From the loss and the squared norm: the norm, whether both are finite, and the clipping
// factor, in double as the host's clip_coefficient (torch's rule) computes it, rounded once.
extern "C" __global__ void __launch_bounds__(32) step_finish(StepState* st, double max_norm) {
    if (threadIdx.x != 0) return;
    const double norm = sqrt(st->norm_sq);
    const double coef = max_norm / (norm + 1e-6);
    st->norm = norm;
    st->grad_scale = (float)((max_norm <= 0.0 || coef >= 1.0) ? 1.0 : coef);
    st->finite = isfinite(st->loss) && isfinite(norm);
}

// AdamW's scalars for one step, formed in double on the host and rounded once (AdamWScalars):
// in device memory, so that a captured step replays with each step's learning rate.
struct AdamWParams {
    float step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, decay;
};

// A piece of one parameter tensor: elements [offset, offset + len), decayed or not (2-D tensors
// are). The host splits every tensor into such chunks once; one block takes one chunk.
struct AdamWChunk {
    long long offset;
    int len;
    int decay;
};

// AdamW on every parameter tensor in one launch, torch's single-tensor formula per element with
// the scalars formed in double on the host and rounded once (as the CPU does):
//   g ← grad·grad_scale (the step's clipping factor, 1 when not clipping);  p ← p·decay (chunks
//   of 2-D tensors; 1 otherwise);  m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²;
//   p ← p − step_size · m / (sqrt(v)/bc2_sqrt + eps);  params (the floatX copy the forward reads) ← round(p).
// Nothing at all when the step's loss or norm was not finite. One block per chunk.
template <typename floatX>
__device__ void adamw(floatX* params, float* master, const float* grads, float* m, float* v, const AdamWChunk* chunks,
                      const AdamWParams* hp, const StepState* st) {
    if (!st->finite) return;
    const AdamWChunk ch = chunks[blockIdx.x];
    const float grad_scale = st->grad_scale, decay = ch.decay ? hp->decay : 1.0f;
    for (int j = threadIdx.x; j < ch.len; j += blockDim.x) {
        const long long i = ch.offset + j;
        float g = grads[i] * grad_scale;
        float p = master[i] * decay;
        float mi = m[i];
        mi += hp->one_minus_beta1 * (g - mi);
        float vi = v[i] * hp->beta2 + hp->one_minus_beta2 * g * g;
        p -= hp->step_size * mi / (sqrtf(vi) / hp->bc2_sqrt + hp->eps);
        master[i] = p;
        m[i] = mi;
        v[i] = vi;
        params[i] = from_float<floatX>(p);
    }
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
        floatX* params, float* master, const float* grads, float* m, float* v, const AdamWChunk* chunks,               \
        const AdamWParams* hp, const StepState* st) {                                                                   \
        adamw<floatX>(params, master, grads, m, v, chunks, hp, st);                                                     \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) f32_to_floatx_##suffix(floatX* out, const float* in, long long n) { \
        f32_to_floatx<floatX>(out, in, n);                                                                              \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) floatx_to_f32_##suffix(float* out, const floatX* in, long long n) { \
        floatx_to_f32<floatX>(out, in, n);                                                                              \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
