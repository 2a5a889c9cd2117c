#!/usr/bin/env bash
# Builds the fake NCCL (build.sh), the fake CUDA driver its graph case needs (../fake-cuda/build.sh)
# and the self-test, then runs the self-test: real processes, 1 to 4 ranks, every collective, type
# and op against a reference, large buffers, groups, a killed rank, a timeout, mismatched calls,
# aborts, leftovers of killed jobs, and collectives captured in a fake-CUDA graph. Each case prints
# one "ok: ..." or "FAIL: ..." line. Exits non-zero on any failure.
#
#   tools/kernel-emu/fake-nccl/selftest.sh     (OUT: as build.sh, default target/fake-nccl;
#                                               CUDA_OUT: the fake CUDA's, default target/fake-cuda)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=${OUT:-$repo/target/fake-nccl}
cuda_out=${CUDA_OUT:-$repo/target/fake-cuda}
cxx=${CXX:-g++}
start=$SECONDS
OUT=$out bash "$here/build.sh"
OUT=$cuda_out bash "$here/../fake-cuda/build.sh"
mkdir -p "$out/selftest"
"$cxx" -std=c++20 -O1 -g -Wall -Wno-sign-compare "$here/selftest.cpp" -ldl -lpthread -o "$out/selftest/selftest"
"$out/selftest/selftest" "$out/libnccl.so.2" "$cuda_out/libcuda.so.1"
echo "selftest: $((SECONDS - start)) s in all"
