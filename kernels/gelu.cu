// GELU on its own (src/cpu/gelu.rs), for --recompute: the MLP's GELU output is not kept from the
// forward but recomputed from the stored pre-activation just before the backward needs it. The
// matmul epilogue computes the same gelu() of the same stored value, so the bits are the same.
//
// Launch configuration (n elements):
//   gelu_forward: grid ceil(n / 256), block 256
#include "common.cuh"

// out[i] = round(gelu(inp[i]))
template <typename floatX>
__device__ void gelu_forward(floatX* out, const floatX* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<floatX>(gelu(to_float(inp[i])));
}

#define EXPORT(suffix, floatX)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gelu_forward_##suffix(floatX* out, const floatX* inp, \
                                                                            long long n) {                  \
        gelu_forward<floatX>(out, inp, n);                                                                  \
    }
FINCH_FOR_EACH_FLOATX(EXPORT)
