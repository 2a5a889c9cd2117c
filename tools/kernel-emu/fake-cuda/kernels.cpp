// The kernels the fake driver runs: every kernels/*.cu compiled by g++ through
// tools/kernel-emu/cuda_shim.h, and the registry that maps each extern "C" kernel name to a thunk
// which unpacks cuLaunchKernel's void** arguments with the kernel's own C++ parameter types.
//
// build.sh generates the two included lists from the preprocessed sources (the kernel names are
// built by macros): kernel_sources.inc (#include of each kernels/*.cu) and kernels.inc
// (FAKE_KERNEL(name) per extern "C" kernel). This is the only file that includes the shim (it
// defines the fiber switch) and the only one built with -fdata-sections (see fake.h).
// System headers first: the shim defines __noinline__ and friends as macros.
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_shim.h"
#include "fake.h"
#include "kernel_sources.inc"

namespace fake {
namespace {

template <typename T>
constexpr size_t pointee_align() {
    if constexpr (std::is_pointer_v<T> && !std::is_void_v<std::remove_pointer_t<T>>)
        return alignof(std::remove_pointer_t<T>);
    else
        return 1;
}

// As the driver does: copy sizeof(declared type) bytes from each argument's slot at launch time.
template <typename T>
T load_arg(const void* slot) {
    T v;
    memcpy(&v, slot, sizeof v);
    return v;
}

template <auto F, typename Sig = decltype(F)>
struct Thunk;
template <auto F, typename... A>
struct Thunk<F, void (*)(A...)> {
    static_assert(sizeof...(A) <= kMaxParams, "raise kMaxParams");
    template <size_t... I>
    static void run_with(const char* name, void** p, Dims g, Dims b, unsigned smem, std::index_sequence<I...>) {
        std::tuple<std::remove_cv_t<A>...> args{load_arg<std::remove_cv_t<A>>(p[I])...};
        emu::launch(name, dim3(g.x, g.y, g.z), dim3(b.x, b.y, b.z), smem, [&] { std::apply(F, args); });
    }
    static void run(const char* name, void** p, Dims g, Dims b, unsigned smem) {
        run_with(name, p, g, b, smem, std::index_sequence_for<A...>{});
    }
    static KernelEntry entry(const char* name) {
        return KernelEntry{name,
                           (int)sizeof...(A),
                           {sizeof(A)...},
                           {std::is_pointer_v<A>...},
                           {std::is_floating_point_v<A>...},
                           {pointee_align<A>()...},
                           &run};
    }
};

// A namespace-scope array (not a function static): built before main, never swept by emu.ld.
const KernelEntry g_registry[] = {
#define FAKE_KERNEL(n) Thunk<&n>::entry(#n),
#include "kernels.inc"
#undef FAKE_KERNEL
};

}  // namespace

size_t kernel_count() { return sizeof g_registry / sizeof g_registry[0]; }
const KernelEntry& kernel_at(size_t i) { return g_registry[i]; }
const KernelEntry* find_kernel(const char* name) {
    for (const KernelEntry& e : g_registry)
        if (strcmp(e.name, name) == 0) return &e;
    return nullptr;
}

void run_kernel(const KernelEntry& k, void** params, Dims grid, Dims block, unsigned dynamic_smem, bool refill_shared) {
    emu::refill_shared = refill_shared;
    k.run(k.name, params, grid, block, dynamic_smem);
    emu::refill_shared = true;
}

void current_position(Dims* block, Dims* thread) {
    *block = {blockIdx.x, blockIdx.y, blockIdx.z};
    *thread = {threadIdx.x, threadIdx.y, threadIdx.z};
}

bool in_fiber_stack_guard(uintptr_t addr) {
    for (const emu::Fiber& f : emu::fibers)
        if (f.stack && addr >= (uintptr_t)f.stack - emu::kGuard && addr < (uintptr_t)f.stack) return true;
    return false;
}

uint64_t fiber_switches() { return emu::fiber_switches; }
size_t last_dynamic_smem() { return emu::last_dynamic_smem; }

}  // namespace fake
