// Causal multi-head self-attention, flash style (CPU reference: src/cpu/attention.rs).
//
// Launch configuration (all three kernels: block 128 threads, dynamic shared memory 0 bytes;
// the shared memory noted in brackets is static):
//   attention_forward_{bf16,f32}        grid (ceil(T/16), NH, B), block 128, dynamic smem 0  [32768 B static]
//   attention_backward_dkdv_{bf16,f32}  grid (ceil(T/16), NH, B), block 128, dynamic smem 0  [33024 B static]
//   attention_backward_dq_{bf16,f32}    grid (ceil(T/16), NH, B), block 128, dynamic smem 0  [32768 B static]
// blockIdx.x walks the 16-row tiles with a stride of gridDim.x, so any gridDim.x >= 1 is correct;
// ceil(T/16) gives one tile per block. blockDim.x must be exactly 128.
// Requirements: C % NH == 0, hd = C / NH in 1..=128, T >= 1. Global memory is read and written
// element by element, so no alignment of C, hd or the pointers is assumed.
// The two backward kernels write disjoint parts of dqkv (dk, dv vs dq) and overwrite them (no
// accumulation); they may run in either order. No atomics: every output element has one writer
// and every sum a fixed order, so results are bit-reproducible.
//
// Algorithm (SIMT, all arithmetic in fp32):
//   Each block owns 16 consecutive rows ("own" rows: queries in forward and dq, keys in dkdv).
//   Eight consecutive lanes share an own row; each lane keeps its slice of that row's head dims in
//   registers: dims 32*mm + 4*sub + e (sub = lane % 8, e < 4), so a 32-dim chunk is one float4
//   shared-memory read per lane and the 8 lanes read 128 contiguous bytes. The other operand is
//   streamed through shared memory 32 rows at a time, as fp32 with a fixed row stride of 128
//   floats, zero-filled past hd and past T. A score is a per-lane partial dot product summed over
//   the 8 lanes by an xor butterfly, which leaves the same bits in all 8 lanes, so every lane of a
//   group holds the same scores and probabilities.
//   forward: per key tile, scores -> online softmax (running max m and sum l) -> O = O*alpha + P·V;
//            at the end out = O / l and lse = m + log(l).
//   dq:      per key tile, for j <= i: P = exp(s - lse_i), dS = P (dO_i·v_j - D_i) scale,
//            dq_i += dS k_j.
//   dkdv:    per query tile, for i >= j: the same P and dS, dv_j += P dO_i, dk_j += dS q_i.
//   D_i = dO_i · O_i is recomputed where needed (one dot product of two hd-vectors per row).
//   Only tiles with at least one pair j <= i are visited, and within the diagonal tile the
//   streamed rows that are masked for all own rows are skipped.
//   Registers hold 64 (forward), 48 (dq) or 64 (dkdv) floats of per-row state per lane; 4 lanes
//   per row would double that and push ptxas to spill at the 3-blocks-per-SM cap.
#include "common.cuh"

#define ATT_THREADS 128                             // = ATT_OWN * ATT_LANES
constexpr int ATT_OWN = 16;                         // own rows per block
constexpr int ATT_LANES = 8;                        // lanes sharing one own row
constexpr int ATT_STREAM = 32;                      // rows per streamed shared-memory tile
constexpr int ATT_HD_MAX = 128;                     // largest supported head dim; smem row stride
constexpr int ATT_CHUNK = 4 * ATT_LANES;            // head dims per chunk: 8 lanes x 4 dims
constexpr int ATT_NCHUNK = ATT_HD_MAX / ATT_CHUNK;  // 4 chunks at most
constexpr int ATT_SLICE = ATT_HD_MAX / ATT_LANES;   // 16 registers per lane per own-row vector
constexpr int ATT_RU = 4;                           // streamed rows handled together (independent chains)
static_assert(ATT_OWN * ATT_LANES == ATT_THREADS, "one group of 8 lanes per own row");
static_assert(ATT_STREAM % ATT_OWN == 0, "own tiles never straddle a streamed tile");
static_assert(ATT_OWN % ATT_RU == 0 && ATT_STREAM % ATT_RU == 0, "row groups never run past a tile");

// Sum over the 8 lanes of a group (lanes 8g..8g+7). The butterfly adds the same pairs in every
// lane (fp addition is commutative), so all 8 lanes end with the same bits. All 32 lanes must call it.
__device__ __forceinline__ float group_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    return v;
}

