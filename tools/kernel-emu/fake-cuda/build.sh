#!/usr/bin/env bash
# Builds the fake CUDA driver: $OUT/libcuda.so.1 and a libcuda.so symlink (OUT defaults to
# target/fake-cuda under the repository root), from kernels/*.cu through tools/kernel-emu. Put
# $OUT on LD_LIBRARY_PATH to run finch's GPU code on the CPU (see README.md).
#
#   FAKE_OPT   optimisation flags (default -O2)
#   FAKE_SAN   sanitizers (default bounds: indexing of fixed-size arrays, __shared__ ones
#              included, ~10% slower; empty for none), e.g. undefined, or address,undefined (the
#              latter needs LD_PRELOAD=$(g++ -print-file-name=libasan.so) in the process)
#   CXX        the compiler (default g++)
#
# Skips the build when the library is newer than every input and was built with the same flags.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
emu=$(dirname "$here")
repo=$(cd "$emu/../.." && pwd)
out=${OUT:-$repo/target/fake-cuda}
cxx=${CXX:-g++}
opt=${FAKE_OPT:--O2}
san=${FAKE_SAN-bounds}
mkdir -p "$out/obj"
lib=$out/libcuda.so.1

flags=(-std=c++20 $opt -g1 -fPIC -fvisibility=hidden -fno-strict-aliasing -Wall -Wno-unknown-pragmas
    -Wno-sign-compare -I"$out/obj" -I"$emu" -I"$repo/kernels" -I"$here")
[ -n "$san" ] && flags+=(-fsanitize="$san" -fno-sanitize-recover=all -DFAKE_SANITIZER)
stamp="$cxx ${flags[*]}"

inputs=("$repo"/kernels/* "$emu"/*.h "$emu/emu.ld" "$here"/*.cpp "$here"/*.h "$here/build.sh")
if [ -f "$lib" ] && [ "$(cat "$out/obj/flags" 2>/dev/null)" = "$stamp" ]; then
    newer=$(find "${inputs[@]}" -newer "$lib" 2>/dev/null | head -1)
    if [ -z "$newer" ]; then
        echo "fake-cuda: $lib is up to date"
        exit 0
    fi
fi
start=$SECONDS

# The kernel sources, one translation unit (each file defines its own EXPORT macro).
for f in "$repo"/kernels/*.cu; do
    printf '#include "%s"\n#undef EXPORT\n' "$(basename "$f")"
done > "$out/obj/kernel_sources.inc"
# The registry: every extern "C" kernel, read from the preprocessed sources because the names are
# built by macros (FINCH_FOR_EACH_FLOATX).
for f in "$repo"/kernels/*.cu; do
    "$cxx" -x c++ -std=c++20 -E -P -I"$emu" -I"$repo/kernels" "$f" | tr '\n' ' ' |
        grep -o 'extern "C" *void *[A-Za-z0-9_]* *(' | sed 's/extern "C" *void *\([A-Za-z0-9_]*\).*/FAKE_KERNEL(\1)/' |
        grep -v '^FAKE_KERNEL(emu_' || true
done > "$out/obj/kernels.inc"
count=$(wc -l < "$out/obj/kernels.inc")
if [ "$count" -eq 0 ]; then
    echo "fake-cuda: no extern \"C\" kernel found in kernels/*.cu" >&2
    exit 1
fi
if [ "$(sort "$out/obj/kernels.inc" | uniq -d | wc -l)" -ne 0 ]; then
    echo "fake-cuda: a kernel name is defined twice: $(sort "$out/obj/kernels.inc" | uniq -d | tr '\n' ' ')" >&2
    exit 1
fi

# One compile at a time (the machine may be busy). Only kernels.cpp gets -fdata-sections: that is
# what lets emu.ld gather the kernels' __shared__ statics, and nothing of the driver's.
objs=()
for src in ptx memory driver kernels; do
    extra=()
    [ $src = kernels ] && extra=(-fdata-sections)
    "$cxx" "${flags[@]}" "${extra[@]}" -c "$here/$src.cpp" -o "$out/obj/$src.o"
    objs+=("$out/obj/$src.o")
done
# Export the driver API only (not the C++ library's template instances, nor the emulator's).
printf '{\n  global: cu*; fake_cuda_*;\n  local: *;\n};\n' > "$out/obj/exports.map"
"$cxx" "${flags[@]}" -shared "${objs[@]}" -Wl,-T,"$emu/emu.ld" -Wl,-soname,libcuda.so.1 -Wl,--no-undefined \
    -Wl,--version-script="$out/obj/exports.map" -lpthread -o "$lib.tmp"

# The range refilled with 0xFF before every block must hold the kernels' statics only.
strays=$(nm -C --defined-only "$lib.tmp" | sort |
    awk '/ __emu_shared_start$/ {f = 1; next} / __emu_shared_end$/ {f = 0} f' | grep -E 'fake::|emu::|std::' || true)
if [ -n "$strays" ]; then
    echo "fake-cuda: these statics would be overwritten before every block (see fake.h):" >&2
    echo "$strays" >&2
    exit 1
fi
mv "$lib.tmp" "$lib"
ln -sf libcuda.so.1 "$out/libcuda.so"
echo "$stamp" > "$out/obj/flags"
echo "fake-cuda: built $lib ($count kernels, $((SECONDS - start)) s)"
