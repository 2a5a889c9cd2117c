// Token + position embedding, forward and backward (src/cpu/encoder.rs).
//
// Launch configuration (N = B·T rows of C channels):
//   encoder_forward:      grid ceil(N·C / 256), block 256
//   encoder_backward_wpe: grid ceil(T·C / 256), block 256
//   encoder_backward_wte: grid N (at most one block per distinct token: blocks past the count the
//                         host wrote into device memory return at once), block 256
#include "common.cuh"

// out[n, c] = wte[inp[n], c] + wpe[n % T, c]
template <typename floatX>
__device__ void encoder_forward(floatX* out, const int* inp, const floatX* wte, const floatX* wpe, int N, int T, int C) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * C) return;
    int n = (int)(idx / C), c = (int)(idx % C);
    int t = n % T;
    out[idx] = from_float<floatX>(to_float(wte[(long long)inp[n] * C + c]) + to_float(wpe[(long long)t * C + c]));
}

// dwpe[t, c] += Σ_b dout[b·T + t, c], in increasing b (the CPU's order).
template <typename floatX>
__device__ void encoder_backward_wpe(float* dwpe, const floatX* dout, int B, int T, int C) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)T * C) return;
    float acc = dwpe[idx];
    for (int b = 0; b < B; b++) acc += to_float(dout[(long long)b * T * C + idx]);
    dwpe[idx] = acc;
}

// dwte[token, c] += Σ dout[n, c] over the positions n holding that token, in increasing n.
// Rows of dwte repeat, so instead of atomics the host groups positions by token (a CSR list:
// bucket u holds token bucket_token[u] at positions bucket_positions[bucket_start[u] ..
// bucket_start[u+1]], sorted) and each block owns one token's row: deterministic. The number of
// buckets is read from device memory (n_buckets), so one launch shape fits every batch and a
// captured step can be replayed on new tokens.
template <typename floatX>
__device__ void encoder_backward_wte(float* dwte, const floatX* dout, const int* bucket_token, const int* bucket_start,
                                     const int* bucket_positions, const int* n_buckets, int C) {
    int u = blockIdx.x;
    if (u >= *n_buckets) return;
    long long row = (long long)bucket_token[u] * C;
    int begin = bucket_start[u], end = bucket_start[u + 1];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = dwte[row + c];
        for (int i = begin; i < end; i++) acc += to_float(dout[(long long)bucket_positions[i] * C + c]);
        dwte[row + c] = acc;
    }
}

#define EXPORT(suffix, floatX)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) encoder_forward_##suffix(                                        \
        floatX* out, const int* inp, const floatX* wte, const floatX* wpe, int N, int T, int C) {                      \
        encoder_forward<floatX>(out, inp, wte, wpe, N, T, C);                                                          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                                 \
        encoder_backward_wpe_##suffix(float* dwpe, const floatX* dout, int B, int T, int C) {                          \
        encoder_backward_wpe<floatX>(dwpe, dout, B, T, C);                                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) encoder_backward_wte_##suffix(                                   \
        float* dwte, const floatX* dout, const int* bucket_token, const int* bucket_start, const int* bucket_positions, \
        const int* n_buckets, int C) {                                                                                 \
        encoder_backward_wte<floatX>(dwte, dout, bucket_token, bucket_start, bucket_positions, n_buckets, C);          \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
