// Shared helpers for every kernel family. Not compiled on its own: build.rs compiles only *.cu.
//
// Storage type: each kernel is a template over `floatX`, the type of weights and activations
// (`__nv_bfloat16` for --precision bf16, `float` for --precision f32). Arithmetic is always in
// float. Each kernel is exported for both types under the C names NAME_bf16 and NAME_f32 (see
// FINCH_FOR_EACH_FLOATX at the end).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

// ---- 16-byte vectors: 8 consecutive elements (one uint4 of bf16, two float4 of float) ----------
// The memory-bound kernels move 8 elements per access when the row length is a multiple of 8 and
// the pointers are 16-byte aligned (checked once per launch: `aligned16`), else one at a time.
template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
    return (uintptr_t)p % 16 == 0;
}
__device__ __forceinline__ void load8(float* v, const float* p) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(float* v, const bf16* p) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const bf16* h = reinterpret_cast<const bf16*>(&u);
    for (int e = 0; e < 8; e++) v[e] = to_float(h[e]);
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float* v) {
    uint4 u;
    bf16* h = reinterpret_cast<bf16*>(&u);
    for (int e = 0; e < 8; e++) h[e] = from_float<bf16>(v[e]);
    *reinterpret_cast<uint4*>(p) = u;
}

// A grid-stride loop: each thread takes i = its global index, then every gridDim·blockDim-th.
// Element-wise kernels written this way are correct at any grid, so the host sizes grids from
// the SM count; a thread's own work does not depend on the grid.
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// Butterfly reductions: every lane ends with the same value, and the order of additions is
// fixed, so results are bit-identical run to run.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `scratch` must hold 32 floats; the function synchronises, so it may be reused afterwards.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// GPT-2's GELU (tanh approximation) and its derivative, as in src/cpu/gelu.rs.
#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
// Written with __fmul_rn/__fadd_rn so that nvcc cannot contract it into FMAs differently where
// it is inlined: the matmul epilogue and gelu_forward (--recompute) must give the same bits.
__device__ __forceinline__ float gelu(float x) {
    const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, x), x), x);
    const float t = tanhf(__fmul_rn(GELU_SCALE, __fadd_rn(x, cube)));
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, t));
}
__device__ __forceinline__ float gelu_grad(float x) {
    float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
    float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
}

// Instantiation: a family defines its kernels as templates over floatX, then a macro
//   #define EXPORT_FOO(suffix, floatX) extern "C" __global__ void foo_##suffix(floatX* out, ...) { foo<floatX>(out, ...); }
//   FINCH_FOR_EACH_FLOATX(EXPORT_FOO)
// which defines foo_bf16 and foo_f32, the C names the Rust side loads.
#define FINCH_FOR_EACH_FLOATX(M) M(bf16, bf16) M(f32, float)
