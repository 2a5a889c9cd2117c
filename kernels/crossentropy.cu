// Fused softmax + cross-entropy over a padded vocabulary (src/cpu/crossentropy.rs).
//
// Launch configuration (N rows of Vp logits):
//   crossentropy_forward: block 256, any grid (blocks take rows grid-stride): the host uses
//                         min(N, 8 · SMs)
//   loss_accumulate:      grid 1, block 256
#include "common.cuh"

// W consecutive logits of a row as floats (W = 8: one 16-byte access).
template <int W, typename T>
__device__ __forceinline__ void logits_w(float* z, const T* p) {
    if constexpr (W == 8)
        load8(z, p);
    else
        z[0] = to_float(p[0]);
}

// For row n: losses[n] = lse − logits[n, target] with lse = log Σ_{v<V} exp(logits[n, v]).
// If dlogits is not NULL, also writes dlogits[n, v] = (softmax_v − [v = target]) · dloss for
// v < V and 0 in the padding V..Vp. dlogits may be the logits buffer itself (in place): every
// element is read and then written by the same thread, and the target logit is read before the
// first barrier. Thread i takes W logits at v = W·i, W·i + 256·W, ...: with W = 8 (Vp a multiple
// of 8, aligned rows) one 16-byte access each.
template <int W, typename floatX>
__device__ void crossentropy_rows(float* losses, floatX* dlogits, const floatX* logits, const int* targets, int N,
                                  int V, int Vp, float dloss) {
    __shared__ float scratch[32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const long long row = (long long)n * Vp;
        const int target = targets[n];
        const float z_target = to_float(logits[row + target]);

        float max = -INFINITY;
        for (int v0 = threadIdx.x * W; v0 < Vp; v0 += blockDim.x * W) {
            float z[W];
            logits_w<W>(z, logits + row + v0);
            for (int e = 0; e < W; e++)
                if (v0 + e < V) max = fmaxf(max, z[e]);
        }
        max = block_max(max, scratch);
        float sum = 0.0f;
        for (int v0 = threadIdx.x * W; v0 < Vp; v0 += blockDim.x * W) {
            float z[W];
            logits_w<W>(z, logits + row + v0);
            for (int e = 0; e < W; e++)
                if (v0 + e < V) sum += expf(z[e] - max);
        }
        sum = block_sum(sum, scratch);
        const float lse = max + logf(sum);
        if (threadIdx.x == 0) losses[n] = lse - z_target;

        if (dlogits == nullptr) continue;
        for (int v0 = threadIdx.x * W; v0 < Vp; v0 += blockDim.x * W) {
            float z[W];
            logits_w<W>(z, logits + row + v0);
            for (int e = 0; e < W; e++) {
                const int v = v0 + e;
                z[e] = v < V ? (expf(z[e] - lse) - (v == target ? 1.0f : 0.0f)) * dloss : 0.0f;
            }
            if constexpr (W == 8)
                store8(dlogits + row + v0, z);
            else
                dlogits[row + v0] = from_float<floatX>(z[0]);
        }
        // The next row's first barrier (in block_max) keeps its scratch use after this row's.
    }
}

template <typename floatX>
__device__ void crossentropy_forward(float* losses, floatX* dlogits, const floatX* logits, const int* targets, int N,
                                     int V, int Vp, float dloss) {
    if (Vp % 8 == 0 && aligned16(logits) && (dlogits == nullptr || aligned16(dlogits)))
        crossentropy_rows<8>(losses, dlogits, logits, targets, N, V, Vp, dloss);
    else
        crossentropy_rows<1>(losses, dlogits, logits, targets, N, V, Vp, dloss);
}

#define EXPORT(suffix, floatX)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) crossentropy_forward_##suffix(                             \
        float* losses, floatX* dlogits, const floatX* logits, const int* targets, int N, int V, int Vp,         \
        float dloss) {                                                                                          \
        crossentropy_forward<floatX>(losses, dlogits, logits, targets, N, V, Vp, dloss);                        \
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
