// Rotary position embeddings, forward and backward (CPU reference: src/cpu/rope.rs), in Hugging
// Face's rotate_half convention: in each head of hd channels, channel i pairs with i + hd/2 (not
// 2i with 2i+1). Rows are (N, H·hd), row n at position n % T.
//
// The angles come from the host as two f32 tables, cos and sin, (T, hd/2) each: the host computes
// them in f64 exactly as rope_tables in src/cpu/rope.rs (inv_freq = 1 / θ^(2i/hd), angle =
// pos · inv_freq, cos and sin rounded once to f32), so the CPU at f32 and the GPU rotate by the
// same numbers, and no kernel evaluates a transcendental function.
//
// Launch configuration (element-wise over channel pairs: any grid is correct, grid-stride loops,
// so the host sizes it from the SM count; no result depends on the grid). P = N · H · hd/2 pairs:
//   rope_forward_{bf16,f32}:  grid min(ceil(P / 8 / 256), 8 · SMs), block 256, 0 bytes shared
//   rope_backward_{bf16,f32}: grid min(ceil(P / 8 / 256), 8 · SMs), block 256, 0 bytes shared
// hd must be even. With hd/2 a multiple of 8 and 16-byte aligned pointers, a thread rotates 8
// consecutive pairs per access; else one.
//
// The backward writes dinp (accumulate = 0, the GPU's convention for activation gradients) or
// adds to it (accumulate = 1, as the CPU op does). No pointer is __restrict__: both channels of a
// pair are read, then written, by the same thread, so out may be inp (in place).
#include "llama.cuh"

// One unit of work: W consecutive pairs (i .. i+W−1 with their partners i+hd/2 ..) of one head
// of one row. Calls body(x, at, i): x = offset of the head's channel 0, at = offset of the row's
// position in the tables, i = the first pair.
template <int W, typename Body>
__device__ __forceinline__ void rope_units(int N, int T, int H, int hd, Body body) {
    const int half = hd / 2, per_head = half / W;
    GRID_STRIDE(u, (long long)N * H * per_head) {
        const int i = (int)(u % per_head) * W;
        const long long rh = u / per_head;  // row · H + head
        const int row = (int)(rh / H);
        body(rh * hd, (long long)(row % T) * half, i);
    }
}

template <int W, typename floatX>
__device__ __forceinline__ void rope_forward_impl(floatX* out, const floatX* inp, const float* cos, const float* sin,
                                                  int N, int T, int H, int hd) {
    const int half = hd / 2;
    rope_units<W>(N, T, H, hd, [&](long long x, long long at, int i) {
        float x0[W], x1[W], c[W], s[W];
        load_n<W>(x0, inp + x + i);
        load_n<W>(x1, inp + x + i + half);
        load_n<W>(c, cos + at + i);
        load_n<W>(s, sin + at + i);
        for (int e = 0; e < W; e++) rope_rotate(x0[e], x1[e], c[e], s[e], &x0[e], &x1[e]);
        store_n<W>(out + x + i, x0);
        store_n<W>(out + x + i + half, x1);
    });
}

template <int W, typename floatX>
__device__ __forceinline__ void rope_backward_impl(floatX* dinp, const floatX* dout, const float* cos,
                                                   const float* sin, int N, int T, int H, int hd, int accumulate) {
    const int half = hd / 2;
    rope_units<W>(N, T, H, hd, [&](long long x, long long at, int i) {
        float g0[W], g1[W], c[W], s[W], d0[W] = {}, d1[W] = {};
        load_n<W>(g0, dout + x + i);
        load_n<W>(g1, dout + x + i + half);
        load_n<W>(c, cos + at + i);
        load_n<W>(s, sin + at + i);
        if (accumulate) {
            load_n<W>(d0, dinp + x + i);
            load_n<W>(d1, dinp + x + i + half);
        }
        for (int e = 0; e < W; e++) {
            float a, b;
            rope_rotate_back(g0[e], g1[e], c[e], s[e], &a, &b);
            d0[e] = accumulate ? d0[e] + a : a;
            d1[e] = accumulate ? d1[e] + b : b;
        }
        store_n<W>(dinp + x + i, d0);
        store_n<W>(dinp + x + i + half, d1);
    });
}

#define ROPE_VEC(...) ((hd / 2) % 8 == 0 && all_aligned16(__VA_ARGS__))

#define EXPORT(suffix, floatX)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) rope_forward_##suffix(                                       \
        floatX* out, const floatX* inp, const float* cos, const float* sin, int N, int T, int H, int hd) {         \
        if (ROPE_VEC(out, inp, cos, sin))                                                                           \
            rope_forward_impl<8, floatX>(out, inp, cos, sin, N, T, H, hd);                                          \
        else                                                                                                        \
            rope_forward_impl<1, floatX>(out, inp, cos, sin, N, T, H, hd);                                          \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        rope_backward_##suffix(floatX* dinp, const floatX* dout, const float* cos, const float* sin, int N, int T, \
                               int H, int hd, int accumulate) {                                                     \
        if (ROPE_VEC(dinp, dout, cos, sin))                                                                         \
            rope_backward_impl<8, floatX>(dinp, dout, cos, sin, N, T, H, hd, accumulate);                           \
        else                                                                                                        \
            rope_backward_impl<1, floatX>(dinp, dout, cos, sin, N, T, H, hd, accumulate);                           \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
