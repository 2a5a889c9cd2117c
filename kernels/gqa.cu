// Grouped-query attention on the GPT-2 attention kernels (CPU reference: pack_qkv and unpack_dqkv
// in src/cpu/llama.rs, with rope_forward / rope_backward of src/cpu/rope.rs): q (N, C) and
// k, v (N, KVD) are packed into the (N, 3C) qkv buffer kernels/attention.cu reads, each of the
// NKV kv heads repeated for its group of NH/NKV query heads (query head h reads kv head
// h / (NH/NKV)); the backward is the transpose, dk and dv summed over each group. C = NH·hd,
// KVD = NKV·hd.
//
// rope_pack_qkv / unpack_rope_dqkv also apply RoPE to q and k (rope.cu's rotation, the same
// rope_rotate, so the same bits) in the same pass, sparing the rotated copies of q and k:
//   rope_pack_qkv    = rope_forward(q), rope_forward(k), then pack_qkv
//   unpack_rope_dqkv = unpack_dqkv, then rope_backward of dq and dk (the group sum first, then
//                      the rotation, as the CPU does)
// cos and sin are the (T, hd/2) f32 tables described in rope.cu (computed by the host in f64,
// rounded once); rows are at position n % T.
//
// Launch configuration (element-wise over channel pairs (i, i + hd/2) of a head: any grid is
// correct, grid-stride loops, so the host sizes it from the SM count; no result depends on the
// grid). hd must be even.
//   pack_qkv_{bf16,f32}, rope_pack_qkv_{bf16,f32}:
//       P = N · 3·NH · hd/2 pairs: grid min(ceil(P / 8 / 256), 8 · SMs), block 256, 0 bytes shared
//   unpack_dqkv_{bf16,f32}, unpack_rope_dqkv_{bf16,f32}:
//       P = N · (NH + 2·NKV) · hd/2 pairs: grid min(ceil(P / 8 / 256), 8 · SMs), block 256, 0 bytes
// With hd/2 a multiple of 8 and 16-byte aligned pointers, a thread moves 8 consecutive pairs per
// access; else one.
//
// Each element of dq, dk, dv is written by one thread, which sums its group's NH/NKV heads of
// dqkv in increasing head order (the CPU's order), in fp32, with no atomics. The backward writes
// dq, dk, dv (accumulate = 0, the GPU's convention for activation gradients) or adds to all three
// (accumulate = 1). The CPU's unpack_dqkv overwrites dq and adds to dk and dv, which it has
// zeroed, so accumulate = 0 gives its result.
#include "llama.cuh"

// W consecutive pairs of one head: channels i.. and i+half.. of the head at `p`.
template <int W, typename T>
__device__ __forceinline__ void gqa_load_pairs(float* x0, float* x1, const T* p, int i, int half) {
    load_n<W>(x0, p + i);
    load_n<W>(x1, p + i + half);
}
template <int W, typename T>
__device__ __forceinline__ void gqa_store_pairs(T* p, const float* x0, const float* x1, int i, int half) {
    store_n<W>(p + i, x0);
    store_n<W>(p + i + half, x1);
}

// qkv[row, part·C + h·hd + x] = (q | k | v)[row, head of h in that part, x], q and k rotated
// when ROPE. Unit: W pairs of one (row, part, h).
template <int W, bool ROPE, typename floatX>
__device__ __forceinline__ void pack_qkv_impl(floatX* qkv, const floatX* q, const floatX* k, const floatX* v,
                                              const float* cos, const float* sin, int N, int T, int NH, int NKV,
                                              int hd) {
    const int half = hd / 2, per_head = half / W, group = NH / NKV;
    const long long C = (long long)NH * hd, KVD = (long long)NKV * hd;
    GRID_STRIDE(u, (long long)N * 3 * NH * per_head) {
        const int i = (int)(u % per_head) * W;
        const long long rs = u / per_head;  // row · 3NH + slot
        const int row = (int)(rs / (3 * NH)), slot = (int)(rs % (3 * NH));
        const int part = slot / NH, h = slot % NH;
        const floatX* src = part == 0 ? q + row * C + (long long)h * hd
                                      : (part == 1 ? k : v) + row * KVD + (long long)(h / group) * hd;
        float x0[W], x1[W];
        gqa_load_pairs<W>(x0, x1, src, i, half);
        if (ROPE && part < 2) {
            float c[W], s[W];
            const long long at = (long long)(row % T) * half + i;
            load_n<W>(c, cos + at);
            load_n<W>(s, sin + at);
            for (int e = 0; e < W; e++) rope_rotate(x0[e], x1[e], c[e], s[e], &x0[e], &x1[e]);
        }
        gqa_store_pairs<W>(qkv + rs * hd, x0, x1, i, half);  // rs · hd = row · 3C + part · C + h · hd
    }
}

