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
    double first = NAN;
    bool same = true;
    for (unsigned sms : kSmCounts) {  // grid min(units, 8·SMs): the same bits
        std::vector<double> scratch(NORM_BLOCKS + 1, NAN);
        emu::launch("grad_norm_squares", sm_grid(NORM_BLOCKS, 1, 8, sms), 256,
                    [&] { grad_norm_squares(scratch.data(), grads.data(), n, NORM_BLOCKS); });
        double* total = scratch.data() + NORM_BLOCKS;
        emu::launch("grad_norm_finish", 1, 256, [&] { grad_norm_finish(total, scratch.data(), NORM_BLOCKS); });
        if (std::isnan(first)) first = *total;
        same &= memcmp(total, &first, 8) == 0;
    }
    double ref = 0;  // global_norm(grads)², summed in f64
    for (double g : gd) ref += g * g;
    Case k(fmt("grad_norm          n=%8lld", n));
    k.cmp("f32", "norm_squared", {first}, {ref}, kTight);
    k.expect("same bits at every SM count", same);
}

// step_finish against clip_coefficient (src/cpu/optimizer.rs: torch's rule) and the host's
// finiteness test.
static void test_step_finish(double loss, double norm_sq, double max_norm) {
    StepState st{loss, norm_sq, 0.0, 0.0, NAN, NAN, -1};
    emu::launch("step_finish", 1, 32, [&] { step_finish(&st, max_norm); });
    const double norm = std::sqrt(norm_sq), coef = max_norm / (norm + 1e-6);
    const float scale = (float)((max_norm <= 0.0 || coef >= 1.0) ? 1.0 : coef);
    const bool finite = std::isfinite(loss) && std::isfinite(norm);
    Case k(fmt("step_finish        loss=%g norm_sq=%g max_norm=%g", loss, norm_sq, max_norm));
    k.expect("norm", st.norm == norm || (std::isnan(norm) && std::isnan(st.norm)));
    k.expect("grad_scale", st.grad_scale == scale);
    k.expect("finite", st.finite == (int)finite);
    k.expect("loss, norm_sq untouched", st.loss == loss || (std::isnan(loss) && std::isnan(st.loss)));
}

