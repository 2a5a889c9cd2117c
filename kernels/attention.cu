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
#include "tensorcore.cuh"

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
EXPORT_ATTENTION(f32, float)  // bf16 runs the tensor-core kernels below

// =============================================================================================
// bf16 on tensor cores: the FlashAttention-2 algorithm (Dao, 2023) on mma.sync m16n8k16.
//
// Head rows are padded with zeros to HD = 64 or 128 (the template parameter): any hd <= 128 runs,
// GPT-2's 64 without waste. A block has 4 warps; each warp owns 16 rows (queries in the forward
// and dq kernels, keys in dkdv) and keeps its scores, probabilities and output in mma fragments
// (registers). Shared tiles are [rows][HD] bf16, swizzled (tc::swizzle), loaded by cp.async
// (zero-filled past T and past hd; element by element when hd or C is not a multiple of 8) and
// double-buffered, so the next tile's copy overlaps this tile's arithmetic. Scores are scaled by
// log2(e)/sqrt(hd) and exponentiated with exp2. Causal: tiles wholly above the diagonal are never
// visited; the mask is applied on the diagonal tile and past T only. No atomics: the backward
// computes dk, dv (one block per key tile) and dq (one block per query tile) in separate kernels,
// each output with one writer and each sum in a fixed order, so results are bit-reproducible.
//
// Launch configuration (src/cuda/ops.rs), HD in {64, 128}, block 128 threads:
//   flash_forward_hd{HD}_bf16        grid (ceil(T/64), NH, B), dynamic smem 5·64·HD·2 B
//   attention_d_bf16                 grid ceil(B·NH·T/128), block 128, smem 0
//   flash_backward_dkdv_hd{HD}_bf16  grid (ceil(T/64), NH, B), dynamic smem (2·64 + 4·32)·HD·2 + 4·32·4 B
//   flash_backward_dq_hd{HD}_bf16    grid (ceil(T/64), NH, B), dynamic smem 6·64·HD·2 B

constexpr int FA_THREADS = 128;
constexpr int FA_ROWS = 64;  // own rows per block: 16 per warp
constexpr int FA_TILE = 64;  // streamed rows per tile (keys in forward and dq)
constexpr int FA_QTILE = 32; // streamed query rows per tile in dkdv (registers hold two products)
constexpr float FA_LOG2E = 1.4426950408889634f;

// Issues the loads of `rows` head rows r0.. of a head slice (`base`: row 0 at element 0, rows
// `stride` apart, hd elements) into the [rows][HD] tile; rows >= T and columns >= hd are zero.
template <int HD, int ROWS>
__device__ __forceinline__ void fa_load(bf16* tile, const bf16* base, long long stride, int r0, int T, int hd,
                                        bool aligned) {
    for (int idx = threadIdx.x; idx < ROWS * HD / 8; idx += FA_THREADS)
        tc::load_chunk<HD>(tile, idx, base, stride, r0, 0, T, hd, aligned);
}

// The A fragment (16 rows × 16 k) of rows row0.. of a [*][HD] tile at columns k0.. (k contiguous).
template <int HD>
__device__ __forceinline__ void fa_a_frag(uint32_t (&a)[4], const bf16* tile, int row0, int k0, int lane) {
    tc::ldmatrix<4>(a, tile + tc::swizzle<HD>(row0 + lane % 16, k0 + (lane / 16) * 8));
}

