// Fused softmax + cross-entropy over a padded vocabulary (src/cpu/crossentropy.rs).
//
// Launch configuration (N rows of Vp logits):
//   crossentropy_forward: grid N, block 256
//   loss_accumulate:      grid 1, block 256
#include "common.cuh"

// For row n: losses[n] = lse − logits[n, target] with lse = log Σ_{v<V} exp(logits[n, v]).
// If dlogits is not NULL, also writes dlogits[n, v] = (softmax_v − [v = target]) · dloss for
// v < V and 0 in the padding V..Vp. dlogits may be the logits buffer itself (in place): every
// element is read and then written by the same thread, and the target logit is read before the
// first barrier.
template <typename floatX>
__device__ void crossentropy_forward(float* losses, floatX* dlogits, const floatX* logits, const int* targets, int V,
                                     int Vp, float dloss) {
    __shared__ float scratch[32];
    const long long row = (long long)blockIdx.x * Vp;
    const int target = targets[blockIdx.x];
    const float z_target = to_float(logits[row + target]);

    float max = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) max = fmaxf(max, to_float(logits[row + v]));
    max = block_max(max, scratch);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(to_float(logits[row + v]) - max);
    sum = block_sum(sum, scratch);
    const float lse = max + logf(sum);
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - z_target;

    if (dlogits == nullptr) return;
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
        float d = 0.0f;
        if (v < V) d = (expf(to_float(logits[row + v]) - lse) - (v == target ? 1.0f : 0.0f)) * dloss;
        dlogits[row + v] = from_float<floatX>(d);
    }
}

#define EXPORT(suffix, floatX)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) crossentropy_forward_##suffix(                             \
        float* losses, floatX* dlogits, const floatX* logits, const int* targets, int V, int Vp, float dloss) { \
        crossentropy_forward<floatX>(losses, dlogits, logits, targets, V, Vp, dloss);                            \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)

// acc[0] += (Σ losses[0..N] / N) / accum, in double: one micro-batch's mean loss added to the
// step's, as the host adds `loss / grad_accum`. One block sums in a fixed order (a strided pass,
// then a fixed tree), so the result does not depend on the GPU; the loss stays on the device and
// is read back once per step.
extern "C" __global__ void __launch_bounds__(256) loss_accumulate(double* acc, const float* losses, int N, int accum) {
    __shared__ double partial[256];
    double sum = 0.0;
    for (int i = threadIdx.x; i < N; i += 256) sum += (double)losses[i];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) acc[0] += partial[0] / N / accum;
}