// One AdamW step over tensors of the given sizes, alternately decayed and not, cut into chunks
// of at most `chunk` elements as src/cuda/model.rs's adamw_chunks does, with the scalars of
// ops.rs AdamWScalars (AdamWConfig::step formed in f64 and rounded to f32), from random m, v and
// master weights; against AdamW::update in double. With finite = 0 nothing may change.
template <typename X>
static void test_adamw(std::vector<long long> sizes, int chunk, int t, double lr, float grad_scale, bool finite,
                       uint64_t seed) {
    Rng r(seed);
    const double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1;
    const AdamWParams hp{(float)(lr / (1.0 - std::pow(beta1, t))), (float)std::sqrt(1.0 - std::pow(beta2, t)),
                         (float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2), (float)eps, (float)(1.0 - lr * wd)};
    std::vector<AdamWChunk> chunks;
    std::vector<int> decayed;  // per element
    long long n = 0;
    for (size_t k = 0; k < sizes.size(); k++) {
        for (long long s = 0; s < sizes[k]; s += chunk)
            chunks.push_back({n + s, (int)std::min<long long>(chunk, sizes[k] - s), (int)(k % 2 == 0)});
        decayed.insert(decayed.end(), sizes[k], k % 2 == 0);
        n += sizes[k];
    }
    const StepState st{1.0, 1.0, 0.0, 0.0, 1.0, grad_scale, finite};
    std::vector<double> pd, gd, md, vd;
    auto master = randn<float>((size_t)n, r, 0.1, &pd);
    auto grads = randn<float>((size_t)n, r, 1e-2, &gd);
    auto m = randn<float>((size_t)n, r, 1e-3, &md);
    auto v = randn<float>((size_t)n, r, 1e-4, &vd);
    for (size_t i = 0; i < v.size(); i++) v[i] = v[i] * v[i], vd[i] = v[i];  // v >= 0
    auto params = nans<X>((size_t)n);
    const auto master0 = master, m0 = m, v0 = v;
    // At 1 SM the 8 blocks take many chunks each (element-wise: nothing else to compare).
    emu::launch("adamw", sm_grid(chunks.size(), 1, 8, 1), 256, [&] {
        K<X>::adamw(params.data(), master.data(), grads.data(), m.data(), v.data(), chunks.data(), (int)chunks.size(),
                    &hp, &st);
    });
    Case k(fmt("adamw %-4s chunk=%4d n=%8lld tensors=%zu t=%d lr=%g grad_scale=%g finite=%d", pname<X>(), chunk, n,
               sizes.size(), t, lr, grad_scale, finite));
    if (!finite) {
        bool same = memcmp(master.data(), master0.data(), 4 * n) == 0 && memcmp(m.data(), m0.data(), 4 * n) == 0 &&
                    memcmp(v.data(), v0.data(), 4 * n) == 0;
        bool untouched = true;
        for (const X& p : params) untouched &= std::isnan(to_f(p));
        k.expect("state unchanged", same);
        k.expect("params unwritten", untouched);
        return;
    }
    // AdamW::update on the clipped gradient (clip_grad_norm scales grads by the factor first).
    std::vector<double> p_r(n), m_r(n), v_r(n), delta_r(n), delta(n);
    for (long long i = 0; i < n; i++) {
        const double g = gd[i] * (double)grad_scale;
        double p = pd[i] * (decayed[i] ? (double)hp.decay : 1.0);
        const double mi = md[i] + (double)hp.one_minus_beta1 * (g - md[i]);
        const double vi = vd[i] * (double)hp.beta2 + (double)hp.one_minus_beta2 * g * g;
        p -= (double)hp.step_size * mi / (std::sqrt(vi) / (double)hp.bc2_sqrt + (double)hp.eps);
        p_r[i] = p, m_r[i] = mi, v_r[i] = vi;
        delta_r[i] = p - pd[i];
        delta[i] = (double)master[i] - pd[i];
    }
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
    emu::launch("f32_to_floatx", sm_grid(n, 256, 8, 1), 256, [&] { K<X>::to_x(x.data(), in.data(), n); });
    auto back = nans<float>((size_t)n);
    emu::launch("floatx_to_f32", sm_grid(n, 256, 8, 1), 256, [&] { K<X>::to_f32(back.data(), x.data(), n); });
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
    // 1100003 > 1024 · 256 · 4: two grid-stride steps of 4-float groups, and a tail of 3.
    for (long long n : {7LL, 1100003LL}) test_norm(n, seed++);
    test_step_finish(3.5, 4.0, 1.0);       // clipped: 1 / (2 + 1e-6)
    test_step_finish(3.5, 0.25, 1.0);      // below the limit: 1
    test_step_finish(3.5, 4.0, 0.0);       // no clipping: 1
    test_step_finish(NAN, 4.0, 1.0);       // loss not finite
    test_step_finish(3.5, INFINITY, 1.0);  // norm not finite
    struct A {
        std::vector<long long> sizes;
        int chunk, t;
        double lr;
        float gs;
        bool finite;
    };
    const A as[] = {{{1}, 4096, 1, 1e-3, 1.0f, true},
                    {{7, 5}, 4, 3, 6e-4, 0.5f, true},
                    {{1000, 300, 4097}, 4096, 10, 1e-3, 1.0f, true},
                    {{65537, 768}, 1000, 3, 3e-4, 0.25f, true},
                    {{3000, 17}, 256, 2, 1e-3, 1.0f, false}};
    for (const A& a : as) test_adamw<float>(a.sizes, a.chunk, a.t, a.lr, a.gs, a.finite, seed++);
    for (const A& a : as) test_adamw<bf16>(a.sizes, a.chunk, a.t, a.lr, a.gs, a.finite, seed++);
    for (long long n : {1LL, 7LL, 1000LL, 4099LL}) {
        test_convert<float>(n, seed++);
        test_convert<bf16>(n, seed++);
    }
    return finish("optimizer");
}
