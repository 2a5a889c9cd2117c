// Tests of the emulator itself: the primitives compute what CUDA's do, and each check in
// cuda_shim.h fires on a kernel that breaks its rule (run in a child process, which must fail
// with the expected message, see h::expect_failure).
#include "cuda_shim.h"
#include "harness.h"

using namespace h;
using bf16 = __nv_bfloat16;

// ---- kernels that are correct ------------------------------------------------------------------

// out[t] = the value of lane (lane ^ m), (lane + d), (lane - d), lane src, for each shuffle kind.
extern "C" __global__ void k_shuffles(float* out) {
    const int t = threadIdx.x, lane = t % 32;
    const float v = 1000.0f * (t / 32) + lane;
    out[4 * t + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 3);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, 7);
}

// D = A·B + C for one 16×16×16 tile per warp, A and B in the given layouts, C loaded and D stored
// row- or column-major.
template <typename LA, typename LB>
__device__ void wmma_tile(float* d, const bf16* a, const bf16* b, const float* c, nvcuda::wmma::layout_t lc) {
    using namespace nvcuda;
    __shared__ __align__(32) bf16 as[4][256], bs[4][256];
    __shared__ __align__(32) float cs[4][256];
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = lane; i < 256; i += 32) as[w][i] = a[256 * w + i], bs[w][i] = b[256 * w + i], cs[w][i] = c[256 * w + i];
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, as[w], 16);
    wmma::load_matrix_sync(fb, bs[w], 16);
    wmma::load_matrix_sync(acc, cs[w], 16, lc);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(cs[w], acc, 16, lc);
    __syncwarp();
    for (int i = lane; i < 256; i += 32) d[256 * w + i] = cs[w][i];
}
extern "C" __global__ void k_wmma_rr(float* d, const bf16* a, const bf16* b, const float* c) {
    wmma_tile<nvcuda::wmma::row_major, nvcuda::wmma::row_major>(d, a, b, c, nvcuda::wmma::mem_row_major);
}
extern "C" __global__ void k_wmma_cc(float* d, const bf16* a, const bf16* b, const float* c) {
    wmma_tile<nvcuda::wmma::col_major, nvcuda::wmma::col_major>(d, a, b, c, nvcuda::wmma::mem_col_major);
}

// Reverses each block's 256 values through shared memory; `barrier` false drops the barrier
// between the writes and the reads.
template <bool barrier>
__device__ void reverse(float* out, const float* in) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = in[blockIdx.x * 256 + t];
    if (barrier) __syncthreads();
    out[blockIdx.x * 256 + t] = s[255 - t];
}
extern "C" __global__ void k_reverse(float* out, const float* in) { reverse<true>(out, in); }
extern "C" __global__ void k_reverse_racy(float* out, const float* in) { reverse<false>(out, in); }

// Reads the neighbouring warp's values, does a few warp collectives, then overwrites its own
// values without a barrier: only a schedule that lets a warp run ahead exposes it.
extern "C" __global__ void k_warp_ahead_racy(float* out) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    float v = s[(t + 32) % 128];
    for (int i = 0; i < 4; i++) v = __shfl_xor_sync(0xffffffffu, v, 0);
    s[t] = -1.0f;  // missing __syncthreads() before this
    out[blockIdx.x * 128 + t] = v;
}

// Block 0 fills shared memory; other blocks read it without writing: they must see NaN.
extern "C" __global__ void k_stale_shared(float* out) {
    __shared__ float s[128];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 128 + threadIdx.x] = s[threadIdx.x];
}

// ---- kernels that break a rule -----------------------------------------------------------------
extern "C" __global__ void k_divergent_syncthreads() {
    if (threadIdx.x < 100) __syncthreads();
}
extern "C" __global__ void k_divergent_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
extern "C" __global__ void k_partial_mask(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (float)threadIdx.x, 1);
}
extern "C" __global__ void k_wmma_bad(int which) {
    using namespace nvcuda;
    __shared__ __align__(128) bf16 t[64][40];
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    if (which == 0) wmma::load_matrix_sync(fa, &t[0][8], 40);              // 16-byte aligned only
    if (which == 1) wmma::load_matrix_sync(fa, &t[0][0], 20);              // ldm not a multiple of 8
    if (which == 2) wmma::load_matrix_sync(fa, &t[16 * (threadIdx.x % 2)][0], 40);  // lanes disagree
}

