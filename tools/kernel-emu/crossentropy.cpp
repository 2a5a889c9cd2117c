// kernels/crossentropy.cu against src/cpu/crossentropy.rs, launched as src/cuda/ops.rs does.
#include "../../kernels/crossentropy.cu"
#include "harness.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = crossentropy_forward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = crossentropy_forward_bf16;
};

enum class Grad { None, Separate, InPlace };

template <typename X>
static void test(int N, int V, int Vp, double scale, Grad grad, uint64_t seed) {
    Rng r(seed);
    const size_t NV = (size_t)N * Vp;
    std::vector<double> zd;
    auto logits = randn<X>(NV, r, scale, &zd);
    // Huge padded logits: they must neither enter the softmax nor get a gradient.
    for (int n = 0; n < N; n++)
        for (int v = V; v < Vp; v++) logits[(size_t)n * Vp + v] = from_f<X>(1000.0f), zd[(size_t)n * Vp + v] = 1000.0;
    std::vector<int> targets(N);
    for (auto& t : targets) t = r.below(V);
    // One row whose target probability underflows in fp32.
    if (N > 2 && V > 1) {
        targets[1] = 0;
        logits[(size_t)Vp] = from_f<X>(-150.0f), zd[Vp] = -150.0;
    }
    const float dloss = grad == Grad::None ? 0.0f : (float)(0.7 / N);

    // At each SM count (grid min(N, 8·SMs), blocks taking rows grid-stride): the same bits.
    const auto logits0 = logits;
    std::vector<float> losses, first_losses;
    std::vector<X> dlogits, first_grad;
    bool same = true;
    for (unsigned sms : kSmCounts) {
        logits = logits0;
        losses = nans<float>(N);
        dlogits = nans<X>(NV);
        X* dl_ptr = grad == Grad::None ? nullptr : grad == Grad::Separate ? dlogits.data() : logits.data();
        emu::launch("crossentropy_forward", sm_grid(N, 1, 8, sms), 256,
                    [&] { K<X>::fwd(losses.data(), dl_ptr, logits.data(), targets.data(), N, V, Vp, dloss); });
        const std::vector<X>& g = grad == Grad::InPlace ? logits : dlogits;
        if (first_losses.empty()) first_losses = losses, first_grad = g;
        same &= same_bits(losses, first_losses) && same_bits(g, first_grad);
    }

    // Reference: softmax_crossentropy_forward, then the gradient (p - onehot)·dloss, written.
    std::vector<double> loss_r(N), dl_r(NV, 0.0);
    for (int n = 0; n < N; n++) {
        const double* z = &zd[(size_t)n * Vp];
        double mx = -INFINITY, sum = 0;
        for (int v = 0; v < V; v++) mx = std::max(mx, z[v]);
        for (int v = 0; v < V; v++) sum += std::exp(z[v] - mx);
        loss_r[n] = mx + std::log(sum) - z[targets[n]];
        for (int v = 0; v < V; v++)
            dl_r[(size_t)n * Vp + v] = (std::exp(z[v] - mx) / sum - (v == targets[n] ? 1.0 : 0.0)) * (double)dloss;
    }
    const char* gn = grad == Grad::None ? "no dlogits" : grad == Grad::Separate ? "dlogits" : "dlogits in place";
    Case k(fmt("crossentropy %-4s N=%2d V=%5d Vp=%5d scale=%.0f %s", pname<X>(), N, V, Vp, scale, gn));
    k.cmp(pname<X>(), "losses", as_double(losses), loss_r, kTight);
    k.expect("same bits at every SM count", same);
    if (grad == Grad::Separate) k.cmp("dlogits", dlogits, dl_r, tol<X>());
    if (grad == Grad::InPlace) k.cmp("dlogits", logits, dl_r, tol<X>());
    if (grad != Grad::None) {  // the padding gradient must be exactly 0
        const std::vector<X>& d = grad == Grad::Separate ? dlogits : logits;
        bool zero = true;
        for (int n = 0; n < N; n++)
            for (int v = V; v < Vp; v++) zero &= to_f(d[(size_t)n * Vp + v]) == 0.0f;
        k.expect("padding", zero);
    }
}

// loss_accumulate: acc += mean(losses) / accum, in double, added to what acc already holds (the
// micro-batches of one step), against the host's sum in double.
static void test_accumulate(int N, int accum, uint64_t seed) {
    Rng r(seed);
    std::vector<double> ld;
    auto losses = randn<float>((size_t)N, r, 2.0, &ld);
    double acc = 0.25, ref = 0.25;
    for (int k = 0; k < accum; k++) {
        emu::launch("loss_accumulate", 1, 256, [&] { loss_accumulate(&acc, losses.data(), N, accum); });
        double sum = 0;
        for (double l : ld) sum += l;
        ref += sum / N / accum;
    }
    Case k(fmt("loss_accumulate   N=%5d accum=%d", N, accum));
    k.cmp("f32", "acc", {acc}, {ref}, 1e-12);  // two double sums in different orders
}

int main() {
    for (int N : {1, 7, 256, 1000, 8192}) test_accumulate(N, N % 2 ? 1 : 4, 1000 + N);
    struct S {
        int N, V, Vp;
        double scale;
    };
    const S shapes[] = {{1, 1, 1, 1}, {7, 7, 8, 4}, {33, 100, 130, 4}, {5, 1000, 1024, 2}, {3, 50257, 50304, 3}};
    uint64_t seed = 1;
    for (int p = 0; p < 2; p++)
        for (const S& s : shapes)
            for (Grad g : {Grad::None, Grad::Separate, Grad::InPlace}) {
                if (p == 0) test<float>(s.N, s.V, s.Vp, s.scale, g, seed++);
                else test<bf16>(s.N, s.V, s.Vp, s.scale, g, seed++);
            }
    return finish("crossentropy");
}
