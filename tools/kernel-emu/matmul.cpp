// kernels/matmul.cu against src/cpu/matmul.rs + gelu.rs, launched exactly as src/cuda/ops.rs's
// matmul_forward / matmul_backward do (every stride pattern, both weight layouts): f32 on its
// CUDA-core kernel, bf16 on every tensor-core variant.
#include "../../kernels/matmul.cu"
#include "harness.h"

using namespace h;

// The tensor-core variants, as MATMUL_VARIANTS in src/cuda/ops.rs lists them (bf16 only).
struct Variant {
    const char* name;
    decltype(&matmul_tc128x128_bf16) mm;
    decltype(&matmul_tc128x128_f32out_bf16) mm_f32out;
    int bm, bn, threads, smem;
};
static const Variant kVariants[] = {
    {"tc128x128", matmul_tc128x128_bf16, matmul_tc128x128_f32out_bf16, 128, 128, 256, 67584},
    {"tc128x64", matmul_tc128x64_bf16, matmul_tc128x64_f32out_bf16, 128, 64, 128, 49152},
};
static const Variant* variant = &kVariants[0];  // the one under test (bf16)

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto bias_grad = bias_grad_partial_f32;
};
template <>
struct K<bf16> {
    static constexpr auto bias_grad = bias_grad_partial_bf16;
};

enum class Layout { InOut, OutIn };
static const char* lname(Layout l) { return l == Layout::InOut ? "InOut" : "OutIn"; }
// WeightLayout::in_out_strides / out_in_strides (src/cpu/matmul.rs).
static std::pair<long long, long long> in_out_strides(Layout l, long long c, long long oc) {
    return l == Layout::InOut ? std::pair{oc, 1LL} : std::pair{1LL, c};
}
static std::pair<long long, long long> out_in_strides(Layout l, long long c, long long oc) {
    return l == Layout::InOut ? std::pair{1LL, oc} : std::pair{c, 1LL};
}

// Ops::matmul_variant: f32 on matmul_f32, grid (ceil(n/64), ceil(m/64)), block 128; bf16 on the
// variant under test, grid (ceil(n/BN), ceil(m/BM)) with its threads and dynamic shared memory.
// "matmul" writes floatX, "matmul_f32out" f32 (parameter gradients).
using Operand = std::pair<long long, long long>;  // (row stride, column stride)
template <typename X>
static void ops_matmul(X* out, const X* a, Operand as, const X* b, Operand bs, const X* bias, X* pre_gelu,
                       const X* gelu_input, bool accumulate, int m, int n, int k) {
    if constexpr (std::is_same<X, float>::value) {
        emu::launch("matmul", dim3(blocks(n, 64), blocks(m, 64)), 128, [&] {
            matmul_f32(out, a, b, bias, pre_gelu, gelu_input, m, n, k, as.first, as.second, bs.first, bs.second,
                       accumulate);
        });
    } else {
        const Variant& v = *variant;
        emu::launch(v.name, dim3(blocks(n, v.bn), blocks(m, v.bm)), v.threads, v.smem, [&] {
            v.mm(out, a, b, bias, pre_gelu, gelu_input, m, n, k, as.first, as.second, bs.first, bs.second, accumulate);
        });
    }
}
template <typename X>
static void ops_matmul_f32out(float* out, const X* a, Operand as, const X* b, Operand bs, bool accumulate, int m, int n,
                              int k) {
    if constexpr (std::is_same<X, float>::value) {
        emu::launch("matmul_f32out", dim3(blocks(n, 64), blocks(m, 64)), 128, [&] {
            matmul_f32out_f32(out, a, b, nullptr, nullptr, nullptr, m, n, k, as.first, as.second, bs.first, bs.second,
                              accumulate);
        });
    } else {
        const Variant& v = *variant;
        emu::launch(v.name, dim3(blocks(n, v.bn), blocks(m, v.bm)), v.threads, v.smem, [&] {
            v.mm_f32out(out, a, b, nullptr, nullptr, nullptr, m, n, k, as.first, as.second, bs.first, bs.second,
                        accumulate);
        });
    }
}