// This lane's slice of one head row (hd elements at `row`) into registers; zero where d >= hd
// or where the row is past T (`valid` false: `row` is then not read).
template <typename floatX>
__device__ __forceinline__ void load_slice(float (&x)[ATT_SLICE], const floatX* row, bool valid, int hd, int sub) {
#pragma unroll
    for (int mm = 0; mm < ATT_NCHUNK; ++mm) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = mm * ATT_CHUNK + sub * 4 + e;
            x[mm * 4 + e] = (valid && d < hd) ? to_float(row[d]) : 0.0f;
        }
    }
}

// Writes this lane's slice times `mul` to the head row at `row` (dims < hd only).
template <typename floatX>
__device__ __forceinline__ void store_slice(floatX* row, const float (&x)[ATT_SLICE], float mul, int hd, int sub) {
#pragma unroll
    for (int mm = 0; mm < ATT_NCHUNK; ++mm) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = mm * ATT_CHUNK + sub * 4 + e;
            if (d < hd) row[d] = from_float<floatX>(x[mm * 4 + e] * mul);
        }
    }
}

// a · b over one head row in global memory (dims < hd), summed over the group; 0 when !valid
// (a and b are then not read). Used for D = dO · O. All 32 lanes must call it.
template <typename floatX>
__device__ __forceinline__ float row_dot_global(const floatX* a, const floatX* b, bool valid, int hd, int sub) {
    float part = 0.0f;
#pragma unroll
    for (int mm = 0; mm < ATT_NCHUNK; ++mm) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = mm * ATT_CHUNK + sub * 4 + e;
            if (valid && d < hd) part += to_float(a[d]) * to_float(b[d]);
        }
    }
    return group_sum(part);
}

// This lane's partial dot product of its register slice with a shared-memory row, over the first
// nc chunks (the smem row is zero from hd up to 32*nc, and so is the slice).
__device__ __forceinline__ float dot_slice(const float (&x)[ATT_SLICE], const float* srow, int nc, int sub) {
    float acc = 0.0f;
#pragma unroll
    for (int mm = 0; mm < ATT_NCHUNK; ++mm) {
        if (mm < nc) {
            const float4 v = *reinterpret_cast<const float4*>(srow + mm * ATT_CHUNK + sub * 4);
            acc += x[mm * 4 + 0] * v.x;
            acc += x[mm * 4 + 1] * v.y;
            acc += x[mm * 4 + 2] * v.z;
            acc += x[mm * 4 + 3] * v.w;
        }
    }
    return acc;
}

// x += a * (this lane's part of a shared-memory row), first nc chunks.
__device__ __forceinline__ void axpy_slice(float (&x)[ATT_SLICE], float a, const float* srow, int nc, int sub) {
#pragma unroll
    for (int mm = 0; mm < ATT_NCHUNK; ++mm) {
        if (mm < nc) {
            const float4 v = *reinterpret_cast<const float4*>(srow + mm * ATT_CHUNK + sub * 4);
            x[mm * 4 + 0] += a * v.x;
            x[mm * 4 + 1] += a * v.y;
            x[mm * 4 + 2] += a * v.z;
            x[mm * 4 + 3] += a * v.w;
        }
    }
}

