// kernels/attention.cu against src/cpu/attention.rs, launched as src/cuda/ops.rs does: f32 on the
// CUDA-core kernels, bf16 on the tensor-core (flash) kernels.
#include "../../kernels/attention.cu"
#include "harness.h"

using namespace h;

// Ops::attention_forward / attention_backward: f32 on the CUDA-core kernels, grid (ceil(T/16), NH,
// B) (gx > 0 overrides grid.x: they accept any gridDim.x >= 1); bf16 on the flash kernels for the
// head dimension padded to 64 or 128, grid (ceil(T/64), NH, B) with their dynamic shared memory,
// and D from attention_d first. Returns grid.x.
template <typename X>
static unsigned run_attention(X* out, float* lse, X* dqkv, const X* dout, const X* qkv, int B, int T, int C, int NH,
                              unsigned gx) {
    if constexpr (is_f32<X>) {
        const dim3 grid(gx ? gx : blocks(T, 16), NH, B);  // attention_grid
        emu::launch("attention_forward", grid, 128, [&] { attention_forward_f32(out, lse, qkv, B, T, C, NH); });
        // Backward from the kernel's own out and lse (as in training).
        emu::launch("attention_backward_dkdv", grid, 128,
                    [&] { attention_backward_dkdv_f32(dqkv, dout, qkv, out, lse, B, T, C, NH); });
        emu::launch("attention_backward_dq", grid, 128,
                    [&] { attention_backward_dq_f32(dqkv, dout, qkv, out, lse, B, T, C, NH); });
        return grid.x;
    } else {
        const int hd = C / NH, HD = hd <= 64 ? 64 : 128;
        auto fwd = HD == 64 ? flash_forward_hd64_bf16 : flash_forward_hd128_bf16;
        auto dkdv = HD == 64 ? flash_backward_dkdv_hd64_bf16 : flash_backward_dkdv_hd128_bf16;
        auto dq = HD == 64 ? flash_backward_dq_hd64_bf16 : flash_backward_dq_hd128_bf16;
        const dim3 grid(blocks(T, 64), NH, B);
        std::vector<float> d((size_t)B * NH * T, NAN);
        emu::launch("flash_forward", grid, 128, 640 * HD, [&] { fwd(out, lse, qkv, B, T, C, NH); });
        emu::launch("attention_d", blocks(B * NH * T, 128), 128,
                    [&] { attention_d_bf16(d.data(), dout, out, B, T, C, NH); });
        emu::launch("flash_backward_dkdv", grid, 128, 512 * HD + 512,
                    [&] { dkdv(dqkv, dout, qkv, lse, d.data(), B, T, C, NH); });
        emu::launch("flash_backward_dq", grid, 128, 768 * HD, [&] { dq(dqkv, dout, qkv, lse, d.data(), B, T, C, NH); });
        return grid.x;
    }
}

// attention_forward of src/cpu/attention.rs, in R = double (the reference) or float (the CPU
// backend at --precision f32, to measure how well conditioned a case is).
template <typename R>
static void ref_forward(std::vector<R>& out, std::vector<R>& lse, const std::vector<R>& qkv, int B, int T, int C,
                        int NH) {
    const int hd = C / NH;
    const R scale = R(1) / std::sqrt((R)hd);
    out.assign((size_t)B * T * C, 0);
    lse.assign((size_t)B * NH * T, 0);
    std::vector<R> sc(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < T; i++) {
                const R* q = &qkv[((size_t)b * T + i) * 3 * C + h * hd];
                R mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    const R* k = &qkv[((size_t)b * T + j) * 3 * C + C + h * hd];
                    R s = 0;
                    for (int x = 0; x < hd; x++) s += q[x] * k[x];
                    sc[j] = s * scale;
                    mx = std::max(mx, sc[j]);
                }
                R sum = 0;
                for (int j = 0; j <= i; j++) sum += std::exp(sc[j] - mx);
                const R l = mx + std::log(sum);
                lse[((size_t)b * NH + h) * T + i] = l;
                R* o = &out[((size_t)b * T + i) * C + h * hd];
                for (int j = 0; j <= i; j++) {
                    const R p = std::exp(sc[j] - l);
                    const R* v = &qkv[((size_t)b * T + j) * 3 * C + 2 * C + h * hd];
                    for (int x = 0; x < hd; x++) o[x] += p * v[x];
                }
            }
}

// attention_backward of src/cpu/attention.rs (into a zeroed dqkv).
template <typename R>
static void ref_backward(std::vector<R>& dqkv, const std::vector<R>& dout, const std::vector<R>& qkv,
                         const std::vector<R>& out, const std::vector<R>& lse, int B, int T, int C, int NH) {
    const int hd = C / NH;
    const R scale = R(1) / std::sqrt((R)hd);
    dqkv.assign((size_t)B * T * 3 * C, 0);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < T; i++) {
                auto at = [&](int t, int part) { return &qkv[((size_t)b * T + t) * 3 * C + part * C + h * hd]; };
                const R* q = at(i, 0);
                const R* d_o = &dout[((size_t)b * T + i) * C + h * hd];
                const R* o = &out[((size_t)b * T + i) * C + h * hd];
                R di = 0;
                for (int x = 0; x < hd; x++) di += d_o[x] * o[x];
                for (int j = 0; j <= i; j++) {
                    const R *k = at(j, 1), *v = at(j, 2);
                    R s = 0, dp = 0;
                    for (int x = 0; x < hd; x++) s += q[x] * k[x], dp += d_o[x] * v[x];
                    const R p = std::exp(s * scale - lse[((size_t)b * NH + h) * T + i]);
                    const R ds = p * (dp - di) * scale;
                    for (int x = 0; x < hd; x++) {
                        dqkv[((size_t)b * T + i) * 3 * C + h * hd + x] += ds * k[x];
                        dqkv[((size_t)b * T + j) * 3 * C + C + h * hd + x] += ds * q[x];
                        dqkv[((size_t)b * T + j) * 3 * C + 2 * C + h * hd + x] += p * d_o[x];
                    }
                }
            }
}

