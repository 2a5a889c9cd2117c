#!/usr/bin/env bash
# Builds the fake CUDA driver (build.sh) and its self-test, then runs the self-test: every refusal,
# the guard pages, the knobs, real launches against the CPU. When nvcc is found (as build.rs or
# .ci/run would find it), kernels/*.cu are also compiled to PTX with build.rs's flags and the
# real PTX is loaded and checked against ptxas -v. Exits non-zero on any failure.
#
#   tools/kernel-emu/fake-cuda/selftest.sh        (OUT: as build.sh, default target/fake-cuda)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=${OUT:-$repo/target/fake-cuda}
cxx=${CXX:-g++}
start=$SECONDS
OUT=$out bash "$here/build.sh"
mkdir -p "$out/selftest"

# nvcc: $NVCC, $CUDA_HOME/bin, PATH, then where .ci/run installs it.
nvcc=${NVCC:-}
[ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && nvcc=$CUDA_HOME/bin/nvcc
[ -z "$nvcc" ] && nvcc=$(command -v nvcc || true)
ci_nvcc=${FINCH_CUDA_DIR:-$HOME/.cache/finch/cuda-13.0}/nvidia/cu13/bin/nvcc
[ -z "$nvcc" ] && [ -x "$ci_nvcc" ] && nvcc=$ci_nvcc
ptx_dir=
if [ -n "$nvcc" ]; then
    ptx_dir=$out/selftest/ptx
    mkdir -p "$ptx_dir"
    ptxas=$(dirname "$nvcc")/ptxas
    for src in "$repo"/kernels/*.cu; do
        stem=$(basename "$src" .cu)
        for arch in compute_80:sm_80 compute_90a:sm_90a; do
            ptx=$ptx_dir/$stem.${arch%%:*}.ptx
            if [ ! "$ptx" -nt "$src" ] || [ -n "$(find "$repo/kernels" -newer "$ptx" | head -1)" ]; then
                (cd "$repo" && "$nvcc" -ptx -O3 -std=c++17 -lineinfo -arch="${arch%%:*}" -Ikernels -o "$ptx" "$src")
                if [ -x "$ptxas" ]; then
                    "$ptxas" -v -arch="${arch##*:}" -o /dev/null "$ptx" 2> "$ptx.ptxas"
                else
                    : > "$ptx.ptxas"
                fi
            fi
        done
    done
    cat "$ptx_dir"/*.ptxas > "$ptx_dir/ptxas.txt"
    echo "selftest: real PTX from $nvcc in $ptx_dir"
else
    echo "selftest: no nvcc found (NVCC, CUDA_HOME, PATH): the real-PTX case is skipped"
fi

"$cxx" -std=c++20 -O1 -g -Wall -Wno-sign-compare "$here/selftest.cpp" -ldl -lpthread -o "$out/selftest/selftest"
# LD_LIBRARY_PATH: one case loads the library by name, as cudarc does.
LD_LIBRARY_PATH="$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$out/selftest/selftest" "$out/libcuda.so.1" $ptx_dir
echo "selftest: $((SECONDS - start)) s in all"