// B fragments of two n8 tiles when B[k][n] = tile[n][k] (k contiguous): n rows n0..n0+15, k0..+15.
template <int HD>
__device__ __forceinline__ void fa_b_kc(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* tile, int n0, int k0, int lane) {
    uint32_t r[4];
    tc::ldmatrix<4>(r, tile + tc::swizzle<HD>(n0 + (lane / 16) * 8 + lane % 8, k0 + ((lane / 8) % 2) * 8));
    b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// B fragments of two n8 tiles when B[k][n] = tile[k][n] (n contiguous): k rows k0..k0+15, n0..+15.
template <int HD>
__device__ __forceinline__ void fa_b_nc(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* tile, int k0, int n0, int lane) {
    uint32_t r[4];
    tc::ldmatrix_trans<4>(r, tile + tc::swizzle<HD>(k0 + ((lane / 8) % 2) * 8 + lane % 8, n0 + (lane / 16) * 8));
    b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// acc (16 × 8·NT) += A-rows of `a_tile` (rows row0.., all HD columns) · B, where B[k][n] =
// b_tile[n][k]: the product of row-major head rows with other head rows transposed (Q·Kᵀ).
template <int HD, int NT>
__device__ __forceinline__ void fa_rows_times_rows_t(float (&acc)[NT][4], const bf16* a_tile, int row0,
                                                     const bf16* b_tile, int lane) {
#pragma unroll
    for (int k = 0; k < HD; k += 16) {
        uint32_t a[4];
        fa_a_frag<HD>(a, a_tile, row0, k, lane);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            uint32_t b0[2], b1[2];
            fa_b_kc<HD>(b0, b1, b_tile, j * 8, k, lane);
            tc::mma_m16n8k16_bf16(acc[j], a, b0);
            tc::mma_m16n8k16_bf16(acc[j + 1], a, b1);
        }
    }
}

// acc (16 × HD) += P (16 × 16·KT, in C fragments: 2·KT n8 tiles) · b_tile rows (16·KT rows × HD):
// the C fragments of two adjacent n8 tiles are, as bf16, the A fragment of one k16 step, so P
// never leaves registers.
template <int HD, int KT>
__device__ __forceinline__ void fa_p_times_rows(float (&acc)[HD / 8][4], const float (&p)[2 * KT][4],
                                                const bf16* b_tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        const uint32_t a[4] = {tc::pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), tc::pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                               tc::pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               tc::pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < HD / 8; n += 2) {
            uint32_t b0[2], b1[2];
            fa_b_nc<HD>(b0, b1, b_tile, kk * 16, n * 8, lane);
            tc::mma_m16n8k16_bf16(acc[n], a, b0);
            tc::mma_m16n8k16_bf16(acc[n + 1], a, b1);
        }
    }
}

// Writes a warp's 16 × HD fragment rows (`row0` + g, + g+8) times the per-row factor to a head
// slice (`base`, rows `stride` apart), columns < hd, rows < T.
template <int HD>
__device__ __forceinline__ void fa_store(bf16* base, long long stride, const float (&acc)[HD / 8][4], int row0,
                                         const float (&mul)[2], int T, int hd, int lane) {
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = row0 + g + 8 * half;
        if (r >= T) continue;
        bf16* row = base + r * stride;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            const int d = n * 8 + 2 * q;
            if (d < hd) row[d] = __float2bfloat16_rn(acc[n][2 * half] * mul[half]);
            if (d + 1 < hd) row[d + 1] = __float2bfloat16_rn(acc[n][2 * half + 1] * mul[half]);
        }
    }
}

template <typename T>
__device__ __forceinline__ bool fa_aligned(const T* p, long long stride, int hd) {
    return (uintptr_t)p % 16 == 0 && stride % 8 == 0 && hd % 8 == 0;
}