// The name of what runs: f32, or bf16 on the variant under test.
template <typename X>
static std::string what() {
    if constexpr (std::is_same<X, float>::value) return "f32";
    else return std::string("bf16 ") + variant->name;
}

static double gelu_d(double x) {
    const double s = std::sqrt(2.0 / M_PI);
    return 0.5 * x * (1.0 + std::tanh(s * (x + 0.044715 * x * x * x)));
}
static double gelu_grad_d(double x) {
    const double s = std::sqrt(2.0 / M_PI);
    const double th = std::tanh(s * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * s * (1.0 + 3.0 * 0.044715 * x * x);
}

// Ops::matmul_forward: out (N, OC) = inp (N, C) · W + bias, with GELU into out and the sum into
// pre_gelu when gelu is set.
template <typename X>
static void test_forward(int N, int C, int OC, Layout layout, bool has_bias, bool gelu, uint64_t seed) {
    Rng r(seed);
    std::vector<double> xd, wd, bd;
    auto inp = randn<X>((size_t)N * C, r, 1.0, &xd);
    auto w = randn<X>((size_t)C * OC, r, 1.0, &wd);
    auto bias = randn<X>(OC, r, 1.0, &bd);
    auto out = nans<X>((size_t)N * OC), pre = nans<X>((size_t)N * OC);
    const auto [w_rs, w_cs] = in_out_strides(layout, C, OC);
    ops_matmul<X>(out.data(), inp.data(), {C, 1}, w.data(), {w_rs, w_cs}, has_bias ? bias.data() : nullptr,
                  gelu ? pre.data() : nullptr, nullptr, false, N, OC, C);
    std::vector<double> pre_r((size_t)N * OC), out_r((size_t)N * OC);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double acc = has_bias ? bd[o] : 0.0;
            for (int c = 0; c < C; c++)
                acc += xd[(size_t)n * C + c] * (layout == Layout::InOut ? wd[(size_t)c * OC + o] : wd[(size_t)o * C + c]);
            pre_r[(size_t)n * OC + o] = acc;
            // As the CPU's matmul_forward then gelu_forward: GELU reads the pre-activation as stored
            // (rounded to X), which pre_gelu's own comparison checks.
            out_r[(size_t)n * OC + o] = gelu ? gelu_d(to_f(pre[(size_t)n * OC + o])) : acc;
        }
    Case k(fmt("matmul %-14s forward  %s N=%3d C=%4d OC=%5d%s%s", what<X>().c_str(), lname(layout), N, C, OC,
               has_bias ? " bias" : "", gelu ? " gelu" : ""));
    k.cmp("out", out, out_r, tol<X>());
    if (gelu) k.cmp("pre_gelu", pre, pre_r, tol<X>());
}