// dst[r][d] = src[(row0 + r) * stride + d] as float, for r < 32 and d < hdp (hdp = 32 * nc):
// zero where row0 + r >= T or d >= hd, so every element a float4 read can touch is written.
// Callers synchronise before (nobody still reads dst) and after (dst visible to all).
template <typename floatX>
__device__ __forceinline__ void load_tile(float (*dst)[ATT_HD_MAX], const floatX* src, size_t stride, int row0, int T,
                                          int hd, int hdp) {
    for (int idx = threadIdx.x; idx < ATT_STREAM * hdp; idx += ATT_THREADS) {
        const int r = idx / hdp, d = idx - r * hdp;
        const int t = row0 + r;
        dst[r][d] = (t < T && d < hd) ? to_float(src[(size_t)t * stride + d]) : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward: out (B,T,C) and lse (B,NH,T) from qkv (B,T,3C). Each block owns 16 queries.
template <typename floatX>
__device__ __forceinline__ void attention_forward_impl(floatX* out, float* lse, const floatX* qkv, int T, int C,
                                                       int NH) {
    __shared__ __align__(16) float k_s[ATT_STREAM][ATT_HD_MAX];
    __shared__ __align__(16) float v_s[ATT_STREAM][ATT_HD_MAX];
    const int h = blockIdx.y, b = blockIdx.z;
    const int hd = C / NH, nc = (hd + ATT_CHUNK - 1) / ATT_CHUNK, hdp = nc * ATT_CHUNK;
    const float scale = 1.0f / sqrtf((float)hd);  // IEEE sqrt and divide, as the CPU's 1/sqrt(hd)
    const int row = threadIdx.x / ATT_LANES, sub = threadIdx.x % ATT_LANES;
    const size_t C3 = 3 * (size_t)C;
    const floatX* qkv_bh = qkv + (size_t)b * T * C3 + (size_t)h * hd;  // position t, part p: + t*C3 + p*C
    const int ntiles = (T + ATT_OWN - 1) / ATT_OWN;

    for (int n = blockIdx.x; n < ntiles; n += gridDim.x) {
        const int q0 = (ntiles - 1 - n) * ATT_OWN;  // the longest (last) query tiles start first
        const int qend = min(T, q0 + ATT_OWN);      // real own rows are q0..qend-1
        const int i = q0 + row;
        const bool valid = i < T;  // a row past T computes harmless finite values and writes nothing
        float q[ATT_SLICE], o[ATT_SLICE];
        load_slice(q, valid ? qkv_bh + (size_t)i * C3 : qkv_bh, valid, hd, sub);
#pragma unroll
        for (int x = 0; x < ATT_SLICE; ++x) o[x] = 0.0f;
        float m_run = -INFINITY, l_run = 0.0f;

        // Key tiles up to the one holding key qend-1; later ones are fully masked. Every visited
        // tile starts at j0 <= q0 (16 divides 32), so each own row has an unmasked key in it.
        for (int j0 = 0; j0 < qend; j0 += ATT_STREAM) {
            __syncthreads();  // everyone is done reading the previous k_s / v_s
            load_tile(k_s, qkv_bh + C, C3, j0, T, hd, hdp);
            load_tile(v_s, qkv_bh + 2 * (size_t)C, C3, j0, T, hd, hdp);
            __syncthreads();

            const int cend = min(ATT_STREAM, qend - j0);  // keys j0+cend.. are masked for all own rows
            float s[ATT_STREAM];
            float m_tile = -INFINITY;
#pragma unroll
            for (int c = 0; c < ATT_STREAM; ++c) {
                s[c] = -INFINITY;
                if (c < cend) {  // uniform over the block, so the shuffles see all lanes
                    const float dot = group_sum(dot_slice(q, k_s[c], nc, sub));
                    if (j0 + c <= i) s[c] = dot * scale;  // causal: key j allowed iff j <= i
                }
                m_tile = fmaxf(m_tile, s[c]);
            }
            const float m_new = fmaxf(m_run, m_tile);
            // A row with nothing unmasked yet keeps m = -inf: subtract 0 then, never -inf - -inf.
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = expf(m_run - base);  // rescales the old l and O; 0 on the first tile
            float l_tile = 0.0f;
#pragma unroll
            for (int c = 0; c < ATT_STREAM; ++c) {
                s[c] = expf(s[c] - base);  // masked: exp(-inf) = 0
                l_tile += s[c];
            }
            l_run = l_run * alpha + l_tile;
#pragma unroll
            for (int x = 0; x < ATT_SLICE; ++x) o[x] *= alpha;
#pragma unroll
            for (int c = 0; c < ATT_STREAM; ++c)
                if (c < cend) axpy_slice(o, s[c], v_s[c], nc, sub);
            m_run = m_new;
        }

        if (valid) {  // l_run >= 1 here: the row's largest score contributes exp(0)
            store_slice(out + ((size_t)b * T + i) * C + (size_t)h * hd, o, 1.0f / l_run, hd, sub);
            if (sub == 0) lse[((size_t)b * NH + h) * T + i] = m_run + logf(l_run);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dk and dv: each block owns 16 keys and loops over the query tiles at or after them.
template <typename floatX>
__device__ __forceinline__ void attention_backward_dkdv_impl(floatX* dqkv, const floatX* dout, const floatX* qkv,
                                                             const floatX* out, const float* lse, int T, int C,
                                                             int NH) {
    __shared__ __align__(16) float q_s[ATT_STREAM][ATT_HD_MAX];
    __shared__ __align__(16) float do_s[ATT_STREAM][ATT_HD_MAX];
    __shared__ float lse_s[ATT_STREAM];
    __shared__ float d_s[ATT_STREAM];
    const int h = blockIdx.y, b = blockIdx.z;
    const int hd = C / NH, nc = (hd + ATT_CHUNK - 1) / ATT_CHUNK, hdp = nc * ATT_CHUNK;
    const float scale = 1.0f / sqrtf((float)hd);
    const int row = threadIdx.x / ATT_LANES, sub = threadIdx.x % ATT_LANES;
    const size_t C3 = 3 * (size_t)C;
    const size_t hoff = (size_t)h * hd;
    const floatX* qkv_bh = qkv + (size_t)b * T * C3 + hoff;
    const floatX* dout_bh = dout + (size_t)b * T * C + hoff;
    const floatX* out_bh = out + (size_t)b * T * C + hoff;
    const float* lse_bh = lse + ((size_t)b * NH + h) * T;
    floatX* dqkv_bh = dqkv + (size_t)b * T * C3 + hoff;
    const int ntiles = (T + ATT_OWN - 1) / ATT_OWN;

    for (int n = blockIdx.x; n < ntiles; n += gridDim.x) {  // low key tiles (most work) first
        const int k0 = n * ATT_OWN;
        const int j = k0 + row;
        const bool valid = j < T;  // a key past T is zero, masked for every real query, never written
        float k[ATT_SLICE], v[ATT_SLICE], dk[ATT_SLICE], dv[ATT_SLICE];
        load_slice(k, valid ? qkv_bh + (size_t)j * C3 + C : qkv_bh, valid, hd, sub);
        load_slice(v, valid ? qkv_bh + (size_t)j * C3 + 2 * (size_t)C : qkv_bh, valid, hd, sub);
#pragma unroll
        for (int x = 0; x < ATT_SLICE; ++x) dk[x] = dv[x] = 0.0f;

        // Query tiles from the one holding query k0 (earlier queries i < k0 <= j are all masked).
        for (int i0 = k0 - k0 % ATT_STREAM; i0 < T; i0 += ATT_STREAM) {
            __syncthreads();  // everyone is done reading the previous q_s / do_s / lse_s / d_s
            load_tile(q_s, qkv_bh, C3, i0, T, hd, hdp);
            load_tile(do_s, dout_bh, (size_t)C, i0, T, hd, hdp);
            // D and lse of the 32 streamed rows, two per group (lane 0 of the group stores). A row
            // past T gets D = 0 and lse = +inf, so its P = exp(-inf) = 0 and it adds nothing.
            for (int r = row; r < ATT_STREAM; r += ATT_OWN) {  // same trip count in every lane
                const int i = i0 + r;
                const bool ok = i < T;
                const size_t off = ok ? (size_t)i * C : 0;
                const float D = row_dot_global(dout_bh + off, out_bh + off, ok, hd, sub);
                if (sub == 0) {
                    d_s[r] = D;
                    lse_s[r] = ok ? lse_bh[i] : INFINITY;
                }
            }
            __syncthreads();

            // In the first tile, rows below k0 - i0 (0 or 16) are masked for all own keys; rows from
            // T - i0 on are past T (the last group of 4 may still include some: zero rows, P = 0).
            const int rstart = max(0, k0 - i0), rend = min(ATT_STREAM, T - i0);
            for (int r0 = rstart; r0 < rend; r0 += ATT_RU) {
                float sp[ATT_RU], dpp[ATT_RU];
#pragma unroll
                for (int u = 0; u < ATT_RU; ++u) {
                    sp[u] = dot_slice(k, q_s[r0 + u], nc, sub);
                    dpp[u] = dot_slice(v, do_s[r0 + u], nc, sub);
                }
#pragma unroll
                for (int u = 0; u < ATT_RU; ++u) {
                    const int i = i0 + r0 + u;
                    const float s = group_sum(sp[u]) * scale;
                    const float dp = group_sum(dpp[u]);
                    const float p = (j <= i) ? expf(s - lse_s[r0 + u]) : 0.0f;  // causal: j <= i
                    const float ds = p * (dp - d_s[r0 + u]) * scale;
                    axpy_slice(dv, p, do_s[r0 + u], nc, sub);
                    axpy_slice(dk, ds, q_s[r0 + u], nc, sub);
                }
            }
        }

        if (valid) {
            store_slice(dqkv_bh + (size_t)j * C3 + C, dk, 1.0f, hd, sub);
            store_slice(dqkv_bh + (size_t)j * C3 + 2 * (size_t)C, dv, 1.0f, hd, sub);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dq: each block owns 16 queries and loops over the key tiles at or before them.
template <typename floatX>
__device__ __forceinline__ void attention_backward_dq_impl(floatX* dqkv, const floatX* dout, const floatX* qkv,
                                                           const floatX* out, const float* lse, int T, int C,
                                                           int NH) {
    __shared__ __align__(16) float k_s[ATT_STREAM][ATT_HD_MAX];
    __shared__ __align__(16) float v_s[ATT_STREAM][ATT_HD_MAX];
    const int h = blockIdx.y, b = blockIdx.z;
    const int hd = C / NH, nc = (hd + ATT_CHUNK - 1) / ATT_CHUNK, hdp = nc * ATT_CHUNK;
    const float scale = 1.0f / sqrtf((float)hd);
    const int row = threadIdx.x / ATT_LANES, sub = threadIdx.x % ATT_LANES;
    const size_t C3 = 3 * (size_t)C;
    const size_t hoff = (size_t)h * hd;
    const floatX* qkv_bh = qkv + (size_t)b * T * C3 + hoff;
    const floatX* dout_bh = dout + (size_t)b * T * C + hoff;
    const floatX* out_bh = out + (size_t)b * T * C + hoff;
    const float* lse_bh = lse + ((size_t)b * NH + h) * T;
    floatX* dqkv_bh = dqkv + (size_t)b * T * C3 + hoff;
    const int ntiles = (T + ATT_OWN - 1) / ATT_OWN;

    for (int n = blockIdx.x; n < ntiles; n += gridDim.x) {
        const int q0 = (ntiles - 1 - n) * ATT_OWN;  // the longest (last) query tiles start first
        const int qend = min(T, q0 + ATT_OWN);
        const int i = q0 + row;
        const bool valid = i < T;
        const size_t off = valid ? (size_t)i * C : 0;
        float q[ATT_SLICE], dO[ATT_SLICE], dq[ATT_SLICE];
        load_slice(q, valid ? qkv_bh + (size_t)i * C3 : qkv_bh, valid, hd, sub);
        load_slice(dO, dout_bh + off, valid, hd, sub);
        const float D = row_dot_global(dout_bh + off, out_bh + off, valid, hd, sub);
        const float lse_i = valid ? lse_bh[i] : INFINITY;  // a row past T: P = 0 everywhere
#pragma unroll
        for (int x = 0; x < ATT_SLICE; ++x) dq[x] = 0.0f;

        // Key tiles up to the one holding key qend-1; later ones are fully masked.
        for (int j0 = 0; j0 < qend; j0 += ATT_STREAM) {
            __syncthreads();  // everyone is done reading the previous k_s / v_s
            load_tile(k_s, qkv_bh + C, C3, j0, T, hd, hdp);
            load_tile(v_s, qkv_bh + 2 * (size_t)C, C3, j0, T, hd, hdp);
            __syncthreads();

            // Keys from qend on are masked for all own rows (j >= qend > i); the last group of 4
            // may still include some (masked: P = 0).
            const int cend = min(ATT_STREAM, qend - j0);
            for (int c0 = 0; c0 < cend; c0 += ATT_RU) {
                float sp[ATT_RU], dpp[ATT_RU];
#pragma unroll
                for (int u = 0; u < ATT_RU; ++u) {
                    sp[u] = dot_slice(q, k_s[c0 + u], nc, sub);
                    dpp[u] = dot_slice(dO, v_s[c0 + u], nc, sub);
                }
#pragma unroll
                for (int u = 0; u < ATT_RU; ++u) {
                    const int j = j0 + c0 + u;
                    const float s = group_sum(sp[u]) * scale;
                    const float dp = group_sum(dpp[u]);
                    const float p = (j <= i) ? expf(s - lse_i) : 0.0f;  // causal: j <= i
                    const float ds = p * (dp - D) * scale;
                    axpy_slice(dq, ds, k_s[c0 + u], nc, sub);
                }
            }
        }

        if (valid) store_slice(dqkv_bh + (size_t)i * C3, dq, 1.0f, hd, sub);
    }
}

// B is implied by gridDim.z; it stays in the signatures for the host's sake.
#define EXPORT_ATTENTION(suffix, floatX)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                          \
        attention_forward_##suffix(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH) {          \
        (void)B;                                                                                                       \
        attention_forward_impl<floatX>(out, lse, qkv, T, C, NH);                                                       \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_dkdv_##suffix(                        \
        floatX* dqkv, const floatX* dout, const floatX* qkv, const floatX* out, const float* lse, int B, int T, int C,   \
        int NH) {                                                                                                      \
        (void)B;                                                                                                       \
        attention_backward_dkdv_impl<floatX>(dqkv, dout, qkv, out, lse, T, C, NH);                                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_dq_##suffix(                          \
        floatX* dqkv, const floatX* dout, const floatX* qkv, const floatX* out, const float* lse, int B, int T, int C,   \
        int NH) {                                                                                                      \
        (void)B;                                                                                                       \
        attention_backward_dq_impl<floatX>(dqkv, dout, qkv, out, lse, T, C, NH);                                       \
    }
FINCH_FOR_EACH_FLOATX(EXPORT_ATTENTION)
