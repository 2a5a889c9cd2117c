// kernels/optimizer.cu against src/cpu/optimizer.rs, launched as src/cuda/ops.rs does.
#include "../../kernels/optimizer.cu"
#include "harness.h"

using namespace h;

constexpr int NORM_BLOCKS = 1024;  // src/cuda/ops.rs

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto adamw = adamw_f32;
    static constexpr auto to_x = f32_to_floatx_f32;
    static constexpr auto to_f32 = floatx_to_f32_f32;
};
template <>
struct K<bf16> {
    static constexpr auto adamw = adamw_bf16;
    static constexpr auto to_x = f32_to_floatx_bf16;
    static constexpr auto to_f32 = floatx_to_f32_bf16;
};

// Ops::grad_norm_squared: squares into scratch[0..NORM_BLOCKS], total at scratch[NORM_BLOCKS].
static void test_norm(long long n, uint64_t seed) {
    Rng r(seed);
    std::vector<double> gd;
    auto grads = randn<float>((size_t)n, r, 1e-2, &gd);
    std::vector<double> scratch(NORM_BLOCKS + 1, NAN);
    emu::launch("grad_norm_squares", NORM_BLOCKS, 256, [&] { grad_norm_squares(scratch.data(), grads.data(), n); });
    double* total = scratch.data() + NORM_BLOCKS;
    emu::launch("grad_norm_finish", 1, 256, [&] { grad_norm_finish(total, scratch.data(), NORM_BLOCKS); });
    double ref = 0;  // global_norm(grads)², summed in f64
    for (double g : gd) ref += g * g;
    Case k(fmt("grad_norm          n=%8lld", n));
    k.cmp("f32", "norm_squared", {*total}, {ref}, kTight);
}

// One AdamW step (ops.rs AdamWScalars: the scalars of AdamWConfig::step formed in f64 and
// rounded to f32) from random m, v and master weights, against AdamW::update in double.
template <typename X>
static void test_adamw(long long n, int t, double lr, bool decay, float grad_scale, uint64_t seed) {
    Rng r(seed);
    const double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1;
    const float step_size = (float)(lr / (1.0 - std::pow(beta1, t)));
    const float bc2_sqrt = (float)std::sqrt(1.0 - std::pow(beta2, t));
    const float omb1 = (float)(1.0 - beta1), b2 = (float)beta2, omb2 = (float)(1.0 - beta2), epsf = (float)eps;
    const float decayf = decay ? (float)(1.0 - lr * wd) : 1.0f;
    std::vector<double> pd, gd, md, vd;
    auto master = randn<float>((size_t)n, r, 0.1, &pd);
    auto grads = randn<float>((size_t)n, r, 1e-2, &gd);
    auto m = randn<float>((size_t)n, r, 1e-3, &md);
    auto v = randn<float>((size_t)n, r, 1e-4, &vd);
    for (size_t i = 0; i < v.size(); i++) v[i] = v[i] * v[i], vd[i] = v[i];  // v >= 0
    auto params = nans<X>((size_t)n);
    emu::launch("adamw", blocks((size_t)n, 256), 256, [&] {
        K<X>::adamw(params.data(), master.data(), grads.data(), m.data(), v.data(), n, grad_scale, step_size, bc2_sqrt,
                    omb1, b2, omb2, epsf, decayf);
    });
    // AdamW::update on the clipped gradient (clip_grad_norm scales grads by the factor first).
    std::vector<double> p_r(n), m_r(n), v_r(n), delta_r(n), delta(n);
    for (long long i = 0; i < n; i++) {
        const double g = gd[i] * (double)grad_scale;
        double p = pd[i] * (double)decayf;
        const double mi = md[i] + (double)omb1 * (g - md[i]);
        const double vi = vd[i] * (double)b2 + (double)omb2 * g * g;
        p -= (double)step_size * mi / (std::sqrt(vi) / (double)bc2_sqrt + (double)epsf);
        p_r[i] = p, m_r[i] = mi, v_r[i] = vi;
        delta_r[i] = p - pd[i];
        delta[i] = (double)master[i] - pd[i];
    }
    Case k(fmt("adamw %-4s         n=%8lld t=%d lr=%g decay=%d grad_scale=%g", pname<X>(), n, t, lr, decay, grad_scale));
    k.cmp(pname<X>(), "master", as_double(master), p_r, kTight);
    k.cmp(pname<X>(), "m", as_double(m), m_r, kTight);
    k.cmp(pname<X>(), "v", as_double(v), v_r, kTight);
    // The update itself, which fp32 rounding of p (|p| ~ 0.1, |update| ~ lr) resolves to ~1e-4.
    k.cmp(pname<X>(), "update", delta, delta_r, 2e-3);
    k.cmp("params", params, p_r, tol<X>());
    // params must be exactly the rounded master weights.
    bool exact = true;
    for (long long i = 0; i < n; i++) {
        const X want = from_f<X>(master[i]);
        exact &= memcmp(&params[i], &want, sizeof(X)) == 0;
    }
    k.expect("params==round(master)", exact);
}

template <typename X>
static void test_convert(long long n, uint64_t seed) {
    Rng r(seed);
    std::vector<double> id;
    auto in = randn<float>((size_t)n, r, 3.0, &id);
    if (n > 4) in[0] = INFINITY, in[1] = -0.0f, in[2] = 1e-40f, in[3] = 3.3895314e38f;  // inf, -0, denormal, near max
    auto x = nans<X>((size_t)n);
    emu::launch("f32_to_floatx", blocks((size_t)n, 256), 256, [&] { K<X>::to_x(x.data(), in.data(), n); });
    auto back = nans<float>((size_t)n);
    emu::launch("floatx_to_f32", blocks((size_t)n, 256), 256, [&] { K<X>::to_f32(back.data(), x.data(), n); });
    bool ok1 = true, ok2 = true;
    for (long long i = 0; i < n; i++) {
        const X want = from_f<X>(in[i]);
        ok1 &= memcmp(&x[i], &want, sizeof(X)) == 0;
        const float wb = to_f(x[i]);
        ok2 &= memcmp(&back[i], &wb, 4) == 0;
    }
    Case k(fmt("convert %-4s       n=%8lld", pname<X>(), n));
    k.expect("f32_to_floatx", ok1);
    k.expect("floatx_to_f32", ok2);
}

int main() {
    uint64_t seed = 1;
    for (long long n : {7LL, 300000LL}) test_norm(n, seed++);  // 300000 > 1024 · 256: two grid-stride steps
    struct A {
        long long n;
        int t;
        double lr;
        bool decay;
        float gs;
    };
    const A as[] = {{1, 1, 1e-3, true, 1.0f}, {7, 3, 6e-4, true, 0.5f}, {1000, 10, 1e-3, false, 1.0f},
                    {65537, 3, 3e-4, true, 0.25f}};
    for (const A& a : as) test_adamw<float>(a.n, a.t, a.lr, a.decay, a.gs, seed++);
    for (const A& a : as) test_adamw<bf16>(a.n, a.t, a.lr, a.decay, a.gs, seed++);
    for (long long n : {1LL, 7LL, 1000LL, 4099LL}) {
        test_convert<float>(n, seed++);
        test_convert<bf16>(n, seed++);
    }
    return finish("optimizer");
}
