// kernels/layernorm.cu against src/cpu/layernorm.rs (+ residual.rs), launched as src/cuda/ops.rs does.
#include "../../kernels/layernorm.cu"
#include "harness.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = layernorm_forward_f32;
    static constexpr auto res_fwd = residual_layernorm_forward_f32;
    static constexpr auto bwd = layernorm_backward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = layernorm_forward_bf16;
    static constexpr auto res_fwd = residual_layernorm_forward_bf16;
    static constexpr auto bwd = layernorm_backward_bf16;
};

// ops.rs: LAYERNORM_BLOCKS = 128, layernorm_blocks(n) = ceil(n/8) clamped to 1..=128.
// layernorm_workers in src/cuda/ops.rs.
static int ln_workers(int n) { return std::clamp(n, 1, 2048); }

// layernorm_forward of src/cpu/layernorm.rs in double.
static void ref_forward(std::vector<double>& out, std::vector<double>& mean, std::vector<double>& rstd,
                        const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b, int N,
                        int C, double eps) {
    out.assign((size_t)N * C, 0);
    mean.assign(N, 0);
    rstd.assign(N, 0);
    for (int n = 0; n < N; n++) {
        const double* xr = &x[(size_t)n * C];
        double mu = 0, var = 0;
        for (int c = 0; c < C; c++) mu += xr[c];
        mu *= 1.0 / C;
        for (int c = 0; c < C; c++) var += (xr[c] - mu) * (xr[c] - mu);
        var *= 1.0 / C;
        const double r = 1.0 / std::sqrt(var + eps);
        for (int c = 0; c < C; c++) out[(size_t)n * C + c] = (xr[c] - mu) * r * w[c] + b[c];
        mean[n] = mu;
        rstd[n] = r;
    }
}

// layernorm_backward of src/cpu/layernorm.rs in double (dinp, dweight, dbias accumulate).
static void ref_backward(std::vector<double>& dinp, std::vector<double>& dw, std::vector<double>& db,
                         const std::vector<double>& dout, const std::vector<double>& x, const std::vector<double>& w,
                         const std::vector<double>& mean, const std::vector<double>& rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * C;
        const double mu = mean[n], r = rstd[n];
        double g_mean = 0, gx_mean = 0;
        for (int c = 0; c < C; c++) {
            const double g = dout[off + c] * w[c];
            g_mean += g;
            gx_mean += g * (x[off + c] - mu) * r;
        }
        g_mean /= C;
        gx_mean /= C;
        for (int c = 0; c < C; c++) {
            const double xhat = (x[off + c] - mu) * r;
            dinp[off + c] += (dout[off + c] * w[c] - g_mean - xhat * gx_mean) * r;
            dw[c] += dout[off + c] * (x[off + c] - mu) * r;
            db[c] += dout[off + c];
        }
    }
}

enum class Dres { None, Separate, InPlace };