// Forward: out (B,T,C) and lse (B,NH,T) from qkv (B,T,3C); a block owns 64 queries.
template <int HD>
__device__ void flash_forward(bf16* out, float* lse, const bf16* qkv, int T, int C, int NH) {
    FINCH_DYNAMIC_SMEM(bf16, smem);
    bf16* q_s = smem;                 // [64][HD]
    bf16* k_s = q_s + FA_ROWS * HD;   // [2][64][HD]
    bf16* v_s = k_s + 2 * FA_TILE * HD;  // [2][64][HD]
    const int h = blockIdx.y, b = blockIdx.z, hd = C / NH;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q = lane % 4;
    const long long C3 = 3LL * C;
    const bf16* qb = qkv + (long long)b * T * C3 + (long long)h * hd;
    const bool aligned = fa_aligned(qb, C3, hd) && C % 8 == 0;
    const float scale = FA_LOG2E / sqrtf((float)hd);
    const int qt = gridDim.x - 1 - blockIdx.x;  // the longest (last) query tiles start first
    const int q0 = qt * FA_ROWS, row0 = warp * 16;
    const int n_kt = qt + 1;  // key tiles 0..qt: the causal ones

    fa_load<HD, FA_ROWS>(q_s, qb, C3, q0, T, hd, aligned);
    fa_load<HD, FA_TILE>(k_s, qb + C, C3, 0, T, hd, aligned);
    fa_load<HD, FA_TILE>(v_s, qb + 2 * C, C3, 0, T, hd, aligned);
    tc::cp_async_commit();

    float o[HD / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g+8: running max, this lane's sum
    for (int kt = 0; kt < n_kt; kt++) {
        __syncthreads();  // every warp is done with the buffers the next load overwrites
        if (kt + 1 < n_kt) {
            const int nb = (kt + 1) % 2;
            fa_load<HD, FA_TILE>(k_s + nb * FA_TILE * HD, qb + C, C3, (kt + 1) * FA_TILE, T, hd, aligned);
            fa_load<HD, FA_TILE>(v_s + nb * FA_TILE * HD, qb + 2 * C, C3, (kt + 1) * FA_TILE, T, hd, aligned);
        }
        tc::cp_async_commit();
        tc::cp_async_wait<1>();  // tile kt (and Q) landed; tile kt+1 may be in flight
        __syncthreads();
        const bf16* kb = k_s + (kt % 2) * FA_TILE * HD;
        const bf16* vb = v_s + (kt % 2) * FA_TILE * HD;

        float s[FA_TILE / 8][4] = {};
        fa_rows_times_rows_t<HD, FA_TILE / 8>(s, q_s, row0, kb, lane);
        // Scale, and mask keys after the query (the diagonal tile) and past T.
        const bool edge = kt == qt || (kt + 1) * FA_TILE > T;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < FA_TILE / 8; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int i = q0 + row0 + g + 8 * (v / 2), key = kt * FA_TILE + j * 8 + 2 * q + v % 2;
                float x = s[j][v] * scale;
                if (edge && (key > i || key >= T)) x = -INFINITY;
                s[j][v] = x;
                mx[v / 2] = fmaxf(mx[v / 2], x);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));  // the 4 lanes of a row agree
            const float m_new = fmaxf(m[r], mx[r]);
            // A row with nothing unmasked yet keeps m = -inf: subtract 0 then, never -inf - -inf.
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            alpha[r] = exp2f(m[r] - base);  // 0 on the first tile
            m[r] = m_new;
            mx[r] = base;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < FA_TILE / 8; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) {
                s[j][v] = exp2f(s[j][v] - mx[v / 2]);  // masked: exp2(-inf) = 0
                l[v / 2] += s[j][v];
            }
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
#pragma unroll
            for (int v = 0; v < 4; v++) o[n][v] *= alpha[v / 2];
        fa_p_times_rows<HD, FA_TILE / 16>(o, s, vb, lane);
    }
    tc::cp_async_wait<0>();

    // The 4 lanes of a row hold parts of its sum; every real row has l >= 1 (its max gives exp2(0)).
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.0f / l[r];
        const int i = q0 + row0 + g + 8 * r;
        if (q == 0 && i < T) lse[((long long)b * NH + h) * T + i] = (m[r] + log2f(l[r])) / FA_LOG2E;
    }
    fa_store<HD>(out + (long long)b * T * C + (long long)h * hd, C, o, q0 + row0, inv, T, hd, lane);
}