// ---- the tests ---------------------------------------------------------------------------------
int main() {
    {  // shuffles
        std::vector<float> out(4 * 64, NAN);
        emu::launch("k_shuffles", 1, 64, [&] { k_shuffles(out.data()); });
        bool ok = true;
        for (int t = 0; t < 64; t++) {
            const int lane = t % 32;
            auto val = [&](int l) { return 1000.0f * (t / 32) + l; };
            ok &= out[4 * t + 0] == val(lane ^ 5);
            ok &= out[4 * t + 1] == val(lane + 3 < 32 ? lane + 3 : lane);
            ok &= out[4 * t + 2] == val(lane >= 2 ? lane - 2 : lane);
            ok &= out[4 * t + 3] == val(7);
        }
        Case k("shuffles: xor, down, up, idx");
        k.expect("values", ok);
    }
    for (int layout = 0; layout < 2; layout++) {  // WMMA against a plain product
        Rng r(7);
        std::vector<double> ad, bd, cd;
        auto a = randn<bf16>(4 * 256, r, 1.0, &ad);
        auto b = randn<bf16>(4 * 256, r, 1.0, &bd);
        auto c = randn<float>(4 * 256, r, 1.0, &cd);
        std::vector<float> d(4 * 256, NAN);
        if (layout == 0) emu::launch("k_wmma_rr", 1, 128, [&] { k_wmma_rr(d.data(), a.data(), b.data(), c.data()); });
        else emu::launch("k_wmma_cc", 1, 128, [&] { k_wmma_cc(d.data(), a.data(), b.data(), c.data()); });
        std::vector<double> ref(4 * 256);
        for (int w = 0; w < 4; w++)
            for (int i = 0; i < 16; i++)
                for (int j = 0; j < 16; j++) {
                    // row-major: X[i][j] = x[16i + j]; col-major: X[i][j] = x[16j + i].
                    auto at = [&](const std::vector<double>& x, int r0, int c0) {
                        return layout == 0 ? x[256 * w + 16 * r0 + c0] : x[256 * w + 16 * c0 + r0];
                    };
                    double s = at(cd, i, j);
                    for (int k = 0; k < 16; k++) s += at(ad, i, k) * at(bd, k, j);
                    (layout == 0 ? ref[256 * w + 16 * i + j] : ref[256 * w + 16 * j + i]) = s;
                }
        Case k(layout == 0 ? "wmma 16x16x16 bf16, row-major A, B, C" : "wmma 16x16x16 bf16, col-major A, B, C");
        k.cmp("f32", "D", as_double(d), ref, 1e-6);
    }
    {  // a correct barrier passes under every schedule; a missing one is caught
        Rng r(3);
        auto in = randn<float>(256 * emu::kSchedules, r);
        std::vector<float> out(in.size(), NAN), out2(in.size(), NAN);
        emu::launch("k_reverse", emu::kSchedules, 256, [&] { k_reverse(out.data(), in.data()); });
        emu::launch("k_reverse_racy", emu::kSchedules, 256, [&] { k_reverse_racy(out2.data(), in.data()); });
        bool ok = true, racy_wrong = false;
        for (size_t i = 0; i < in.size(); i++) {
            const float want = in[i / 256 * 256 + 255 - i % 256];
            ok &= out[i] == want;
            racy_wrong |= !(out2[i] == want);
        }
        Case k("a missing __syncthreads (shared write then read)");
        k.expect("with barrier: right", ok);
        k.expect("without: caught", racy_wrong);
    }
    {
        std::vector<float> out(128 * emu::kSchedules, NAN);
        emu::launch("k_warp_ahead_racy", emu::kSchedules, 128, [&] { k_warp_ahead_racy(out.data()); });
        bool wrong = false;
        for (size_t i = 0; i < out.size(); i++) wrong |= out[i] != (float)((i % 128 + 32) % 128);
        Case k("a missing __syncthreads that only a warp running ahead exposes");
        k.expect("caught", wrong);
    }
    {
        std::vector<float> out(128 * 3, 0.0f);
        emu::launch("k_stale_shared", 3, 128, [&] { k_stale_shared(out.data()); });
        bool ok = true;
        for (size_t i = 0; i < out.size(); i++) ok &= i < 128 ? out[i] == 1.0f : std::isnan(out[i]);
        Case k("shared memory is NaN at the start of every block");
        k.expect("poisoned", ok);
    }
    std::vector<float> scratch(256);
    expect_failure("__syncthreads in divergent code", "deadlock",
                   [&] { emu::launch("k_divergent_syncthreads", 1, 256, [&] { k_divergent_syncthreads(); }); });
    expect_failure("a shuffle in divergent code", "deadlock",
                   [&] { emu::launch("k_divergent_shuffle", 1, 64, [&] { k_divergent_shuffle(scratch.data()); }); });
    expect_failure("a partial shuffle mask", "mask",
                   [&] { emu::launch("k_partial_mask", 1, 32, [&] { k_partial_mask(scratch.data()); }); });
    expect_failure("a WMMA pointer not 32-byte aligned", "not 32-byte aligned",
                   [&] { emu::launch("k_wmma_bad", 1, 32, [&] { k_wmma_bad(0); }); });
    expect_failure("a WMMA ldm not a multiple of 8 (bf16)", "not a multiple of 8",
                   [&] { emu::launch("k_wmma_bad", 1, 32, [&] { k_wmma_bad(1); }); });
    expect_failure("lanes passing different WMMA pointers", "disagree",
                   [&] { emu::launch("k_wmma_bad", 1, 32, [&] { k_wmma_bad(2); }); });
    return finish("selftest");
}
