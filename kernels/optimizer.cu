// Global gradient norm, AdamW on fp32 master weights, and storage-type conversions
// (src/cpu/optimizer.rs).
//
// Launch configuration (n elements):
//   grad_norm_squares: U = 1024 units of work (fixed, so the result does not depend on the
//                      device), block 256, any grid (blocks take units grid-stride): the host
//                      uses min(U, 8 · SMs)
//   grad_norm_finish:  grid 1, block 256
//   step_finish:       grid 1, block 32
//   adamw:             block 256, any grid (blocks take the chunk table's chunks grid-stride):
//                      the host uses min(chunks, 8 · SMs); one launch for every tensor
//   f32_to_floatx, floatx_to_f32: block 256, any grid (grid-stride)
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

// partials[u] = Σ grads[i]² over unit u's share: thread t of unit u takes the groups of 4
// elements g = u·256 + t, then every U·256-th (one 16-byte load each), and unit 0 the n % 4 last
// elements. Each thread sums in float (a few hundred values at most for GPT-2 sizes); a unit
// combines its threads in double, in a fixed tree. Which block runs a unit does not matter.
extern "C" __global__ void __launch_bounds__(256) grad_norm_squares(double* partials, const float* grads, long long n,
                                                                    int U) {
    for (int u = blockIdx.x; u < U; u += gridDim.x) {  // uniform across the block: block_sum below
        float acc = 0.0f;
        const long long groups = n / 4;
        for (long long g = (long long)u * 256 + threadIdx.x; g < groups; g += (long long)U * 256) {
            const float4 v = reinterpret_cast<const float4*>(grads)[g];
            acc += v.x * v.x;
            acc += v.y * v.y;
            acc += v.z * v.z;
            acc += v.w * v.w;
        }
        if (u == 0 && threadIdx.x < n % 4) {
            const float g = grads[groups * 4 + threadIdx.x];
            acc += g * g;
        }
        const double total = block_sum_double_256((double)acc);
        if (threadIdx.x == 0) partials[u] = total;
        __syncthreads();  // block_sum_double_256's shared memory is reused by the next unit
    }
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
// Data parallel: the first four doubles are summed across the ranks in one all-reduce, so every
// rank sees the global loss and squared norm, and how many ranks asked to stop or checkpoint
// after this step (each rank's vote is written into its copy before the step).
struct StepState {
    double loss;
    double norm_sq;
    double stop_votes;
    double checkpoint_votes;
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
__device__ __forceinline__ void adamw_one(floatX* params, float* master, const float* grads, float* m, float* v,
                                          long long i, float grad_scale, float decay, const AdamWParams* hp) {
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

template <typename floatX>
__device__ void adamw(floatX* params, float* master, const float* grads, float* m, float* v, const AdamWChunk* chunks,
                      int n_chunks, const AdamWParams* hp, const StepState* st) {
    if (!st->finite) return;
    const float grad_scale = st->grad_scale;
    for (int k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const AdamWChunk ch = chunks[k];
        const float decay = ch.decay ? hp->decay : 1.0f;
        // The f32 arrays share the chunk's offset: 4 at a time when it is a multiple of 4 (the
        // bases are 256-byte aligned), the same formula per element either way.
        const bool vec = ch.offset % 4 == 0 && ch.len % 4 == 0 && aligned16(master) && aligned16(grads) &&
                         aligned16(m) && aligned16(v) && (uintptr_t)params % (4 * sizeof(floatX)) == 0;
        for (int j = threadIdx.x * (vec ? 4 : 1); j < ch.len; j += blockDim.x * (vec ? 4 : 1)) {
            const long long i = ch.offset + j;
            if (!vec) {
                adamw_one(params, master, grads, m, v, i, grad_scale, decay, hp);
                continue;
            }
            float4 g4 = *reinterpret_cast<const float4*>(grads + i), p4 = *reinterpret_cast<const float4*>(master + i);
            float4 m4 = *reinterpret_cast<const float4*>(m + i), v4 = *reinterpret_cast<const float4*>(v + i);
            float* gs = &g4.x;
            float* ps = &p4.x;
            float* ms = &m4.x;
            float* vs = &v4.x;
            floatX out[4];
            for (int e = 0; e < 4; e++) {
                const float g = gs[e] * grad_scale;
                float p = ps[e] * decay;
                ms[e] += hp->one_minus_beta1 * (g - ms[e]);
                vs[e] = vs[e] * hp->beta2 + hp->one_minus_beta2 * g * g;
                p -= hp->step_size * ms[e] / (sqrtf(vs[e]) / hp->bc2_sqrt + hp->eps);
                ps[e] = p;
                out[e] = from_float<floatX>(p);
            }
            *reinterpret_cast<float4*>(master + i) = p4;
            *reinterpret_cast<float4*>(m + i) = m4;
            *reinterpret_cast<float4*>(v + i) = v4;
            if constexpr (sizeof(floatX) == 2)
                *reinterpret_cast<uint2*>(params + i) = *reinterpret_cast<const uint2*>(out);
            else
                *reinterpret_cast<float4*>(params + i) = *reinterpret_cast<const float4*>(out);
        }
    }
}

template <typename floatX>
__device__ void f32_to_floatx(floatX* out, const float* in, long long n) {
    GRID_STRIDE(i, n) out[i] = from_float<floatX>(in[i]);
}

template <typename floatX>
__device__ void floatx_to_f32(float* out, const floatX* in, long long n) {
    GRID_STRIDE(i, n) out[i] = to_float(in[i]);
}

#define EXPORT(suffix, floatX)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) adamw_##suffix(                                                   \
        floatX* params, float* master, const float* grads, float* m, float* v, const AdamWChunk* chunks,               \
        int n_chunks, const AdamWParams* hp, const StepState* st) {                                                     \
        adamw<floatX>(params, master, grads, m, v, chunks, n_chunks, hp, st);                                           \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) f32_to_floatx_##suffix(floatX* out, const float* in, long long n) { \
        f32_to_floatx<floatX>(out, in, n);                                                                              \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) floatx_to_f32_##suffix(float* out, const floatX* in, long long n) { \
        floatx_to_f32<floatX>(out, in, n);                                                                              \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
