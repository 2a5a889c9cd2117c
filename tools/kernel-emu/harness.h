// Helpers shared by the per-family harnesses: random tensors, poisoned outputs, comparison with a
// double-precision reference, and the summary. Include after the kernel file.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <map>
#include <string>

#include "cuda_shim.h"

namespace h {

using bf16 = __nv_bfloat16;

template <typename X>
constexpr bool is_f32 = std::is_same_v<X, float>;
template <typename X>
constexpr const char* pname() {
    return is_f32<X> ? "f32" : "bf16";
}
// Tolerance on max |got - ref| / max |ref| for outputs stored as X, or that pass through a value
// rounded to X; kTight for fp32 outputs computed from exactly represented inputs.
template <typename X>
constexpr double tol() {
    return is_f32<X> ? 2e-5 : 1.6e-2;
}
constexpr double kTight = 2e-5;

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { return __bfloat162float(x); }
template <typename X>
inline X from_f(float f) {
    if constexpr (is_f32<X>) return f;
    else return __float2bfloat16_rn(f);
}
template <typename X>
inline X nan_value() {
    if constexpr (is_f32<X>) return NAN;
    else return bf16{0xffff};
}

struct Rng {
    std::mt19937_64 g;
    explicit Rng(uint64_t seed) : g(seed) {}
    float normal() { return std::normal_distribution<float>()(g); }
    int below(int n) { return std::uniform_int_distribution<int>(0, n - 1)(g); }
};

// n values ~ N(0, scale²), rounded to X; `ref` (if given) gets exactly the stored values.
template <typename X>
inline std::vector<X> randn(size_t n, Rng& r, double scale = 1.0, std::vector<double>* ref = nullptr) {
    std::vector<X> v(n);
    for (auto& x : v) x = from_f<X>((float)(scale * r.normal()));
    if (ref) {
        ref->resize(n);
        for (size_t i = 0; i < n; i++) (*ref)[i] = to_f(v[i]);
    }
    return v;
}
template <typename X>
inline std::vector<double> as_double(const std::vector<X>& v) {
    std::vector<double> d(v.size());
    for (size_t i = 0; i < v.size(); i++) d[i] = to_f(v[i]);
    return d;
}
template <typename X>
inline std::vector<X> nans(size_t n) {
    return std::vector<X>(n, nan_value<X>());
}
// The grid size ops.rs computes: ceil(n / per), at least 1.
inline unsigned blocks(size_t n, size_t per) { return (unsigned)std::max<size_t>(1, (n + per - 1) / per); }
// The grid src/cuda/ops.rs (Ops::grid_for) gives `units` of work on a GPU with `sms` SMs.
inline unsigned sm_grid(size_t units, size_t per_block, unsigned per_sm, unsigned sms) {
    return std::min<unsigned>(blocks(units, per_block), per_sm * sms);
}
// SM counts the grid-sized kernels are run at, whose results must be the same bits: an H100's
// and one SM (every block then takes many units).
constexpr unsigned kSmCounts[] = {132, 1};
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// max |got - ref| / max |ref|, NaN-aware (a NaN makes it NaN).
inline double relerr(const std::vector<double>& got, const std::vector<double>& ref) {
    double mx = 0, e = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        mx = std::max(mx, std::fabs(ref[i]));
        const double d = std::fabs(got[i] - ref[i]);
        if (!(d <= e)) e = d;
    }
    return e / (mx > 0 ? mx : 1.0);
}

inline int failures = 0, cases = 0;
inline std::map<std::string, double> worst;  // "precision output" -> largest error seen

// One test case: a description and the comparisons made, printed as one line.
struct Case {
    std::string desc, errs;
    bool ok = true;
    explicit Case(std::string d) : desc(std::move(d)) {}
    // Compares got with ref: error = max |got - ref| / max |ref|; any non-finite value in got
    // where ref is finite fails (unwritten NaN-poisoned elements).
    void cmp(const char* prec, const char* name, const std::vector<double>& got, const std::vector<double>& ref,
             double tolerance) {
        if (got.size() != ref.size()) {
            ok = false;
            errs += std::string(" ") + name + " SIZE MISMATCH";
            return;
        }
        double mx = 0, e = 0;
        size_t bad = 0, first_bad = 0, worst_i = 0;
        for (size_t i = 0; i < ref.size(); i++) mx = std::max(mx, std::fabs(ref[i]));
        for (size_t i = 0; i < ref.size(); i++) {
            if (!std::isfinite(got[i]) && std::isfinite(ref[i])) {
                if (bad++ == 0) first_bad = i;
                continue;
            }
            const double d = std::fabs(got[i] - ref[i]);
            if (d > e) e = d, worst_i = i;
        }
        const double rel = e / (mx > 0 ? mx : 1.0);
        char buf[256];
        if (bad) {
            snprintf(buf, sizeof buf, " %s %zu NON-FINITE (first at %zu: got %g, want %g)", name, bad, first_bad,
                     got[first_bad], ref[first_bad]);
            ok = false;
        } else {
            snprintf(buf, sizeof buf, " %s %.1e", name, rel);
            if (!(rel <= tolerance)) {
                ok = false;
                char more[160];
                snprintf(more, sizeof more, " (> %.1e; worst at %zu: got %.7g want %.7g)", tolerance, worst_i,
                         got[worst_i], ref[worst_i]);
                strncat(buf, more, sizeof buf - strlen(buf) - 1);
            }
        }
        errs += buf;
        double& w = worst[std::string(prec) + " " + name];
        w = std::max(w, bad ? INFINITY : rel);
    }
    template <typename X>
    void cmp(const char* name, const std::vector<X>& got, const std::vector<double>& ref, double tolerance) {
        cmp(pname<X>(), name, as_double(got), ref, tolerance);
    }
    // A yes/no check (exact comparisons, expected failures).
    void expect(const char* name, bool cond) {
        ok &= cond;
        errs += std::string(" ") + name + (cond ? ": yes" : ": NO");
    }
    ~Case() {
        ++cases;
        if (!ok) ++failures;
        printf("%s %s |%s\n", ok ? "ok  " : "FAIL", desc.c_str(), errs.c_str());
        fflush(stdout);
    }
};

inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// Runs `body` (which should trip one of the emulator's checks) in a child process: the case
// passes when the child fails and its stderr contains `message`.
inline void expect_failure(const char* name, const char* message, const std::function<void()>& body) {
    char path[] = "/tmp/emu-selftest-XXXXXX";
    const int fd = mkstemp(path);
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, 2);
        body();
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    std::string err;
    char buf[4096];
    ssize_t n;
    lseek(fd, 0, SEEK_SET);
    while ((n = read(fd, buf, sizeof buf)) > 0) err.append(buf, (size_t)n);
    close(fd);
    unlink(path);
    const bool failed = !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    Case k(fmt("emulator rejects %s", name));
    k.expect("fails", failed);
    k.expect(fmt("says '%s'", message).c_str(), err.find(message) != std::string::npos);
    if (!k.ok) k.errs += " | child stderr: " + err.substr(0, 600);
}

// Prints the largest error per precision and output, and returns main's exit status.
inline int finish(const char* family) {
    printf("%s: %d cases, %d failed; largest errors (max |got - ref| / max |ref|):\n", family, cases, failures);
    for (auto& [k, v] : worst) printf("  %-28s %.2e\n", k.c_str(), v);
    printf("  (%llu launches, %llu fiber switches)\n", (unsigned long long)emu::launches,
           (unsigned long long)emu::fiber_switches);
    return failures ? 1 : 0;
}

}  // namespace h
