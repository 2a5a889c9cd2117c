// Helpers shared by the Llama family's kernels (rmsnorm.cu, rope.cu, swiglu.cu, gqa.cu). Not
// compiled on its own: build.rs compiles only *.cu. (tools/kernel-emu/fake-cuda compiles every
// kernels/*.cu as one translation unit, so these live here once instead of in each file.)
#pragma once
#include "common.cuh"

// W consecutive values at p as floats: W = 8 is one 16-byte access (load8/store8), W = 1 one
// element. The kernels take W = 8 when their row length allows it and the pointers are aligned.
template <int W, typename T>
__device__ __forceinline__ void load_n(float* v, const T* p) {
    if constexpr (W == 8)
        load8(v, p);
    else
        v[0] = to_float(p[0]);
}
template <int W, typename T>
__device__ __forceinline__ void store_n(T* p, const float* v) {
    if constexpr (W == 8)
        store8(p, v);
    else
        p[0] = from_float<T>(v[0]);
}

// Every pointer 16-byte aligned (a null one counts as aligned: it is never accessed).
__device__ __forceinline__ bool all_aligned16() { return true; }
template <typename P, typename... Ps>
__device__ __forceinline__ bool all_aligned16(const P* p, const Ps*... ps) {
    return (p == nullptr || aligned16(p)) && all_aligned16(ps...);
}

// The RoPE rotation of one channel pair (x0 = channel i, x1 = channel i + hd/2 of a head) by the
// angle whose cos and sin are c and s, as src/cpu/rope.rs: o0 = x0·c − x1·s, o1 = x1·c + x0·s.
// Written with __fmul_rn/__fadd_rn (each product and sum rounded, as the CPU does, no FMA) so
// that every kernel inlining it (rope_forward, rope_pack_qkv) gives the same bits.
__device__ __forceinline__ void rope_rotate(float x0, float x1, float c, float s, float* o0, float* o1) {
    *o0 = __fadd_rn(__fmul_rn(x0, c), -__fmul_rn(x1, s));
    *o1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}
// Its transpose (rotation by −angle), for the backward: d0 = g0·c + g1·s, d1 = g1·c − g0·s.
__device__ __forceinline__ void rope_rotate_back(float g0, float g1, float c, float s, float* d0, float* d1) {
    *d0 = __fadd_rn(__fmul_rn(g0, c), __fmul_rn(g1, s));
    *d1 = __fadd_rn(__fmul_rn(g1, c), -__fmul_rn(g0, s));
}