// D (B,NH,T) = rowsum(dout ∘ out) per head row, in fp32: the backward's per-query constant.
__device__ void attention_d(float* d, const bf16* dout, const bf16* out, int B, int T, int C, int NH) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * NH * T) return;
    const int t = idx % T, h = (idx / T) % NH, b = idx / ((long long)T * NH), hd = C / NH;
    const long long off = ((long long)b * T + t) * C + (long long)h * hd;
    float acc = 0.0f;
    for (int e = 0; e < hd; e++) acc += __bfloat162float(dout[off + e]) * __bfloat162float(out[off + e]);
    d[idx] = acc;
}

// Backward, dk and dv: a block owns 64 keys (16 per warp) and streams the 32-query tiles at or
// after them. Per tile, with the transposed products so the key rows are the fragments' rows:
// Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale − lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q.
template <int HD>
__device__ void flash_backward_dkdv(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dd,
                                    int T, int C, int NH) {
    FINCH_DYNAMIC_SMEM(bf16, smem);
    bf16* k_s = smem;                      // [64][HD]
    bf16* v_s = k_s + FA_ROWS * HD;        // [64][HD]
    bf16* q_s = v_s + FA_ROWS * HD;        // [2][32][HD]
    bf16* do_s = q_s + 2 * FA_QTILE * HD;  // [2][32][HD]
    float* lse_s = reinterpret_cast<float*>(do_s + 2 * FA_QTILE * HD);  // [2][32], in log2 units
    float* d_s = lse_s + 2 * FA_QTILE;                                   // [2][32]
    const int h = blockIdx.y, b = blockIdx.z, hd = C / NH;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q = lane % 4;
    const long long C3 = 3LL * C;
    const bf16* qb = qkv + (long long)b * T * C3 + (long long)h * hd;
    const bf16* dob = dout + (long long)b * T * C + (long long)h * hd;
    const float* lse_b = lse + ((long long)b * NH + h) * T;
    const float* d_b = dd + ((long long)b * NH + h) * T;
    const bool aligned = fa_aligned(qb, C3, hd) && fa_aligned(dob, C, hd) && C % 8 == 0;
    const float scale = 1.0f / sqrtf((float)hd), scale2 = scale * FA_LOG2E;
    const int k0 = blockIdx.x * FA_ROWS, row0 = warp * 16;  // low key tiles (most work) first

    auto load_queries = [&](int buf, int i0) {
        fa_load<HD, FA_QTILE>(q_s + buf * FA_QTILE * HD, qb, C3, i0, T, hd, aligned);
        fa_load<HD, FA_QTILE>(do_s + buf * FA_QTILE * HD, dob, C, i0, T, hd, aligned);
        // lse and D of the tile's queries; past T, lse = +inf makes P = 0.
        for (int r = threadIdx.x; r < FA_QTILE; r += FA_THREADS) {
            const int i = i0 + r;
            lse_s[buf * FA_QTILE + r] = i < T ? lse_b[i] * FA_LOG2E : INFINITY;
            d_s[buf * FA_QTILE + r] = i < T ? d_b[i] : 0.0f;
        }
    };
    fa_load<HD, FA_ROWS>(k_s, qb + C, C3, k0, T, hd, aligned);
    fa_load<HD, FA_ROWS>(v_s, qb + 2 * C, C3, k0, T, hd, aligned);
    load_queries(0, k0);  // queries before k0 are masked for every own key
    tc::cp_async_commit();

    float dk[HD / 8][4] = {}, dv[HD / 8][4] = {};
    const int n_qt = (T - k0 + FA_QTILE - 1) / FA_QTILE;
    for (int it = 0; it < n_qt; it++) {
        const int i0 = k0 + it * FA_QTILE;
        __syncthreads();
        if (it + 1 < n_qt) load_queries((it + 1) % 2, i0 + FA_QTILE);
        tc::cp_async_commit();
        tc::cp_async_wait<1>();
        __syncthreads();
        const bf16* qt_s = q_s + (it % 2) * FA_QTILE * HD;
        const bf16* dot_s = do_s + (it % 2) * FA_QTILE * HD;
        const float* lse_t = lse_s + (it % 2) * FA_QTILE;
        const float* d_t = d_s + (it % 2) * FA_QTILE;

        float p[FA_QTILE / 8][4] = {}, dp[FA_QTILE / 8][4] = {};
        fa_rows_times_rows_t<HD, FA_QTILE / 8>(p, k_s, row0, qt_s, lane);    // Sᵀ = K·Qᵀ
        fa_rows_times_rows_t<HD, FA_QTILE / 8>(dp, v_s, row0, dot_s, lane);  // dPᵀ = V·dOᵀ
        const bool edge = i0 < k0 + FA_ROWS;  // tiles below the block's last key need the mask
#pragma unroll
        for (int j = 0; j < FA_QTILE / 8; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int key = k0 + row0 + g + 8 * (v / 2), c = j * 8 + 2 * q + v % 2, i = i0 + c;
                float pv = exp2f(p[j][v] * scale2 - lse_t[c]);  // a query past T: exp2(-inf) = 0
                if (edge && key > i) pv = 0.0f;                 // causal: key j allowed iff j <= i
                p[j][v] = pv;
                dp[j][v] = pv * (dp[j][v] - d_t[c]);  // dSᵀ, unscaled
            }
        fa_p_times_rows<HD, FA_QTILE / 16>(dv, p, dot_s, lane);  // dV += Pᵀ·dO
        fa_p_times_rows<HD, FA_QTILE / 16>(dk, dp, qt_s, lane);  // dK += dSᵀ·Q
    }
    tc::cp_async_wait<0>();
    const float ones[2] = {1.0f, 1.0f}, scales[2] = {scale, scale};
    bf16* db = dqkv + (long long)b * T * C3 + (long long)h * hd;
    fa_store<HD>(db + C, C3, dk, k0 + row0, scales, T, hd, lane);
    fa_store<HD>(db + 2 * C, C3, dv, k0 + row0, ones, T, hd, lane);
}

