// The SwiGLU gate of the Llama family's MLP (CPU reference: src/cpu/swiglu.rs), element-wise over
// n elements: out = silu(gate) · up with silu(x) = x · σ(x), and its backward.
//
// Launch configuration (element-wise: any grid is correct, grid-stride loops, so the host sizes it
// from the SM count; no result depends on the grid):
//   swiglu_forward_{bf16,f32}:  grid min(ceil(n / 8 / 256), 8 · SMs), block 256, 0 bytes shared
//   swiglu_backward_{bf16,f32}: grid min(ceil(n / 8 / 256), 8 · SMs), block 256, 0 bytes shared
// With n a multiple of 8 and 16-byte aligned pointers, each thread moves 8 elements per access.
//
// The backward writes dgate and dup (accumulate = 0, the GPU's convention for activation
// gradients) or adds to them (accumulate = 1, as the CPU op does). No pointer is __restrict__:
// every element is read, then written, by the same thread, so out may be written over gate or up,
// and dgate/dup over dout, gate or up.
#include "llama.cuh"

// σ(x) as the CPU: 1 / (1 + e^(−x)). For very negative x, e^(−x) = inf and σ = 0 (no NaN).
__device__ __forceinline__ float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// out[i] = gate[i] · σ(gate[i]) · up[i]
template <int W, typename floatX>
__device__ __forceinline__ void swiglu_forward_impl(floatX* out, const floatX* gate, const floatX* up, long long n) {
    GRID_STRIDE(u, n / W) {
        const long long i = u * W;
        float g[W], x[W];
        load_n<W>(g, gate + i);
        load_n<W>(x, up + i);
        for (int e = 0; e < W; e++) x[e] = g[e] * swiglu_sigmoid(g[e]) * x[e];
        store_n<W>(out + i, x);
    }
}

// dgate (+)= dout · up · silu'(gate), dup (+)= dout · silu(gate), with
// silu'(x) = σ(x) · (1 + x · (1 − σ(x))).
template <int W, typename floatX>
__device__ __forceinline__ void swiglu_backward_impl(floatX* dgate, floatX* dup, const floatX* dout,
                                                     const floatX* gate, const floatX* up, long long n,
                                                     int accumulate) {
    GRID_STRIDE(u, n / W) {
        const long long i = u * W;
        float d[W], g[W], x[W], dg[W] = {}, du[W] = {};
        load_n<W>(d, dout + i);
        load_n<W>(g, gate + i);
        load_n<W>(x, up + i);
        if (accumulate) {
            load_n<W>(dg, dgate + i);
            load_n<W>(du, dup + i);
        }
        for (int e = 0; e < W; e++) {
            const float s = swiglu_sigmoid(g[e]);
            const float a = d[e] * x[e] * s * (1.0f + g[e] * (1.0f - s));
            const float b = d[e] * g[e] * s;
            dg[e] = accumulate ? dg[e] + a : a;
            du[e] = accumulate ? du[e] + b : b;
        }
        store_n<W>(dgate + i, dg);
        store_n<W>(dup + i, du);
    }
}

#define SWIGLU_VEC(...) (n % 8 == 0 && all_aligned16(__VA_ARGS__))

#define EXPORT(suffix, floatX)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        swiglu_forward_##suffix(floatX* out, const floatX* gate, const floatX* up, long long n) {                  \
        if (SWIGLU_VEC(out, gate, up))                                                                              \
            swiglu_forward_impl<8, floatX>(out, gate, up, n);                                                       \
        else                                                                                                        \
            swiglu_forward_impl<1, floatX>(out, gate, up, n);                                                       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        swiglu_backward_##suffix(floatX* dgate, floatX* dup, const floatX* dout, const floatX* gate, const floatX* up, \
                                 long long n, int accumulate) {                                                     \
        if (SWIGLU_VEC(dgate, dup, dout, gate, up))                                                                 \
            swiglu_backward_impl<8, floatX>(dgate, dup, dout, gate, up, n, accumulate);                             \
        else                                                                                                        \
            swiglu_backward_impl<1, floatX>(dgate, dup, dout, gate, up, n, accumulate);                             \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
