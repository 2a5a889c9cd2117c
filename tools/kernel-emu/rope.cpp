// kernels/rope.cu against src/cpu/rope.rs, launched as the header of kernels/rope.cu says
// (grid min(ceil(P/8/256), 8·SMs), block 256, P = N·H·hd/2 pairs).
#include "../../kernels/rope.cu"
#include "harness.h"
#include "rope_tables.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = rope_forward_f32;
    static constexpr auto bwd = rope_backward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto fwd = rope_forward_bf16;
    static constexpr auto bwd = rope_backward_bf16;
};

// misaligned: every buffer (tables included) one element past a 16-byte boundary. in_place: the
// forward writes over inp, the backward (write mode) over dout.
template <typename X>
static void test(int B, int T, int H, int hd, bool accumulate, bool misaligned, bool in_place, uint64_t seed) {
    Rng r(seed);
    const double theta = 10000.0;
    const int N = B * T, W = H * hd;
    const size_t NW = (size_t)N * W, o = misaligned ? 1 : 0, len = NW + o + 1;  // + one element left alone
    const RopeTables tab(T, hd, theta, o);
    std::vector<double> xd, dd, d0;
    auto inp = randn<X>(len, r, 1.0, &xd);
    auto dout = randn<X>(len, r, 1.0, &dd);
    auto dinp0 = randn<X>(len, r, 1.0, &d0);
    std::vector<double> out_r(NW), dinp_r(NW);
    for (int n = 0; n < N; n++)
        for (int h = 0; h < H; h++) {
            const size_t x = o + (size_t)n * W + (size_t)h * hd;
            double o0, o1, g0, g1;
            for (int i = 0; i < hd / 2; i++) {
                ref_rotate(xd[x + i], xd[x + i + hd / 2], tab, n % T, i, &o0, &o1);
                out_r[x - o + i] = o0, out_r[x - o + i + hd / 2] = o1;
                ref_rotate_back(dd[x + i], dd[x + i + hd / 2], tab, n % T, i, &g0, &g1);
                dinp_r[x - o + i] = (accumulate ? d0[x + i] : 0.0) + g0;
                dinp_r[x - o + i + hd / 2] = (accumulate ? d0[x + i + hd / 2] : 0.0) + g1;
            }
        }
    Case k(fmt("rope %-4s B=%d T=%3d H=%2d hd=%3d %s%s%s", pname<X>(), B, T, H, hd, accumulate ? "accumulate" : "write",
               misaligned ? " misaligned" : "", in_place ? " in place" : ""));
    auto slice = [&](const std::vector<X>& v) { return std::vector<X>(v.begin() + o, v.begin() + o + NW); };
    auto untouched = [&](const std::vector<X>& v) {
        return std::isnan(to_f(v[o + NW])) && (o == 0 || std::isnan(to_f(v[0])));
    };
    auto poison_edges = [&](std::vector<X>& v) {
        v[o + NW] = nan_value<X>();
        if (o) v[0] = nan_value<X>();
    };
    std::vector<X> first;
    for (unsigned sms : kSmCounts) {
        const unsigned grid = sm_grid(((size_t)N * H * (hd / 2) + 7) / 8, 256, 8, sms);
        std::vector<X> out = nans<X>(len), in = inp;
        if (in_place) out = inp, poison_edges(out);
        const X* ip = in_place ? out.data() + o : in.data() + o;
        emu::launch("rope_forward", grid, 256, [&] {
            K<X>::fwd(out.data() + o, ip, tab.cos.data() + o, tab.sin.data() + o, N, T, H, hd);
        });
        std::vector<X> dinp = accumulate ? dinp0 : nans<X>(len), dy = dout;
        if (in_place) dinp = dout;
        poison_edges(dinp);
        const X* dyp = in_place ? dinp.data() + o : dy.data() + o;
        emu::launch("rope_backward", grid, 256, [&] {
            K<X>::bwd(dinp.data() + o, dyp, tab.cos.data() + o, tab.sin.data() + o, N, T, H, hd, accumulate ? 1 : 0);
        });
        std::vector<X> all = out;
        all.insert(all.end(), dinp.begin(), dinp.end());
        if (sms != kSmCounts[0]) {
            k.expect(fmt("same bits at %u SMs", sms).c_str(), same_bits(all, first));
            continue;
        }
        first = all;
        k.cmp("out", slice(out), out_r, tol<X>());
        k.cmp("dinp", slice(dinp), dinp_r, tol<X>());
        k.expect("untouched outside", untouched(out) && untouched(dinp));
        // Position 0 is the identity: the first row comes out with the input's bits.
        bool identity = true;
        for (int c = 0; c < W; c++) identity &= to_f(out[o + c]) == to_f(inp[o + c]) || in_place;
        k.expect("position 0 = identity", identity);
    }
}

int main() {
    struct S {
        int B, T, H, hd;
        bool acc, mis, in_place;
    };
    const S cases[] = {
        {1, 1, 1, 2, false, false, false},    {2, 5, 3, 6, true, false, false},    {1, 7, 4, 16, false, false, true},
        {3, 33, 2, 64, true, false, false},   {2, 17, 5, 128, false, false, false}, {1, 9, 3, 34, true, false, false},
        {2, 13, 3, 64, true, true, false},    {1, 11, 2, 16, false, true, true},    {4, 65, 8, 64, false, false, false},
        {1, 300, 4, 128, true, false, false},
    };
    uint64_t seed = 1;
    for (const S& c : cases) {
        test<float>(c.B, c.T, c.H, c.hd, c.acc, c.mis, c.in_place, seed++);
        test<bf16>(c.B, c.T, c.H, c.hd, c.acc, c.mis, c.in_place, seed++);
    }
    return finish("rope");
}
