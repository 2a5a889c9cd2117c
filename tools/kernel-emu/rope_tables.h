// The RoPE angle tables for the rope and gqa harnesses, and the rotation of src/cpu/rope.rs in
// double. Include after harness.h.
#pragma once

// rope_tables of src/cpu/rope.rs: (T, hd/2) cos and sin of pos · θ^(−2i/hd), computed in f64.
// `cos`/`sin` are what the host hands the kernels (rounded once to f32), after `pad` NaN floats
// (to misalign them); `cosd`/`sind` the f64 values, for the reference (the CPU op at f64).
struct RopeTables {
    int half;
    std::vector<float> cos, sin;
    std::vector<double> cosd, sind;
    RopeTables(int T, int hd, double theta, size_t pad) : half(hd / 2) {
        cos.assign(pad, NAN), sin.assign(pad, NAN);
        for (int pos = 0; pos < T; pos++)
            for (int i = 0; i < half; i++) {
                const double inv_freq = 1.0 / std::pow(theta, (double)(2 * i) / hd);
                const double angle = pos * inv_freq;
                cosd.push_back(std::cos(angle)), sind.push_back(std::sin(angle));
                cos.push_back((float)std::cos(angle)), sin.push_back((float)std::sin(angle));
            }
    }
};

// rope_forward's rotation of the pair (x0, x1) = (channel i, channel i + hd/2) at position pos.
inline void ref_rotate(double x0, double x1, const RopeTables& t, int pos, int i, double* o0, double* o1) {
    const double c = t.cosd[(size_t)pos * t.half + i], s = t.sind[(size_t)pos * t.half + i];
    *o0 = x0 * c - x1 * s;
    *o1 = x1 * c + x0 * s;
}
// rope_backward's: the transpose.
inline void ref_rotate_back(double g0, double g1, const RopeTables& t, int pos, int i, double* d0, double* d1) {
    const double c = t.cosd[(size_t)pos * t.half + i], s = t.sind[(size_t)pos * t.half + i];
    *d0 = g0 * c + g1 * s;
    *d1 = g1 * c - g0 * s;
}
