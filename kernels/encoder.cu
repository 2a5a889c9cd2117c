// Token + position embedding, forward and backward (src/cpu/encoder.rs).
//
// Launch configuration (N = B·T rows of C channels). The forward and the wpe gradient are
// element-wise: any grid is correct (grid-stride loops), and the host sizes it from the SM count.
//   encoder_forward:      grid min(ceil(N·C / 8 / 256), 8 · SMs), block 256
//   encoder_backward_wpe: grid min(ceil(T·C / 8 / 256), 8 · SMs), block 256
//   encoder_backward_wte: grid N (at most one block per distinct token: blocks past the count the
//                         host wrote into device memory return at once), block 256
// With C a multiple of 8 and 16-byte aligned pointers, each thread moves 8 channels per access.
#include "common.cuh"

// out[n, c] = wte[inp[n], c] + wpe[n % T, c]
template <typename floatX>
__device__ void encoder_forward(floatX* out, const int* inp, const floatX* wte, const floatX* wpe, int N, int T, int C) {
    const long long total = (long long)N * C;
    if (C % 8 == 0 && aligned16(out) && aligned16(wte) && aligned16(wpe)) {
        GRID_STRIDE(g, total / 8) {
            const long long idx = g * 8;
            const int n = (int)(idx / C), c = (int)(idx % C);
            float x[8], p[8];
            load8(x, wte + (long long)inp[n] * C + c);
            load8(p, wpe + (long long)(n % T) * C + c);
            for (int e = 0; e < 8; e++) x[e] += p[e];
            store8(out + idx, x);
        }
        return;
    }
    GRID_STRIDE(idx, total) {
        const int n = (int)(idx / C), c = (int)(idx % C);
        out[idx] = from_float<floatX>(to_float(wte[(long long)inp[n] * C + c]) + to_float(wpe[(long long)(n % T) * C + c]));
    }
}

// dwpe[t, c] += Σ_b dout[b·T + t, c], in increasing b (the CPU's order).
template <typename floatX>
__device__ void encoder_backward_wpe(float* dwpe, const floatX* dout, int B, int T, int C) {
    const long long total = (long long)T * C;
    if (C % 8 == 0 && aligned16(dwpe) && aligned16(dout)) {
        GRID_STRIDE(g, total / 8) {
            const long long idx = g * 8;
            float acc[8], d[8];
            load8(acc, dwpe + idx);
            for (int b = 0; b < B; b++) {
                load8(d, dout + (long long)b * total + idx);
                for (int e = 0; e < 8; e++) acc[e] += d[e];
            }
            store8(dwpe + idx, acc);
        }
        return;
    }
    GRID_STRIDE(idx, total) {
        float acc = dwpe[idx];
        for (int b = 0; b < B; b++) acc += to_float(dout[(long long)b * total + idx]);
        dwpe[idx] = acc;
    }
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
    const int u = blockIdx.x;
    if (u >= *n_buckets) return;
    const long long row = (long long)bucket_token[u] * C;
    const int begin = bucket_start[u], end = bucket_start[u + 1];
    if (C % 8 == 0 && aligned16(dwte) && aligned16(dout)) {
        for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
            float acc[8], d[8];
            load8(acc, dwte + row + c);
            for (int i = begin; i < end; i++) {
                load8(d, dout + (long long)bucket_positions[i] * C + c);
                for (int e = 0; e < 8; e++) acc[e] += d[e];
            }
            store8(dwte + row + c, acc);
        }
        return;
    }
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
