// kernels/swiglu.cu against src/cpu/swiglu.rs, launched as the header of kernels/swiglu.cu says
// (grid min(ceil(n/8/256), 8·SMs), block 256).
#include "../../kernels/swiglu.cu"
#include "harness.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = swiglu_forward_f32;
    static constexpr auto bwd = swiglu_backward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = swiglu_forward_bf16;
    static constexpr auto bwd = swiglu_backward_bf16;
};

static double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// misaligned: every buffer starts one element past a 16-byte boundary (the 1-wide path). in_place:
// the forward writes over gate, the backward writes dgate over gate and dup over up.
template <typename X>
static void test(long long n, bool accumulate, bool misaligned, bool in_place, uint64_t seed) {
    Rng r(seed);
    const size_t o = misaligned ? 1 : 0, len = (size_t)n + o + 1;  // one element past n, left alone
    std::vector<double> gd, ud, dd, dg0, du0;
    auto gate = randn<X>(len, r, 3.0, &gd);
    auto up = randn<X>(len, r, 1.0, &ud);
    auto dout = randn<X>(len, r, 1.0, &dd);
    auto dgate0 = randn<X>(len, r, 1.0, &dg0);
    auto dup0 = randn<X>(len, r, 1.0, &du0);
    if (n >= 4)  // far in both tails: e^(−x) overflows to inf or vanishes, and no NaN may come of it
        for (int j = 0; j < 4; j++) {
            gate[o + j] = from_f<X>((j % 2 ? -120.0f : 120.0f) * (j + 1));
            gd[o + j] = to_f(gate[o + j]);
        }
    // The reference (src/cpu/swiglu.rs in double) over elements o .. o+n.
    std::vector<double> out_r(n), dg_r(n), du_r(n);
    for (long long i = 0; i < n; i++) {
        const double g = gd[o + i], u = ud[o + i], d = dd[o + i], s = sigmoid(g);
        out_r[i] = g * s * u;
        dg_r[i] = (accumulate ? dg0[o + i] : 0.0) + d * u * s * (1.0 + g * (1.0 - s));
        du_r[i] = (accumulate ? du0[o + i] : 0.0) + d * g * s;
    }
    Case k(fmt("swiglu %-4s n=%6lld %s%s%s", pname<X>(), n, accumulate ? "accumulate" : "write",
               misaligned ? " misaligned" : "", in_place ? " in place" : ""));
    auto slice = [&](const std::vector<X>& v) { return std::vector<X>(v.begin() + o, v.begin() + o + n); };
    auto untouched = [&](const std::vector<X>& v) {
        return std::isnan(to_f(v[o + n])) && (o == 0 || std::isnan(to_f(v[0])));
    };
    std::vector<X> first;
    for (unsigned sms : kSmCounts) {
        const unsigned grid = sm_grid(((size_t)n + 7) / 8, 256, 8, sms);
        std::vector<X> out = nans<X>(len), gate_in = gate, up_in = up;
        X* outp = out.data() + o;
        if (in_place) {
            gate_in[o + n] = nan_value<X>(), out = gate_in, outp = out.data() + o;
            if (o) out[0] = nan_value<X>();
        }
        const X* gp = in_place ? outp : gate_in.data() + o;
        emu::launch("swiglu_forward", grid, 256, [&] { K<X>::fwd(outp, gp, up_in.data() + o, n); });

        // Backward: dgate, dup start NaN (write) or at random values (accumulate).
        std::vector<X> dgate = accumulate ? dgate0 : nans<X>(len), dup = accumulate ? dup0 : nans<X>(len);
        dgate[o + n] = dup[o + n] = nan_value<X>();
        if (o) dgate[0] = dup[0] = nan_value<X>();
        std::vector<X> gate_b = gate, up_b = up;
        X *dgp = dgate.data() + o, *dup_p = dup.data() + o;
        const X *gbp = gate_b.data() + o, *ubp = up_b.data() + o;
        if (in_place) {  // dgate over gate, dup over up (only in write mode: += needs old values)
            std::copy(gate.begin(), gate.end(), dgate.begin()), std::copy(up.begin(), up.end(), dup.begin());
            dgate[o + n] = dup[o + n] = nan_value<X>();
            if (o) dgate[0] = dup[0] = nan_value<X>();
            gbp = dgp, ubp = dup_p;
        }
        emu::launch("swiglu_backward", grid, 256,
                    [&] { K<X>::bwd(dgp, dup_p, dout.data() + o, gbp, ubp, n, accumulate ? 1 : 0); });

        std::vector<X> all = out;
        all.insert(all.end(), dgate.begin(), dgate.end());
        all.insert(all.end(), dup.begin(), dup.end());
        if (sms != kSmCounts[0]) {
            k.expect(fmt("same bits at %u SMs", sms).c_str(), same_bits(all, first));
            continue;
        }
        first = all;
        k.cmp("out", slice(out), out_r, tol<X>());
        k.cmp("dgate", slice(dgate), dg_r, tol<X>());
        k.cmp("dup", slice(dup), du_r, tol<X>());
        k.expect("untouched outside", untouched(out) && untouched(dgate) && untouched(dup));
    }
}

int main() {
    uint64_t seed = 1;
    struct S {
        long long n;
        bool acc, mis, in_place;
    };
    const S cases[] = {{1, false, false, false},   {7, true, false, false},      {255, false, false, true},
                       {257, true, false, false},  {4096 * 4 + 3, false, false, false},
                       {4096 * 4, true, false, false}, {4096 * 4, false, false, true}, {1000, true, true, false},
                       {1000, false, true, true},  {8 * 256 * 9 + 8, false, false, false}};
    for (const S& c : cases) {
        test<float>(c.n, c.acc, c.mis, c.in_place, seed++);
        test<bf16>(c.n, c.acc, c.mis, c.in_place, seed++);
    }
    return finish("swiglu");
}
