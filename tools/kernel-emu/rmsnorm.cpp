// kernels/rmsnorm.cu against src/cpu/rmsnorm.rs, launched as the header of kernels/rmsnorm.cu
// says (the layernorm launches of src/cuda/ops.rs: grid_for(N, 8, 4), G = clamp(N, 1, 2048)).
#include "../../kernels/rmsnorm.cu"
#include "harness.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = rmsnorm_forward_f32;
    static constexpr auto res_fwd = residual_rmsnorm_forward_f32;
    static constexpr auto bwd = rmsnorm_backward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = rmsnorm_forward_bf16;
    static constexpr auto res_fwd = residual_rmsnorm_forward_bf16;
    static constexpr auto bwd = rmsnorm_backward_bf16;
};

static int rms_workers(int n) { return std::clamp(n, 1, 2048); }

// rmsnorm_forward of src/cpu/rmsnorm.rs in double.
static void ref_forward(std::vector<double>& out, std::vector<double>& rstd, const std::vector<double>& x,
                        const std::vector<double>& w, int N, int C, double eps) {
    out.assign((size_t)N * C, 0);
    rstd.assign(N, 0);
    for (int n = 0; n < N; n++) {
        const double* xr = &x[(size_t)n * C];
        double ms = 0;
        for (int c = 0; c < C; c++) ms += xr[c] * xr[c];
        ms *= 1.0 / C;
        const double r = 1.0 / std::sqrt(ms + eps);
        for (int c = 0; c < C; c++) out[(size_t)n * C + c] = xr[c] * r * w[c];
        rstd[n] = r;
    }
}

// rmsnorm_backward of src/cpu/rmsnorm.rs in double (dinp and dweight accumulate).
static void ref_backward(std::vector<double>& dinp, std::vector<double>& dw, const std::vector<double>& dout,
                         const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& rstd,
                         int N, int C) {
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * C;
        const double r = rstd[n];
        double gx_mean = 0;
        for (int c = 0; c < C; c++) gx_mean += dout[off + c] * w[c] * x[off + c] * r;
        gx_mean /= C;
        for (int c = 0; c < C; c++) dinp[off + c] += r * (dout[off + c] * w[c] - x[off + c] * r * gx_mean);
    }
    for (int c = 0; c < C; c++)
        for (int n = 0; n < N; n++) dw[c] += dout[(size_t)n * C + c] * x[(size_t)n * C + c] * rstd[n];
}

enum class Dres { None, Separate, InPlace };

