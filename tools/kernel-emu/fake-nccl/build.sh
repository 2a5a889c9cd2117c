#!/usr/bin/env bash
# Builds the fake NCCL: $OUT/libnccl.so.2 and a libnccl.so symlink (OUT defaults to target/fake-nccl
# under the repository root). Put $OUT on LD_LIBRARY_PATH, next to the fake CUDA driver's directory,
# to run finch's multi-process data-parallel training on the CPU (see README.md). Needs no CUDA or
# NCCL installation: g++ and the C library only.
#
#   FAKE_OPT   optimisation flags (default -O2)
#   FAKE_SAN   sanitizers (default none), e.g. undefined, or address,undefined (the latter needs
#              LD_PRELOAD=$(g++ -print-file-name=libasan.so) in the process)
#   CXX        the compiler (default g++)
#
# Skips the build when the library is newer than every input and was built with the same flags.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=${OUT:-$repo/target/fake-nccl}
cxx=${CXX:-g++}
opt=${FAKE_OPT:--O2}
san=${FAKE_SAN-}
mkdir -p "$out/obj"
lib=$out/libnccl.so.2

flags=(-std=c++20 $opt -g1 -fPIC -fvisibility=hidden -pthread -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare
    -I"$here")
[ -n "$san" ] && flags+=(-fsanitize="$san" -fno-sanitize-recover=all)
stamp="$cxx ${flags[*]}"

inputs=("$here"/*.cpp "$here"/*.h "$here/build.sh")
if [ -f "$lib" ] && [ "$(cat "$out/obj/flags" 2>/dev/null)" = "$stamp" ]; then
    newer=$(find "${inputs[@]}" -newer "$lib" 2>/dev/null | grep -v selftest.cpp | head -1 || true)
    if [ -z "$newer" ]; then
        echo "fake-nccl: $lib is up to date"
        exit 0
    fi
fi
start=$SECONDS

# One compile at a time (the machine may be busy).
objs=()
for src in reduce segment nccl; do
    "$cxx" "${flags[@]}" -c "$here/$src.cpp" -o "$out/obj/$src.o"
    objs+=("$out/obj/$src.o")
done
# Export NCCL's API only (and the counters reader).
printf '{\n  global: nccl*; fake_nccl_*;\n  local: *;\n};\n' > "$out/obj/exports.map"
"$cxx" "${flags[@]}" -shared "${objs[@]}" -Wl,-soname,libnccl.so.2 -Wl,--no-undefined \
    -Wl,--version-script="$out/obj/exports.map" -ldl -lrt -o "$lib.tmp"
mv "$lib.tmp" "$lib"
ln -sf libnccl.so.2 "$out/libnccl.so"
echo "$stamp" > "$out/obj/flags"
echo "fake-nccl: built $lib ($((SECONDS - start)) s)"