// The transpose: dq[row, h] = dqkv's q head h; dk[row, j] = Σ_{g < group} dqkv's k head
// j·group + g, in increasing g, likewise dv; dq and dk rotated back when ROPE (after the sum).
// Unit: W pairs of one (row, slot), slot < NH a q head, then NKV k heads, then NKV v heads.
template <int W, bool ROPE, typename floatX>
__device__ __forceinline__ void unpack_dqkv_impl(floatX* dq, floatX* dk, floatX* dv, const floatX* dqkv,
                                                 const float* cos, const float* sin, int N, int T, int NH, int NKV,
                                                 int hd, int accumulate) {
    const int half = hd / 2, per_head = half / W, group = NH / NKV, slots = NH + 2 * NKV;
    const long long C = (long long)NH * hd, KVD = (long long)NKV * hd;
    GRID_STRIDE(u, (long long)N * slots * per_head) {
        const int i = (int)(u % per_head) * W;
        const long long rs = u / per_head;
        const int row = (int)(rs / slots), slot = (int)(rs % slots);
        const floatX* d = dqkv + row * 3 * C;
        floatX* out;
        int heads;  // dqkv heads summed into this one
        bool rotate;
        if (slot < NH) {
            d += (long long)slot * hd;
            out = dq + row * C + (long long)slot * hd;
            heads = 1, rotate = ROPE;
        } else if (slot < NH + NKV) {
            d += C + (long long)(slot - NH) * group * hd;
            out = dk + row * KVD + (long long)(slot - NH) * hd;
            heads = group, rotate = ROPE;
        } else {
            d += 2 * C + (long long)(slot - NH - NKV) * group * hd;
            out = dv + row * KVD + (long long)(slot - NH - NKV) * hd;
            heads = group, rotate = false;
        }
        float p0[W] = {}, p1[W] = {}, s0[W], s1[W];
        if (accumulate) gqa_load_pairs<W>(p0, p1, out, i, half);
        // Without rotation, the previous value starts the sum (the CPU's `dk += ...` per head);
        // with it, the rotation of the group's sum is added to the previous value.
        if (rotate)
            for (int e = 0; e < W; e++) s0[e] = 0.0f, s1[e] = 0.0f;
        else
            for (int e = 0; e < W; e++) s0[e] = p0[e], s1[e] = p1[e];
        for (int g = 0; g < heads; g++) {
            float x0[W], x1[W];
            gqa_load_pairs<W>(x0, x1, d + (long long)g * hd, i, half);
            for (int e = 0; e < W; e++) s0[e] += x0[e], s1[e] += x1[e];
        }
        if (rotate) {
            float c[W], s[W];
            const long long at = (long long)(row % T) * half + i;
            load_n<W>(c, cos + at);
            load_n<W>(s, sin + at);
            for (int e = 0; e < W; e++) {
                float a, b;
                rope_rotate_back(s0[e], s1[e], c[e], s[e], &a, &b);
                s0[e] = accumulate ? p0[e] + a : a;
                s1[e] = accumulate ? p1[e] + b : b;
            }
        }
        gqa_store_pairs<W>(out, s0, s1, i, half);
    }
}

#define GQA_VEC(...) ((hd / 2) % 8 == 0 && all_aligned16(__VA_ARGS__))

#define EXPORT(suffix, floatX)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) pack_qkv_##suffix(                                           \
        floatX* qkv, const floatX* q, const floatX* k, const floatX* v, int N, int NH, int NKV, int hd) {          \
        if (GQA_VEC(qkv, q, k, v))                                                                                  \
            pack_qkv_impl<8, false, floatX>(qkv, q, k, v, nullptr, nullptr, N, 1, NH, NKV, hd);                    \
        else                                                                                                        \
            pack_qkv_impl<1, false, floatX>(qkv, q, k, v, nullptr, nullptr, N, 1, NH, NKV, hd);                    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        rope_pack_qkv_##suffix(floatX* qkv, const floatX* q, const floatX* k, const floatX* v, const float* cos,   \
                               const float* sin, int N, int T, int NH, int NKV, int hd) {                          \
        if (GQA_VEC(qkv, q, k, v, cos, sin))                                                                        \
            pack_qkv_impl<8, true, floatX>(qkv, q, k, v, cos, sin, N, T, NH, NKV, hd);                             \
        else                                                                                                        \
            pack_qkv_impl<1, true, floatX>(qkv, q, k, v, cos, sin, N, T, NH, NKV, hd);                             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        unpack_dqkv_##suffix(floatX* dq, floatX* dk, floatX* dv, const floatX* dqkv, int N, int NH, int NKV,       \
                             int hd, int accumulate) {                                                              \
        if (GQA_VEC(dq, dk, dv, dqkv))                                                                              \
            unpack_dqkv_impl<8, false, floatX>(dq, dk, dv, dqkv, nullptr, nullptr, N, 1, NH, NKV, hd, accumulate); \
        else                                                                                                        \
            unpack_dqkv_impl<1, false, floatX>(dq, dk, dv, dqkv, nullptr, nullptr, N, 1, NH, NKV, hd, accumulate); \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) unpack_rope_dqkv_##suffix(                                   \
        floatX* dq, floatX* dk, floatX* dv, const floatX* dqkv, const float* cos, const float* sin, int N, int T,  \
        int NH, int NKV, int hd, int accumulate) {                                                                  \
        if (GQA_VEC(dq, dk, dv, dqkv, cos, sin))                                                                    \
            unpack_dqkv_impl<8, true, floatX>(dq, dk, dv, dqkv, cos, sin, N, T, NH, NKV, hd, accumulate);          \
        else                                                                                                        \
            unpack_dqkv_impl<1, true, floatX>(dq, dk, dv, dqkv, cos, sin, N, T, NH, NKV, hd, accumulate);          \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
