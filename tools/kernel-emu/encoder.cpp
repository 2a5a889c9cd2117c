// kernels/encoder.cu against src/cpu/encoder.rs, launched as src/cuda/ops.rs does.
#include "../../kernels/encoder.cu"
#include "harness.h"

using namespace h;

// TokenBuckets::new (src/cuda/ops.rs): positions grouped by token, tokens ascending.
struct Buckets {
    std::vector<int> tokens, starts, positions;
};
static Buckets buckets(const std::vector<int>& inputs) {
    std::vector<int> order(inputs.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return inputs[a] < inputs[b]; });
    Buckets b;
    for (size_t k = 0; k < order.size(); k++) {
        const int token = inputs[order[k]];
        if (b.tokens.empty() || b.tokens.back() != token) {
            b.tokens.push_back(token);
            b.starts.push_back((int)k);
        }
        b.positions.push_back(order[k]);
    }
    b.starts.push_back((int)inputs.size());
    return b;
}

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = encoder_forward_f32;
    static constexpr auto wpe = encoder_backward_wpe_f32;
    static constexpr auto wte = encoder_backward_wte_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = encoder_forward_bf16;
    static constexpr auto wpe = encoder_backward_wpe_bf16;
    static constexpr auto wte = encoder_backward_wte_bf16;
};

template <typename X>
static void test(int B, int T, int C, int Vp, int maxT, uint64_t seed) {
    Rng r(seed);
    const int N = B * T;
    std::vector<int> inp(N);
    for (auto& t : inp) t = r.below(Vp);
    std::vector<double> wte_d, wpe_d, dout_d, dwte0, dwpe0;
    auto wte = randn<X>((size_t)Vp * C, r, 1.0, &wte_d);
    auto wpe = randn<X>((size_t)maxT * C, r, 1.0, &wpe_d);
    auto dout = randn<X>((size_t)N * C, r, 1.0, &dout_d);
    // Parameter gradients accumulate: start from random values.
    auto dwte = randn<float>((size_t)Vp * C, r, 1.0, &dwte0);
    auto dwpe = randn<float>((size_t)maxT * C, r, 1.0, &dwpe0);
    auto out = nans<X>((size_t)N * C);

    // The element-wise kernels at 1 SM (8 blocks, many groups each): grids do not change them.
    emu::launch("encoder_forward", sm_grid(((size_t)N * C + 7) / 8, 256, 8, 1), 256,
                [&] { K<X>::fwd(out.data(), inp.data(), wte.data(), wpe.data(), N, T, C); });
    emu::launch("encoder_backward_wpe", sm_grid(((size_t)T * C + 7) / 8, 256, 8, 1), 256,
                [&] { K<X>::wpe(dwpe.data(), dout.data(), B, T, C); });
    Buckets bk = buckets(inp);
    // One block per position (the launch shape of every batch); those past the bucket count,
    // read from device memory, return at once.
    const int n_buckets = (int)bk.tokens.size();
    emu::launch("encoder_backward_wte", blocks(N, 1), 256, [&] {
        K<X>::wte(dwte.data(), dout.data(), bk.tokens.data(), bk.starts.data(), bk.positions.data(), &n_buckets, C);
    });

    // Reference: encoder_forward and encoder_backward of src/cpu/encoder.rs, in double.
    std::vector<double> out_r((size_t)N * C), dwte_r = dwte0, dwpe_r = dwpe0;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            const size_t o = (size_t)n * C + c;
            out_r[o] = wte_d[(size_t)inp[n] * C + c] + wpe_d[(size_t)(n % T) * C + c];
            dwte_r[(size_t)inp[n] * C + c] += dout_d[o];
            dwpe_r[(size_t)(n % T) * C + c] += dout_d[o];
        }
    Case k(fmt("encoder %-4s B=%d T=%3d C=%3d Vp=%4d maxT=%3d tokens=%zu", pname<X>(), B, T, C, Vp, maxT,
               bk.tokens.size()));
    k.cmp("out", out, out_r, tol<X>());
    k.cmp(pname<X>(), "dwte", as_double(dwte), dwte_r, kTight);
    k.cmp(pname<X>(), "dwpe", as_double(dwpe), dwpe_r, kTight);
}

int main() {
    struct S {
        int B, T, C, Vp, maxT;
    };
    const S shapes[] = {
        {1, 1, 1, 1, 1},     {1, 1, 5, 3, 4},      {2, 7, 33, 50, 9},    {3, 33, 100, 17, 40},
        {2, 130, 7, 1000, 130}, {1, 100, 130, 5, 128}, {4, 64, 768, 300, 70},
    };
    uint64_t seed = 1;
    for (const S& s : shapes) test<float>(s.B, s.T, s.C, s.Vp, s.maxT, seed++);
    for (const S& s : shapes) test<bf16>(s.B, s.T, s.C, s.Vp, s.maxT, seed++);
    return finish("encoder");
}