// Ops::matmul_backward: dinp = dout · Wᵀ (· gelu'(gelu_input)), written; dweight (f32) += the
// weight gradient in W's layout; dbias (f32) += Σ_rows dout.
template <typename X>
static void test_backward(int N, int C, int OC, Layout layout, bool has_bias, bool has_gelu_input, uint64_t seed) {
    Rng r(seed);
    std::vector<double> xd, wd, dod, gid, dw0, db0;
    auto inp = randn<X>((size_t)N * C, r, 1.0, &xd);
    auto w = randn<X>((size_t)C * OC, r, 1.0, &wd);
    auto dout = randn<X>((size_t)N * OC, r, 1.0, &dod);
    auto gelu_input = randn<X>((size_t)N * C, r, 2.0, &gid);
    auto dweight = randn<float>((size_t)C * OC, r, 1.0, &dw0);  // accumulated: random start
    auto dbias = randn<float>(OC, r, 1.0, &db0);
    auto dinp = nans<X>((size_t)N * C);

    const auto [wt_rs, wt_cs] = out_in_strides(layout, C, OC);
    ops_matmul<X>(dinp.data(), dout.data(), {OC, 1}, w.data(), {wt_rs, wt_cs}, nullptr, nullptr,
                  has_gelu_input ? gelu_input.data() : nullptr, false, N, C, OC);
    if (layout == Layout::InOut)  // dW (C × OC) += inpᵀ · dout
        ops_matmul_f32out<X>(dweight.data(), inp.data(), {1, C}, dout.data(), {OC, 1}, true, C, OC, N);
    else  // dW (OC × C) += doutᵀ · inp
        ops_matmul_f32out<X>(dweight.data(), dout.data(), {1, OC}, inp.data(), {C, 1}, true, OC, C, N);
    // The bias gradient as Ops::matmul_backward launches it, at each SM count: the same bits.
    std::vector<float> first_dbias;
    bool same_dbias = true;
    const auto dbias_start = dbias;
    for (unsigned sms : kSmCounts) {
        if (!has_bias) break;
        dbias = dbias_start;
        const int chunks = (N + 63) / 64;
        auto partials = nans<float>((size_t)chunks * OC);  // bias_scratch_len
        const size_t units = (size_t)chunks * ((OC + 255) / 256);
        emu::launch("bias_grad_partial", sm_grid(units, 1, 8, sms), 256,
                    [&] { K<X>::bias_grad(partials.data(), dout.data(), N, OC); });
        emu::launch("bias_grad_reduce", blocks(OC, 256), 256,
                    [&] { bias_grad_reduce(dbias.data(), partials.data(), chunks, OC); });
        if (first_dbias.empty()) first_dbias = dbias;
        same_dbias &= same_bits(dbias, first_dbias);
    }

    std::vector<double> dinp_r((size_t)N * C), dw_r = dw0, db_r = db0;
    auto widx = [&](int c, int o) { return layout == Layout::InOut ? (size_t)c * OC + o : (size_t)o * C + c; };
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            double acc = 0;
            for (int o = 0; o < OC; o++) acc += dod[(size_t)n * OC + o] * wd[widx(c, o)];
            if (has_gelu_input) acc *= gelu_grad_d(gid[(size_t)n * C + c]);
            dinp_r[(size_t)n * C + c] = acc;
        }
    for (int c = 0; c < C; c++)
        for (int o = 0; o < OC; o++) {
            double acc = 0;
            for (int n = 0; n < N; n++) acc += xd[(size_t)n * C + c] * dod[(size_t)n * OC + o];
            dw_r[widx(c, o)] += acc;
        }
    if (has_bias)
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) db_r[o] += dod[(size_t)n * OC + o];
    Case k(fmt("matmul %-14s backward %s N=%3d C=%4d OC=%5d%s%s", what<X>().c_str(), lname(layout), N, C, OC,
               has_bias ? " bias" : "", has_gelu_input ? " gelu_input" : ""));
    k.cmp("dinp", dinp, dinp_r, tol<X>());
    k.cmp(pname<X>(), "dweight", as_double(dweight), dw_r, kTight);
    if (has_bias) k.cmp(pname<X>(), "dbias", as_double(dbias), db_r, kTight);
    if (has_bias) k.expect("dbias same bits at every SM count", same_dbias);
    else k.cmp(pname<X>(), "dbias", as_double(dbias), db0, 0.0);  // untouched
}

// Every epilogue option at once on a floatX output (not a pattern ops.rs uses: accumulate into
// floatX), with both operands transposed: out = out + gelu(A·B + bias)·gelu'(gelu_input).
template <typename X>
static void test_all_options(int M, int N, int Kd, uint64_t seed) {
    Rng r(seed);
    std::vector<double> ad, bd, biasd, gid, out0;
    auto a = randn<X>((size_t)M * Kd, r, 1.0, &ad);  // stored (K, M): A[m, k] = a[k·M + m]
    auto b = randn<X>((size_t)Kd * N, r, 1.0, &bd);  // stored (N, K): B[k, n] = b[n·K + k]
    auto bias = randn<X>(N, r, 1.0, &biasd);
    auto gi = randn<X>((size_t)M * N, r, 2.0, &gid);
    auto out = randn<X>((size_t)M * N, r, 1.0, &out0);
    auto pre = nans<X>((size_t)M * N);
    ops_matmul<X>(out.data(), a.data(), {1, M}, b.data(), {1, Kd}, bias.data(), pre.data(), gi.data(), true, M, N, Kd);
    std::vector<double> out_r((size_t)M * N), pre_r((size_t)M * N);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = biasd[n];
            for (int k = 0; k < Kd; k++) acc += ad[(size_t)k * M + m] * bd[(size_t)n * Kd + k];
            const size_t o = (size_t)m * N + n;
            pre_r[o] = acc;
            out_r[o] = out0[o] + gelu_d(to_f(pre[o])) * gelu_grad_d(gid[o]);  // GELU of the stored pre
        }
    Case k(fmt("matmul %-14s all options (A, B transposed; bias, gelu, gelu_input, accumulate) M=%d N=%d K=%d",
               what<X>().c_str(), M, N, Kd));
    k.cmp("out", out, out_r, tol<X>());
    k.cmp("pre_gelu", pre, pre_r, tol<X>());
}

