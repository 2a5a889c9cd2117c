// kernels/gqa.cu against pack_qkv / unpack_dqkv of src/cpu/llama.rs (and src/cpu/rope.rs for the
// fused variants), launched as the header of kernels/gqa.cu says (grid min(ceil(P/8/256), 8·SMs),
// block 256). Also: the fused kernels give the bits of rope.cu followed by the plain pack/unpack.
#include "../../kernels/rope.cu"
#undef EXPORT
#include "../../kernels/gqa.cu"
#include "harness.h"
#include "rope_tables.h"

using namespace h;

template <typename X>
struct K;
template <>
struct K<float> {
    static constexpr auto pack = pack_qkv_f32;
    static constexpr auto rope_pack = rope_pack_qkv_f32;
    static constexpr auto unpack = unpack_dqkv_f32;
    static constexpr auto unpack_rope = unpack_rope_dqkv_f32;
    static constexpr auto rope_fwd = rope_forward_f32;
    static constexpr auto rope_bwd = rope_backward_f32;
};
template <>
struct K<bf16> {
    static constexpr auto pack = pack_qkv_bf16;
    static constexpr auto rope_pack = rope_pack_qkv_bf16;
    static constexpr auto unpack = unpack_dqkv_bf16;
    static constexpr auto unpack_rope = unpack_rope_dqkv_bf16;
    static constexpr auto rope_fwd = rope_forward_bf16;
    static constexpr auto rope_bwd = rope_backward_bf16;
};

// A device buffer stand-in: `o` leading elements (to misalign it) and one trailing, all NaN and
// to be left alone, around n elements.
template <typename X>
struct Buf {
    size_t o, n;
    std::vector<X> v;
    Buf(size_t o, size_t n) : o(o), n(n), v(nans<X>(o + n + 1)) {}
    X* p() { return v.data() + o; }
    std::vector<X> body() const { return std::vector<X>(v.begin() + o, v.begin() + o + n); }
    bool edges_untouched() const { return std::isnan(to_f(v[o + n])) && (o == 0 || std::isnan(to_f(v[0]))); }
    void fill(const std::vector<X>& x) { std::copy(x.begin(), x.end(), v.begin() + o); }
};