// Backward, dq: a block owns 64 queries (16 per warp) and streams the key tiles up to them:
// S = Q·Kᵀ, P = exp2(S·scale − lse), dP = dO·Vᵀ, dS = P∘(dP − D), dQ += dS·K.
template <int HD>
__device__ void flash_backward_dq(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dd,
                                  int T, int C, int NH) {
    FINCH_DYNAMIC_SMEM(bf16, smem);
    bf16* q_s = smem;                     // [64][HD]
    bf16* do_s = q_s + FA_ROWS * HD;      // [64][HD]
    bf16* k_s = do_s + FA_ROWS * HD;      // [2][64][HD]
    bf16* v_s = k_s + 2 * FA_TILE * HD;   // [2][64][HD]
    const int h = blockIdx.y, b = blockIdx.z, hd = C / NH;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q = lane % 4;
    const long long C3 = 3LL * C;
    const bf16* qb = qkv + (long long)b * T * C3 + (long long)h * hd;
    const bf16* dob = dout + (long long)b * T * C + (long long)h * hd;
    const bool aligned = fa_aligned(qb, C3, hd) && fa_aligned(dob, C, hd) && C % 8 == 0;
    const float scale = 1.0f / sqrtf((float)hd), scale2 = scale * FA_LOG2E;
    const int qt = gridDim.x - 1 - blockIdx.x;  // the longest (last) query tiles start first
    const int q0 = qt * FA_ROWS, row0 = warp * 16, n_kt = qt + 1;

    float lse_r[2], d_r[2];  // rows g and g+8 of this warp
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = q0 + row0 + g + 8 * r;
        const long long at = ((long long)b * NH + h) * T + i;
        lse_r[r] = i < T ? lse[at] * FA_LOG2E : INFINITY;  // a row past T: P = 0
        d_r[r] = i < T ? dd[at] : 0.0f;
    }
    fa_load<HD, FA_ROWS>(q_s, qb, C3, q0, T, hd, aligned);
    fa_load<HD, FA_ROWS>(do_s, dob, C, q0, T, hd, aligned);
    fa_load<HD, FA_TILE>(k_s, qb + C, C3, 0, T, hd, aligned);
    fa_load<HD, FA_TILE>(v_s, qb + 2 * C, C3, 0, T, hd, aligned);
    tc::cp_async_commit();

    float dq[HD / 8][4] = {};
    for (int kt = 0; kt < n_kt; kt++) {
        __syncthreads();
        if (kt + 1 < n_kt) {
            const int nb = (kt + 1) % 2;
            fa_load<HD, FA_TILE>(k_s + nb * FA_TILE * HD, qb + C, C3, (kt + 1) * FA_TILE, T, hd, aligned);
            fa_load<HD, FA_TILE>(v_s + nb * FA_TILE * HD, qb + 2 * C, C3, (kt + 1) * FA_TILE, T, hd, aligned);
        }
        tc::cp_async_commit();
        tc::cp_async_wait<1>();
        __syncthreads();
        const bf16* kb = k_s + (kt % 2) * FA_TILE * HD;
        const bf16* vb = v_s + (kt % 2) * FA_TILE * HD;

        float p[FA_TILE / 8][4] = {}, ds[FA_TILE / 8][4] = {};
        fa_rows_times_rows_t<HD, FA_TILE / 8>(p, q_s, row0, kb, lane);    // S = Q·Kᵀ
        fa_rows_times_rows_t<HD, FA_TILE / 8>(ds, do_s, row0, vb, lane);  // dP = dO·Vᵀ
        const bool edge = kt == qt || (kt + 1) * FA_TILE > T;
#pragma unroll
        for (int j = 0; j < FA_TILE / 8; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int i = q0 + row0 + g + 8 * (v / 2), key = kt * FA_TILE + j * 8 + 2 * q + v % 2;
                float pv = exp2f(p[j][v] * scale2 - lse_r[v / 2]);
                if (edge && (key > i || key >= T)) pv = 0.0f;
                ds[j][v] = pv * (ds[j][v] - d_r[v / 2]);
            }
        // dQ += dS·K: K's rows are the k dimension here, read transposed.
        fa_p_times_rows<HD, FA_TILE / 16>(dq, ds, kb, lane);
    }
    tc::cp_async_wait<0>();
    const float scales[2] = {scale, scale};
    fa_store<HD>(dqkv + (long long)b * T * C3 + (long long)h * hd, C3, dq, q0 + row0, scales, T, hd, lane);
}

#define EXPORT_FLASH(HD)                                                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                           \
        flash_forward_hd##HD##_bf16(bf16* out, float* lse, const bf16* qkv, int B, int T, int C, int NH) {             \
        (void)B;                                                                                                       \
        flash_forward<HD>(out, lse, qkv, T, C, NH);                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_backward_dkdv_hd##HD##_bf16(                        \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* d, int B, int T, int C, int NH) { \
        (void)B;                                                                                                       \
        flash_backward_dkdv<HD>(dqkv, dout, qkv, lse, d, T, C, NH);                                                    \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_backward_dq_hd##HD##_bf16(                          \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* d, int B, int T, int C, int NH) { \
        (void)B;                                                                                                       \
        flash_backward_dq<HD>(dqkv, dout, qkv, lse, d, T, C, NH);                                                      \
    }
EXPORT_FLASH(64)
EXPORT_FLASH(128)

extern "C" __global__ void __launch_bounds__(128)
    attention_d_bf16(float* d, const bf16* dout, const bf16* out, int B, int T, int C, int NH) {
    attention_d(d, dout, out, B, T, C, NH);
}