template <typename X>
static void run_all(uint64_t& seed) {
    struct S {
        int N, C, OC;
    };
    const S small[] = {{1, 1, 1}, {7, 33, 100}, {33, 100, 7}, {130, 7, 33}, {100, 130, 65}, {64, 64, 64}};
    for (const S& s : small)
        for (Layout l : {Layout::InOut, Layout::OutIn})
            for (int opt = 0; opt < 4; opt++) {
                test_forward<X>(s.N, s.C, s.OC, l, opt & 1, opt & 2, seed++);
                test_backward<X>(s.N, s.C, s.OC, l, opt & 1, opt & 2, seed++);
            }
    // A GPT-2-like size, with the options src/cuda/model.rs uses in each layout: InOut layers
    // with bias (and GELU for c_fc, GELU' for mlp_proj's dX), OutIn (wte as classifier) without.
    test_forward<X>(256, 768, 200, Layout::InOut, true, true, seed++);
    test_backward<X>(256, 768, 200, Layout::InOut, true, true, seed++);
    // The bias gradient over 3 row chunks × 3 column slabs, the last ones partial.
    test_backward<X>(130, 16, 520, Layout::InOut, true, false, seed++);
    test_backward<X>(65, 8, 300, Layout::InOut, true, false, seed++);  // OC not a multiple of 8
    test_forward<X>(256, 768, 200, Layout::OutIn, false, false, seed++);
    test_backward<X>(256, 768, 200, Layout::OutIn, false, false, seed++);
    test_all_options<X>(7, 33, 100, seed++);
    test_all_options<X>(130, 65, 40, seed++);
}

// The tensor-core kernels at the sizes the issue names (1, 7, 33, 257, 768, 3072; and 50304, the
// padded vocabulary, with a small K), none a multiple of the tiles but 768 and 3072, in both
// layouts and every epilogue the model uses: rows past every tile edge, K past every 32-deep
// slice, and N = 7, 33, 257 whose rows are not 16-byte aligned (element-by-element loads and
// stores); 768 and 3072 take the cp.async and 16-byte epilogue paths.
static void run_tensor_core_sizes(uint64_t& seed) {
    test_forward<bf16>(33, 768, 3072, Layout::InOut, true, true, seed++);
    test_backward<bf16>(33, 3072, 768, Layout::InOut, true, true, seed++);
    test_forward<bf16>(257, 33, 7, Layout::InOut, true, false, seed++);
    test_backward<bf16>(257, 7, 33, Layout::OutIn, false, false, seed++);
    test_forward<bf16>(7, 33, 50304, Layout::OutIn, false, false, seed++);  // the tied classifier
    test_backward<bf16>(7, 33, 50304, Layout::OutIn, false, false, seed++);
    test_forward<bf16>(1, 257, 768, Layout::InOut, true, true, seed++);
    test_all_options<bf16>(257, 33, 7, seed++);
}

int main() {
    uint64_t seed = 1;
    run_all<float>(seed);
    for (const Variant& v : kVariants) {
        variant = &v;
        run_all<bf16>(seed);
        run_tensor_core_sizes(seed);
    }
    return finish("matmul");
}