// gx > 0 overrides the grid's x (the kernels accept any gridDim.x >= 1); 0 is ops.rs's ceil(T/16).
template <typename X>
static void test(int B, int T, int C, int NH, unsigned gx, double amp, uint64_t seed) {
    Rng r(seed);
    std::vector<double> qkvd, doutd;
    auto qkv = randn<X>((size_t)B * T * 3 * C, r, amp, &qkvd);
    auto dout = randn<X>((size_t)B * T * C, r, 1.0, &doutd);
    auto out = nans<X>((size_t)B * T * C), dqkv = nans<X>((size_t)B * T * 3 * C);
    auto lse = nans<float>((size_t)B * NH * T);
    const unsigned grid_x = run_attention<X>(out.data(), lse.data(), dqkv.data(), dout.data(), qkv.data(), B, T, C, NH, gx);
    std::vector<double> out_r, lse_r, dqkv_r;
    ref_forward(out_r, lse_r, qkvd, B, T, C, NH);
    ref_backward(dqkv_r, doutd, qkvd, out_r, lse_r, B, T, C, NH);
    // Conditioning: the error of the CPU backend's own f32 computation. Large scores (amp) make
    // dqkv sensitive to fp32 rounding of s; a kernel is held to max(tol, 4 × that error).
    double cpu_out = 0, cpu_dqkv = 0;
    if constexpr (is_f32<X>) {
        std::vector<float> qf(qkvd.begin(), qkvd.end()), df(doutd.begin(), doutd.end()), of, lf, dqf;
        ref_forward(of, lf, qf, B, T, C, NH);
        ref_backward(dqf, df, qf, of, lf, B, T, C, NH);
        cpu_out = relerr(std::vector<double>(of.begin(), of.end()), out_r);
        cpu_dqkv = relerr(std::vector<double>(dqf.begin(), dqf.end()), dqkv_r);
    }
    Case k(fmt("attention %-4s B=%d T=%3d C=%3d NH=%d hd=%3d grid.x=%2u amp=%2.0f", pname<X>(), B, T, C, NH, C / NH,
               grid_x, amp));
    k.cmp("out", out, out_r, std::max(tol<X>(), 4 * cpu_out));
    k.cmp(pname<X>(), "lse", as_double(lse), lse_r, tol<X>());
    k.cmp("dqkv", dqkv, dqkv_r, std::max(tol<X>(), 4 * cpu_dqkv));
    if (is_f32<X>) k.errs += fmt(" (cpu-f32: out %.1e dqkv %.1e)", cpu_out, cpu_dqkv);
}

int main() {
    struct S {
        int B, T, C, NH;
        unsigned gx;
        double amp;
    };
    const S shapes[] = {
        {2, 7, 12, 3, 0, 3},    {1, 1, 5, 5, 0, 1},     {1, 33, 24, 3, 0, 2},  {2, 100, 24, 2, 0, 2},
        {1, 17, 128, 1, 0, 1},  {1, 50, 128, 2, 0, 2},  {1, 40, 100, 1, 0, 1}, {1, 37, 66, 2, 0, 1},
        {1, 130, 128, 2, 0, 1}, {1, 100, 24, 2, 1, 2},  {1, 70, 36, 3, 3, 2},  {1, 64, 16, 2, 0, 8},
        {1, 48, 8, 1, 0, 20},   {2, 70, 256, 2, 0, 1},  {1, 64, 768, 12, 0, 1},  // the last: GPT-2's heads
    };
    // The tensor-core kernels at head dims 64 and 128 (GPT-2's and larger models'), T = 1, 7, 65
    // and 1000: one row, less than a warp's 16 rows, one past a 64-row tile, and many tiles with a
    // ragged last one.
    const S flash[] = {
        {1, 1, 64, 1, 0, 1},  {2, 7, 128, 2, 0, 2},    {1, 65, 64, 1, 0, 2},    {1, 65, 256, 2, 0, 1},
        {1, 7, 128, 1, 0, 1}, {1, 1000, 128, 2, 0, 1}, {1, 1000, 128, 1, 0, 1},
    };
    uint64_t seed = 1;
    for (const S& s : shapes) test<float>(s.B, s.T, s.C, s.NH, s.gx, s.amp, seed++);
    for (const S& s : shapes) test<bf16>(s.B, s.T, s.C, s.NH, s.gx, s.amp, seed++);
    for (const S& s : flash) test<bf16>(s.B, s.T, s.C, s.NH, s.gx, s.amp, seed++);
    return finish("attention");
}