template <typename X>
static void test(int B, int T, int NH, int NKV, int hd, bool accumulate, bool misaligned, uint64_t seed) {
    Rng r(seed);
    const int N = B * T, C = NH * hd, KVD = NKV * hd, group = NH / NKV, half = hd / 2;
    const size_t o = misaligned ? 1 : 0;
    const RopeTables tab(T, hd, 10000.0, o);
    std::vector<double> qd, kd, vd, dd, dq0d, dk0d, dv0d;
    const auto q = randn<X>((size_t)N * C, r, 1.0, &qd), k = randn<X>((size_t)N * KVD, r, 1.0, &kd),
               v = randn<X>((size_t)N * KVD, r, 1.0, &vd), dqkv = randn<X>((size_t)N * 3 * C, r, 1.0, &dd),
               dq0 = randn<X>((size_t)N * C, r, 1.0, &dq0d), dk0 = randn<X>((size_t)N * KVD, r, 1.0, &dk0d),
               dv0 = randn<X>((size_t)N * KVD, r, 1.0, &dv0d);

    // The references in double: [0] plain, [1] with RoPE.
    std::vector<double> qkv_r[2], dq_r[2], dk_r[2], dv_r[2];
    for (int rope = 0; rope < 2; rope++) {
        auto& P = qkv_r[rope];
        P.assign((size_t)N * 3 * C, 0);
        dq_r[rope] = accumulate ? dq0d : std::vector<double>((size_t)N * C, 0);
        dk_r[rope] = accumulate ? dk0d : std::vector<double>((size_t)N * KVD, 0);
        dv_r[rope] = accumulate ? dv0d : std::vector<double>((size_t)N * KVD, 0);
        for (int n = 0; n < N; n++) {
            // (dst offset, src, src offset, rotate) of one head of a pair-wise copy.
            auto copy = [&](size_t dst, const std::vector<double>& src, size_t s, bool rot) {
                for (int i = 0; i < half; i++) {
                    double a = src[s + i], b = src[s + i + half];
                    if (rot) ref_rotate(src[s + i], src[s + i + half], tab, n % T, i, &a, &b);
                    P[dst + i] = a, P[dst + i + half] = b;
                }
            };
            for (int h = 0; h < NH; h++) {
                const size_t row = (size_t)n * 3 * C, kv = (size_t)n * KVD + (size_t)(h / group) * hd;
                copy(row + (size_t)h * hd, qd, (size_t)n * C + (size_t)h * hd, rope);
                copy(row + C + (size_t)h * hd, kd, kv, rope);
                copy(row + 2 * C + (size_t)h * hd, vd, kv, false);
            }
            // Backward: unpack_dqkv (group sums in increasing head order), then rope_backward.
            const double* d = &dd[(size_t)n * 3 * C];
            std::vector<double> sq(d, d + C), sk(KVD, 0.0), sv(KVD, 0.0);
            for (int h = 0; h < NH; h++)
                for (int x = 0; x < hd; x++) {
                    sk[(h / group) * hd + x] += d[C + h * hd + x];
                    sv[(h / group) * hd + x] += d[2 * C + h * hd + x];
                }
            auto add_back = [&](std::vector<double>& out, size_t at, const std::vector<double>& s, int heads,
                                bool rot) {
                for (int h = 0; h < heads; h++)
                    for (int i = 0; i < half; i++) {
                        double a = s[h * hd + i], b = s[h * hd + i + half];
                        if (rot) ref_rotate_back(s[h * hd + i], s[h * hd + i + half], tab, n % T, i, &a, &b);
                        out[at + h * hd + i] += a, out[at + h * hd + i + half] += b;
                    }
            };
            add_back(dq_r[rope], (size_t)n * C, sq, NH, rope);
            add_back(dk_r[rope], (size_t)n * KVD, sk, NKV, rope);
            add_back(dv_r[rope], (size_t)n * KVD, sv, NKV, false);
        }
    }

    Case c(fmt("gqa %-4s B=%d T=%2d NH=%2d NKV=%2d hd=%3d %s%s", pname<X>(), B, T, NH, NKV, hd,
               accumulate ? "accumulate" : "write", misaligned ? " misaligned" : ""));
    const unsigned long long fwd_pairs = (unsigned long long)N * 3 * NH * half,
                             bwd_pairs = (unsigned long long)N * (NH + 2 * NKV) * half;
    const float *cs = tab.cos.data() + o, *sn = tab.sin.data() + o;
    std::vector<X> first;
    for (unsigned sms : kSmCounts) {
        const unsigned fgrid = sm_grid((fwd_pairs + 7) / 8, 256, 8, sms);
        const unsigned bgrid = sm_grid((bwd_pairs + 7) / 8, 256, 8, sms);
        Buf<X> qb(o, q.size()), kb(o, k.size()), vb(o, v.size()), db(o, dqkv.size());
        qb.fill(q), kb.fill(k), vb.fill(v), db.fill(dqkv);
        Buf<X> qkv[2] = {Buf<X>(o, (size_t)N * 3 * C), Buf<X>(o, (size_t)N * 3 * C)};
        emu::launch("pack_qkv", fgrid, 256, [&] { K<X>::pack(qkv[0].p(), qb.p(), kb.p(), vb.p(), N, NH, NKV, hd); });
        emu::launch("rope_pack_qkv", fgrid, 256,
                    [&] { K<X>::rope_pack(qkv[1].p(), qb.p(), kb.p(), vb.p(), cs, sn, N, T, NH, NKV, hd); });
        std::vector<Buf<X>> dq, dk, dv;
        for (int rope = 0; rope < 2; rope++) {
            dq.emplace_back(o, q.size()), dk.emplace_back(o, k.size()), dv.emplace_back(o, v.size());
            if (accumulate) dq[rope].fill(dq0), dk[rope].fill(dk0), dv[rope].fill(dv0);
        }
        emu::launch("unpack_dqkv", bgrid, 256, [&] {
            K<X>::unpack(dq[0].p(), dk[0].p(), dv[0].p(), db.p(), N, NH, NKV, hd, accumulate ? 1 : 0);
        });
        emu::launch("unpack_rope_dqkv", bgrid, 256, [&] {
            K<X>::unpack_rope(dq[1].p(), dk[1].p(), dv[1].p(), db.p(), cs, sn, N, T, NH, NKV, hd, accumulate ? 1 : 0);
        });

        std::vector<X> all;
        for (auto* b : {&qkv[0], &qkv[1], &dq[0], &dk[0], &dv[0], &dq[1], &dk[1], &dv[1]})
            all.insert(all.end(), b->v.begin(), b->v.end());
        if (sms != kSmCounts[0]) {
            c.expect(fmt("same bits at %u SMs", sms).c_str(), same_bits(all, first));
            continue;
        }
        first = all;
        bool untouched = qb.edges_untouched() && kb.edges_untouched() && vb.edges_untouched() && db.edges_untouched();
        for (auto* b : {&qkv[0], &qkv[1], &dq[0], &dk[0], &dv[0], &dq[1], &dk[1], &dv[1]})
            untouched &= b->edges_untouched();
        // The plain pack and unpack move values: exact (the sums of a group aside).
        c.cmp("qkv", qkv[0].body(), qkv_r[0], 0.0);
        c.cmp("dq", dq[0].body(), dq_r[0], accumulate ? tol<X>() : 0.0);
        c.cmp("dk", dk[0].body(), dk_r[0], group == 1 && !accumulate ? 0.0 : tol<X>());
        c.cmp("dv", dv[0].body(), dv_r[0], group == 1 && !accumulate ? 0.0 : tol<X>());
        c.cmp("rope qkv", qkv[1].body(), qkv_r[1], tol<X>());
        c.cmp("rope dq", dq[1].body(), dq_r[1], tol<X>());
        c.cmp("rope dk", dk[1].body(), dk_r[1], tol<X>());
        c.cmp("rope dv", dv[1].body(), dv_r[1], tol<X>());
        c.expect("untouched outside", untouched);

        // Fused = rope.cu then the plain kernel. Forward: the same bits at both precisions (one
        // rounding of the same rotation). Backward: at f32 (at bf16 the unfused path rounds the
        // group's sum to bf16 before rotating it).
        Buf<X> qr(o, q.size()), kr(o, k.size()), qkv2(o, (size_t)N * 3 * C);
        emu::launch("rope_forward", sm_grid(((size_t)N * NH * half + 7) / 8, 256, 8, sms), 256,
                    [&] { K<X>::rope_fwd(qr.p(), qb.p(), cs, sn, N, T, NH, hd); });
        emu::launch("rope_forward", sm_grid(((size_t)N * NKV * half + 7) / 8, 256, 8, sms), 256,
                    [&] { K<X>::rope_fwd(kr.p(), kb.p(), cs, sn, N, T, NKV, hd); });
        emu::launch("pack_qkv", fgrid, 256, [&] { K<X>::pack(qkv2.p(), qr.p(), kr.p(), vb.p(), N, NH, NKV, hd); });
        c.expect("rope_pack_qkv = rope_forward + pack_qkv (bits)", same_bits(qkv2.v, qkv[1].v));
        if (is_f32<X>) {
            Buf<X> dqr(o, q.size()), dkr(o, k.size()), dvw(o, v.size()), dq2(o, q.size()), dk2(o, k.size());
            if (accumulate) dq2.fill(dq0), dk2.fill(dk0);
            // unpack into fresh buffers (write), then rope_backward into dq2, dk2 (accumulating as
            // the case says); dv is not rotated, so the fused dv must equal the plain one.
            emu::launch("unpack_dqkv", bgrid, 256,
                        [&] { K<X>::unpack(dqr.p(), dkr.p(), dvw.p(), db.p(), N, NH, NKV, hd, 0); });
            emu::launch("rope_backward", sm_grid(((size_t)N * NH * half + 7) / 8, 256, 8, sms), 256,
                        [&] { K<X>::rope_bwd(dq2.p(), dqr.p(), cs, sn, N, T, NH, hd, accumulate ? 1 : 0); });
            emu::launch("rope_backward", sm_grid(((size_t)N * NKV * half + 7) / 8, 256, 8, sms), 256,
                        [&] { K<X>::rope_bwd(dk2.p(), dkr.p(), cs, sn, N, T, NKV, hd, accumulate ? 1 : 0); });
            c.expect("unpack_rope_dqkv = unpack_dqkv + rope_backward (bits)",
                     same_bits(dq2.v, dq[1].v) && same_bits(dk2.v, dk[1].v) && same_bits(dv[0].v, dv[1].v));
        }
    }
}

int main() {
    struct S {
        int B, T, NH, NKV, hd;
        bool acc, mis;
    };
    const S cases[] = {
        {1, 1, 1, 1, 2, false, false},    {2, 5, 4, 2, 6, true, false},     {1, 7, 6, 2, 16, false, false},
        {2, 9, 8, 8, 64, true, false},    {1, 13, 8, 1, 64, false, false},  {3, 17, 12, 4, 128, true, false},
        {1, 11, 4, 2, 34, false, false},  {2, 13, 6, 3, 64, true, true},    {1, 9, 4, 4, 16, false, true},
        {2, 40, 16, 4, 64, false, false},
    };
    uint64_t seed = 1;
    for (const S& c : cases) {
        test<float>(c.B, c.T, c.NH, c.NKV, c.hd, c.acc, c.mis, seed++);
        test<bf16>(c.B, c.T, c.NH, c.NKV, c.hd, c.acc, c.mis, seed++);
    }
    return finish("gqa");
}
