// kernels/gelu.cu against src/cpu/gelu.rs, launched as src/cuda/ops.rs does.
#include "../../kernels/gelu.cu"
#include "harness.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = gelu_forward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = gelu_forward_bf16;
};

template <typename X>
static void test(long long n, uint64_t seed) {
    Rng r(seed);
    std::vector<double> xd;
    auto inp = randn<X>((size_t)n, r, 3.0, &xd);
    // One element past n, which the kernel must leave alone.
    auto out = nans<X>((size_t)n + 1);
    emu::launch("gelu_forward", blocks((size_t)n, 256), 256, [&] { K<X>::fwd(out.data(), inp.data(), n); });
    std::vector<double> ref((size_t)n);
    const double s = std::sqrt(2.0 / M_PI);
    for (long long i = 0; i < n; i++) {
        const double x = xd[i];
        ref[i] = 0.5 * x * (1.0 + std::tanh(s * (x + 0.044715 * x * x * x)));
    }
    Case k(fmt("gelu_forward %-4s n=%6lld", pname<X>(), n));
    k.cmp("out", std::vector<X>(out.begin(), out.begin() + n), ref, tol<X>());
    k.expect("untouched past n", std::isnan(to_f(out[n])));
}

int main() {
    uint64_t seed = 1;
    for (long long n : {1LL, 255LL, 257LL, 4096LL * 4 + 3}) {
        test<float>(n, seed++);
        test<bf16>(n, seed++);
    }
    return finish("gelu");
}
