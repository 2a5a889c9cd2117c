#!/usr/bin/env bash
# Builds each kernel family's emulator harness with g++ (ASan + UBSan) and runs it against its CPU
# reference; exits non-zero if any build, comparison or emulator check fails. See README.md.
#
#   tools/kernel-emu/run.sh [-v] [family ...]
#   families: selftest (the emulator itself), tensorcore (the tensor-core instructions of
#   kernels/tensorcore.cuh), attention, encoder, gelu, layernorm, matmul, crossentropy, optimizer,
#   rmsnorm, rope, swiglu, gqa (default: all, in that order).
#   -v: print every test case, not only failures and the summaries.
# Binaries and full logs go to $EMU_OUT (default: target/kernel-emu). CXX picks the compiler, EMU_SAN
# the sanitizers (default address,undefined; set it empty for none).
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${EMU_OUT:-$here/../../target/kernel-emu}
mkdir -p "$out"
cxx=${CXX:-g++}
verbose=0
if [ "${1:-}" = "-v" ]; then
    verbose=1
    shift
fi
families=("$@")
[ ${#families[@]} -eq 0 ] && families=(selftest tensorcore attention encoder gelu layernorm matmul crossentropy optimizer rmsnorm rope swiglu gqa)

# EMU_SAN: the sanitizers (default address,undefined; empty for none, which builds and runs faster).
san=${EMU_SAN-address,undefined}
flags=(-std=c++20 -O1 -g1 -fno-strict-aliasing -fdata-sections -Wall -Wno-unknown-pragmas -Wno-sign-compare -I"$here")
[ -n "$san" ] && flags+=(-fsanitize="$san" -fno-sanitize-recover=all)
# The fibers' stacks are switched by hand (annotated for ASan); leaks are not the point here.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

status=0
for f in "${families[@]}"; do
    src="$here/$f.cpp"
    if [ ! -f "$src" ]; then
        echo "run.sh: no harness $src" >&2
        status=1
        continue
    fi
    start=$SECONDS
    # One compile at a time (the machine may be busy with cargo).
    if ! "$cxx" "${flags[@]}" "$src" -Wl,-T,"$here/emu.ld" -o "$out/$f" 2> "$out/$f.build.log"; then
        cat "$out/$f.build.log" >&2
        echo "== $f: BUILD FAILED" >&2
        status=1
        continue
    fi
    [ -s "$out/$f.build.log" ] && cat "$out/$f.build.log" >&2
    built=$SECONDS
    timeout "${EMU_TIMEOUT:-600}" "$out/$f" > "$out/$f.log" 2> "$out/$f.err"
    rc=$?
    if [ $verbose = 1 ]; then
        grep -v '^  ' "$out/$f.log" | grep -v ': [0-9]* cases'
    else
        grep '^FAIL' "$out/$f.log"
    fi
    sed -n '/: [0-9]* cases/,$p' "$out/$f.log"
    [ -s "$out/$f.err" ] && head -c 4000 "$out/$f.err" >&2
    if [ $rc -ne 0 ]; then
        [ $rc -eq 124 ] && echo "== $f: TIMED OUT" >&2
        echo "== $f: FAILED (exit $rc; log: $out/$f.log)" >&2
        status=1
    else
        echo "== $f: ok (build $((built - start)) s, run $((SECONDS - built)) s)"
    fi
done
[ $status -eq 0 ] && echo "all kernel families pass in the emulator" || echo "FAILURES (see above)" >&2
exit $status
