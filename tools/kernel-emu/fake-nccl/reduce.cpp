// The fake NCCL's element types and reductions (see README.md, "Determinism"): every rank folds the
// contributions in rank order (rank 0's value, then rank 1's, ...), so every rank computes the same
// bits, whatever the number of ranks or the chunking. float32 and float64 add, multiply and compare
// in their own precision; float16 and bfloat16 are widened to float, folded in float and rounded to
// nearest-even once at the end (NCCL itself rounds to the type after every hop of its ring, in an
// order that is not fixed: bit equality with real NCCL is not a goal). Integers wrap. ncclAvg is the
// sum divided by the number of ranks once at the end (NCCL multiplies each float input by 1/n
// first; the two agree when n is a power of two). Max and min propagate NaN (the first one, in rank
// order) and keep the first of equal values (so max(-0, +0) is rank 0's).
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>

#include "fake_nccl.h"

namespace fnccl {

// ---- conversions ----------------------------------------------------------------------------------
float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        const float f = (float)man * 0x1p-24f;  // zero or subnormal: exact
        return sign ? -f : f;
    }
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);  // inf, NaN (payload kept)
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | ((x >> 13) & 0x3ff));  // NaN: quiet, payload's top bits
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // >= 65520 (or inf): rounds to inf
    if (x < 0x38800000u) {
        // Below half's smallest normal (2^-14): a multiple of 2^-24. Scaling by 2^24 is exact and
        // nearbyintf rounds to nearest-even (the default rounding mode); 1024 is the smallest normal.
        float a;
        memcpy(&a, &x, 4);
        return (uint16_t)(sign | (uint16_t)nearbyintf(a * 0x1p24f));
    }
    // Normal: round the 13 dropped bits to nearest-even; a carry moves into the exponent, as it should.
    x += 0xfffu + ((x >> 13) & 1);
    return (uint16_t)(sign | ((x - (112u << 23)) >> 13));
}
float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
uint16_t float_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // NaN stays a (quiet) NaN
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

// ---- the types ----------------------------------------------------------------------------------------
size_t type_size(int dtype) {
    switch (dtype) {
        case ncclInt8: case ncclUint8: return 1;
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;  // unknown, and the fp8 types (not emulated)
    }
}
namespace {
char g_type_buf[32];  // type_name of an unknown type (messages only)
}
const char* type_name(int dtype) {
    switch (dtype) {
        case ncclInt8: return "int8";
        case ncclUint8: return "uint8";
        case ncclInt32: return "int32";
        case ncclUint32: return "uint32";
        case ncclInt64: return "int64";
        case ncclUint64: return "uint64";
        case ncclFloat16: return "float16";
        case ncclFloat32: return "float32";
        case ncclFloat64: return "float64";
        case ncclBfloat16: return "bfloat16";
        case ncclFloat8e4m3: return "float8e4m3";
        case ncclFloat8e5m2: return "float8e5m2";
        default: snprintf(g_type_buf, sizeof g_type_buf, "type %d", dtype); return g_type_buf;
    }
}
const char* op_name(int op) {
    switch (op) {
        case ncclSum: return "sum";
        case ncclProd: return "prod";
        case ncclMax: return "max";
        case ncclMin: return "min";
        case ncclAvg: return "avg";
        default: return "op?";
    }
}

namespace {
// Storage type S, arithmetic type A, and the conversions between them.
template <class S, class A>
struct Plain {
    typedef S Storage;
    typedef A Acc;
    static A load(S s) { return (A)s; }
    static S store(A a) { return (S)a; }
};
struct Half {
    typedef uint16_t Storage;
    typedef float Acc;
    static float load(uint16_t s) { return half_to_float(s); }
    static uint16_t store(float a) { return float_to_half(a); }
};
struct Bf16 {
    typedef uint16_t Storage;
    typedef float Acc;
    static float load(uint16_t s) { return bf16_to_float(s); }
    static uint16_t store(float a) { return float_to_bf16(a); }
};

template <class A>
A combine(int op, A a, A b) {
    if constexpr (std::is_floating_point_v<A>) {
        switch (op) {
            case ncclProd: return a * b;
            case ncclMax: return isnan(a) ? a : isnan(b) ? b : b > a ? b : a;
            case ncclMin: return isnan(a) ? a : isnan(b) ? b : b < a ? b : a;
            default: return a + b;  // sum, avg
        }
    } else {
        // Wrapping arithmetic, as the GPU's: in the unsigned type (int8 * int8 is promoted to int and
        // cannot overflow it), converted back modulo 2^bits.
        typedef std::make_unsigned_t<A> U;
        switch (op) {
            case ncclProd: return (A)(U)((U)a * (U)b);
            case ncclMax: return b > a ? b : a;
            case ncclMin: return b < a ? b : a;
            default: return (A)(U)((U)a + (U)b);
        }
    }
}

template <class T, int Op>
void reduce_typed(void* out, const unsigned char* const* in, int n, size_t count) {
    typedef typename T::Storage S;
    typedef typename T::Acc A;
    unsigned char* o = (unsigned char*)out;
    for (size_t i = 0; i < count; i++) {
        S s;
        memcpy(&s, in[0] + i * sizeof(S), sizeof(S));
        A a = T::load(s);
        for (int r = 1; r < n; r++) {
            memcpy(&s, in[r] + i * sizeof(S), sizeof(S));
            a = combine<A>(Op, a, T::load(s));
        }
        if (Op == ncclAvg) {
            if constexpr (std::is_floating_point_v<A>) a = a / (A)n;
            else a = (A)(a / (A)n);  // truncates toward zero, after the wrapped sum
        }
        const S r = T::store(a);
        memcpy(o + i * sizeof(S), &r, sizeof(S));
    }
}

template <class T>
void reduce_op(int op, void* out, const unsigned char* const* in, int n, size_t count) {
    switch (op) {
        case ncclSum: return reduce_typed<T, ncclSum>(out, in, n, count);
        case ncclProd: return reduce_typed<T, ncclProd>(out, in, n, count);
        case ncclMax: return reduce_typed<T, ncclMax>(out, in, n, count);
        case ncclMin: return reduce_typed<T, ncclMin>(out, in, n, count);
        case ncclAvg: return reduce_typed<T, ncclAvg>(out, in, n, count);
    }
}
}  // namespace

void reduce(int dtype, int op, void* out, const unsigned char* const* in, int n, size_t count) {
    switch (dtype) {
        case ncclInt8: return reduce_op<Plain<int8_t, int8_t>>(op, out, in, n, count);
        case ncclUint8: return reduce_op<Plain<uint8_t, uint8_t>>(op, out, in, n, count);
        case ncclInt32: return reduce_op<Plain<int32_t, int32_t>>(op, out, in, n, count);
        case ncclUint32: return reduce_op<Plain<uint32_t, uint32_t>>(op, out, in, n, count);
        case ncclInt64: return reduce_op<Plain<int64_t, int64_t>>(op, out, in, n, count);
        case ncclUint64: return reduce_op<Plain<uint64_t, uint64_t>>(op, out, in, n, count);
        case ncclFloat16: return reduce_op<Half>(op, out, in, n, count);
        case ncclFloat32: return reduce_op<Plain<float, float>>(op, out, in, n, count);
        case ncclFloat64: return reduce_op<Plain<double, double>>(op, out, in, n, count);
        case ncclBfloat16: return reduce_op<Bf16>(op, out, in, n, count);
    }
}

}  // namespace fnccl