template <typename X>
static void test(int N, int C, Dres dres, bool residual_in_place, bool misaligned, uint64_t seed) {
    Rng r(seed);
    // At C = 1, dinp = rstd·g·(1 − xhat²) with xhat² = x²/(x² + eps): all but eps cancels, and
    // only a large eps leaves a well-conditioned value to compare.
    const double eps = C == 1 ? 1.0 : 1e-5;
    const size_t NC = (size_t)N * C;
    // misaligned: every buffer one element past a 16-byte boundary, so the 1-wide path runs
    // even when C is a multiple of 8.
    const size_t o = misaligned ? 1 : 0;
    std::vector<double> x1d, x2d, wd, doutd, dres_d, dw0;
    auto inp1 = randn<X>(NC + o, r, 2.0, &x1d);
    auto inp2 = randn<X>(NC + o, r, 1.0, &x2d);
    auto w = randn<X>(C + o, r, 1.0, &wd);
    auto dout = randn<X>(NC + o, r, 1.0, &doutd);
    auto dresidual = randn<X>(NC + o, r, 1.0, &dres_d);
    const auto dweight0 = randn<float>(C + o, r, 1.0, &dw0);
    auto drop = [o](std::vector<double>& v) { v.erase(v.begin(), v.begin() + o); };
    for (auto* v : {&x1d, &x2d, &wd, &doutd, &dres_d, &dw0}) drop(*v);
    const float epsf = (float)eps;
    std::vector<double> out_r, rstd_r;
    ref_forward(out_r, rstd_r, x1d, wd, N, C, eps);
    std::vector<double> res_r(NC), o_r, s_r;
    for (size_t i = 0; i < NC; i++) res_r[i] = x1d[i] + x2d[i];
    ref_forward(o_r, s_r, res_r, wd, N, C, eps);
    const char* dn = dres == Dres::None ? "dresidual NULL" : dres == Dres::Separate ? "dresidual" : "dresidual == dinp";
    const int G = rms_workers(N);
    Case k(fmt("rmsnorm %-4s N=%4d C=%4d G=%4d%s%s, %s", pname<X>(), N, C, G, misaligned ? " misaligned" : "",
               residual_in_place ? " residual over inp1" : "", dn));
    std::vector<X> first_x;
    std::vector<float> first_f;
    for (unsigned sms : kSmCounts) {
        const unsigned fwd_grid = sm_grid(N, 8, 4, sms);
        // 1. rmsnorm_forward of inp1.
        auto out = nans<X>(NC + o);
        auto rstd = nans<float>(N);
        emu::launch("rmsnorm_forward", fwd_grid, 256, [&] {
            K<X>::fwd(out.data() + o, rstd.data(), inp1.data() + o, w.data() + o, N, C, epsf);
        });

        // 2. residual_rmsnorm_forward: residual = inp1 + inp2 (optionally written over inp1).
        std::vector<X> inp1_copy = inp1;
        auto residual = nans<X>(NC + o);
        X* res_ptr = (residual_in_place ? inp1_copy.data() : residual.data()) + o;
        auto out2 = nans<X>(NC + o);
        auto rstd2 = nans<float>(N);
        emu::launch("residual_rmsnorm_forward", fwd_grid, 256, [&] {
            K<X>::res_fwd(res_ptr, out2.data() + o, rstd2.data(), inp1_copy.data() + o, inp2.data() + o, w.data() + o,
                          N, C, epsf);
        });
        std::vector<X> res_got(res_ptr, res_ptr + NC);
        // --recompute: rmsnorm_forward of the stored residual gives the fused kernel's bits.
        auto out3 = nans<X>(NC);
        auto rstd3 = nans<float>(N);
        std::vector<X> res_copy(NC + o);
        std::copy(res_got.begin(), res_got.end(), res_copy.begin() + o);
        emu::launch("rmsnorm_forward", fwd_grid, 256, [&] {
            K<X>::fwd(out3.data(), rstd3.data(), res_copy.data() + o, w.data() + o, N, C, epsf);
        });
        std::vector<X> out2_v(out2.begin() + o, out2.end());
        // out3 is aligned where out2 may not be: same bits only when both take the same path.
        const bool same_path = !misaligned;

        // 3. rmsnorm_backward + rmsnorm_param_grads_reduce, from the kernel's own rstd (as in
        //    training); the reference from its own. The scratch starts NaN: every partials row
        //    must be written before it is read.
        auto scratch = nans<float>((size_t)G * C + o);
        auto dinp = nans<X>(NC + o);
        auto dweight = dweight0;
        std::vector<double> dinp_r(NC, 0.0), dw_r = dw0;
        const X* dres_ptr = nullptr;
        if (dres == Dres::Separate) {
            dres_ptr = dresidual.data() + o;
            dinp_r = dres_d;
        } else if (dres == Dres::InPlace) {  // dinp == dresidual: dinp starts as dresidual (+=)
            dinp = dresidual;
            dres_ptr = dinp.data() + o;
            dinp_r = dres_d;
        }
        emu::launch("rmsnorm_backward", sm_grid(G, 8, 4, sms), 256, [&] {
            K<X>::bwd(dinp.data() + o, dres_ptr, scratch.data() + o, dout.data() + o, inp1.data() + o, w.data() + o,
                      rstd.data(), N, C, G);
        });
        emu::launch("rmsnorm_param_grads_reduce", blocks((size_t)C, 256), 256,
                    [&] { rmsnorm_param_grads_reduce(dweight.data() + o, scratch.data() + o, G, C); });
        ref_backward(dinp_r, dw_r, doutd, x1d, wd, rstd_r, N, C);

        std::vector<X> all_x = out;
        for (auto* v : {&out2, &res_got, &dinp}) all_x.insert(all_x.end(), v->begin(), v->end());
        std::vector<float> all_f = rstd;
        for (auto* v : {&rstd2, &dweight}) all_f.insert(all_f.end(), v->begin(), v->end());
        if (sms != kSmCounts[0]) {
            k.expect(fmt("same bits at %u SMs", sms).c_str(), same_bits(all_x, first_x) && same_bits(all_f, first_f));
            continue;
        }
        first_x = all_x, first_f = all_f;
        k.cmp("out", std::vector<X>(out.begin() + o, out.end()), out_r, tol<X>());
        k.cmp(pname<X>(), "rstd", as_double(rstd), rstd_r, kTight);
        k.cmp("residual", res_got, res_r, tol<X>());
        k.cmp("res out", out2_v, o_r, tol<X>());
        // bf16: the RMSNorm reads the rounded residual, so rstd sees that rounding.
        k.cmp(pname<X>(), "res rstd", as_double(rstd2), s_r, tol<X>());
        if (same_path) k.expect("plain = fused (bits)", same_bits(out3, out2_v) && same_bits(rstd3, rstd2));
        k.cmp("dinp", std::vector<X>(dinp.begin() + o, dinp.end()), dinp_r, tol<X>());
        k.cmp(pname<X>(), "dweight", as_double(std::vector<float>(dweight.begin() + o, dweight.end())), dw_r, kTight);
        if (o) k.expect("untouched before the buffers", std::isnan(to_f(out[0])) && std::isnan(to_f(out2[0])));
    }
}

int main() {
    struct S {
        int N, C;
    };
    const S shapes[] = {{1, 1},    {7, 33},    {33, 100}, {130, 7},   {100, 130},
                        {256, 768}, {1100, 33}, {9, 2048}, {2100, 16}, {5, 64}};
    uint64_t seed = 1;
    for (int p = 0; p < 2; p++)
        for (size_t i = 0; i < std::size(shapes); i++) {
            const Dres d = (Dres)(i % 3);
            const bool in_place = i % 2 == 1;
            const bool misaligned = i == std::size(shapes) - 1;
            if (p == 0) test<float>(shapes[i].N, shapes[i].C, d, in_place, misaligned, seed++);
            else test<bf16>(shapes[i].N, shapes[i].C, d, in_place, misaligned, seed++);
        }
    return finish("rmsnorm");
}