template <typename X>
static void test(int N, int C, Dres dres, bool residual_in_place, uint64_t seed) {
    Rng r(seed);
    const double eps = 1e-5;
    const size_t NC = (size_t)N * C;
    std::vector<double> x1d, x2d, wd, bd, doutd, dres_d, dw0, db0;
    // Inputs with a non-zero mean and a spread, so centring matters.
    auto inp1 = randn<X>(NC, r, 3.0, &x1d);
    for (size_t i = 0; i < NC; i++) inp1[i] = from_f<X>(to_f(inp1[i]) + 2.0f), x1d[i] = to_f(inp1[i]);
    auto inp2 = randn<X>(NC, r, 1.0, &x2d);
    auto w = randn<X>(C, r, 1.0, &wd);
    auto b = randn<X>(C, r, 1.0, &bd);
    auto dout = randn<X>(NC, r, 1.0, &doutd);
    auto dresidual = randn<X>(NC, r, 1.0, &dres_d);
    const auto dweight0 = randn<float>(C, r, 1.0, &dw0);
    const auto dbias0 = randn<float>(C, r, 1.0, &db0);
    const float epsf = (float)eps;
    std::vector<double> out_r, mean_r, rstd_r;
    ref_forward(out_r, mean_r, rstd_r, x1d, wd, bd, N, C, eps);
    std::vector<double> res_r(NC), o_r, m_r, s_r;
    for (size_t i = 0; i < NC; i++) res_r[i] = x1d[i] + x2d[i];
    ref_forward(o_r, m_r, s_r, res_r, wd, bd, N, C, eps);
    const char* dn = dres == Dres::None ? "dresidual NULL" : dres == Dres::Separate ? "dresidual" : "dresidual == dinp";
    const int G = ln_workers(N);
    Case k(fmt("layernorm %-4s N=%4d C=%4d G=%4d%s, %s", pname<X>(), N, C, G,
               residual_in_place ? " residual over inp1" : "", dn));
    // Everything at each SM count; the results must be the same bits (kept from the first).
    std::vector<X> first_x;
    std::vector<float> first_f;
    for (unsigned sms : kSmCounts) {
        const unsigned fwd_grid = sm_grid(N, 8, 4, sms);
        // 1. layernorm_forward of inp1.
        auto out = nans<X>(NC);
        auto mean = nans<float>(N), rstd = nans<float>(N);
        emu::launch("layernorm_forward", fwd_grid, 256, [&] {
            K<X>::fwd(out.data(), mean.data(), rstd.data(), inp1.data(), w.data(), b.data(), N, C, epsf);
        });

        // 2. residual_layernorm_forward: residual = inp1 + inp2 (optionally written over inp1).
        std::vector<X> inp1_copy = inp1;
        auto residual = nans<X>(NC);
        X* res_ptr = residual_in_place ? inp1_copy.data() : residual.data();
        auto out2 = nans<X>(NC);
        auto mean2 = nans<float>(N), rstd2 = nans<float>(N);
        emu::launch("residual_layernorm_forward", fwd_grid, 256, [&] {
            K<X>::res_fwd(res_ptr, out2.data(), mean2.data(), rstd2.data(), inp1_copy.data(), inp2.data(), w.data(),
                          b.data(), N, C, epsf);
        });
        std::vector<X> res_got(res_ptr, res_ptr + NC);
        // --recompute: layernorm_forward of the stored residual gives the fused kernel's bits.
        auto out3 = nans<X>(NC);
        auto mean3 = nans<float>(N), rstd3 = nans<float>(N);
        emu::launch("layernorm_forward", fwd_grid, 256, [&] {
            K<X>::fwd(out3.data(), mean3.data(), rstd3.data(), res_got.data(), w.data(), b.data(), N, C, epsf);
        });

        // 3. layernorm_backward + layernorm_param_grads_reduce, from the kernel's own mean/rstd (as
        //    in training); the reference from its own.
        auto scratch = nans<float>((size_t)G * 2 * C);  // layernorm_scratch_len
        auto dinp = nans<X>(NC);
        auto dweight = dweight0, dbias = dbias0;
        std::vector<double> dinp_r(NC, 0.0), dw_r = dw0, db_r = db0;
        const X* dres_ptr = nullptr;
        X* dinp_ptr = dinp.data();
        if (dres == Dres::Separate) {
            dres_ptr = dresidual.data();
            dinp_r = dres_d;
        } else if (dres == Dres::InPlace) {  // dinp == dresidual: dinp starts as dresidual
            dinp = dresidual;
            dinp_ptr = dinp.data();
            dres_ptr = dinp.data();
            dinp_r = dres_d;
        }
        emu::launch("layernorm_backward", sm_grid(G, 8, 4, sms), 256, [&] {
            K<X>::bwd(dinp_ptr, dres_ptr, scratch.data(), dout.data(), inp1.data(), mean.data(), rstd.data(), w.data(), N,
                      C, G);
        });
        emu::launch("layernorm_param_grads_reduce", blocks(2 * (size_t)C, 256), 256,
                    [&] { layernorm_param_grads_reduce(dweight.data(), dbias.data(), scratch.data(), G, C); });
        ref_backward(dinp_r, dw_r, db_r, doutd, x1d, wd, mean_r, rstd_r, N, C);

        std::vector<X> all_x = out;
        for (auto* v : {&out2, &res_got, &dinp}) all_x.insert(all_x.end(), v->begin(), v->end());
        std::vector<float> all_f = mean;
        for (auto* v : {&rstd, &mean2, &rstd2, &dweight, &dbias}) all_f.insert(all_f.end(), v->begin(), v->end());
        if (sms != kSmCounts[0]) {
            k.expect(fmt("same bits at %u SMs", sms).c_str(), same_bits(all_x, first_x) && same_bits(all_f, first_f));
            continue;
        }
        first_x = all_x, first_f = all_f;
        k.cmp("out", out, out_r, tol<X>());
        k.cmp(pname<X>(), "mean", as_double(mean), mean_r, kTight);
        k.cmp(pname<X>(), "rstd", as_double(rstd), rstd_r, kTight);
        k.cmp("residual", res_got, res_r, tol<X>());
        k.cmp("res out", out2, o_r, tol<X>());
        // bf16: the LayerNorm reads the rounded residual, so mean and rstd see that rounding.
        k.cmp(pname<X>(), "res mean", as_double(mean2), m_r, tol<X>());
        k.cmp(pname<X>(), "res rstd", as_double(rstd2), s_r, tol<X>());
        k.expect("plain = fused (bits)", same_bits(out3, out2) && same_bits(mean3, mean2) && same_bits(rstd3, rstd2));
        k.cmp("dinp", dinp, dinp_r, tol<X>());
        k.cmp(pname<X>(), "dweight", as_double(dweight), dw_r, kTight);
        k.cmp(pname<X>(), "dbias", as_double(dbias), db_r, kTight);
    }
}

int main() {
    struct S {
        int N, C;
    };
    const S shapes[] = {{1, 1}, {7, 33}, {33, 100}, {130, 7}, {100, 130}, {256, 768}, {1100, 33}, {9, 2048}, {2100, 16}};
    uint64_t seed = 1;
    for (int p = 0; p < 2; p++)
        for (size_t i = 0; i < std::size(shapes); i++) {
            const Dres d = (Dres)(i % 3);
            const bool in_place = i % 2 == 1;
            if (p == 0) test<float>(shapes[i].N, shapes[i].C, d, in_place, seed++);
            else test<bf16>(shapes[i].N, shapes[i].C, d, in_place, seed++);
        }
    return finish("layernorm");
}
