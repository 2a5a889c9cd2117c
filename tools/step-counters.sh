#!/usr/bin/env bash
# Launches, host synchronisations and host<->device traffic per GPU training step, read from the
# fake CUDA driver's counters (tools/kernel-emu/fake-cuda): runs of 2 and 6 steps, the difference
# divided by 4, so start-up, the first capture and the final save cancel out. Prints one line per
# --grad-accum. Numbers for BENCHMARKS.md; needs no GPU.
#
#   tools/step-counters.sh [extra finch train flags...]
#
# FINCH_BIN: the finch binary (default target/release/finch); FAKE_CUDA_DIR: the directory holding
# the fake libcuda.so.1 (default target/fake-cuda; build it with tools/kernel-emu/fake-cuda/build.sh).
# The model has GPT-2 124M's structure (12 layers, 12 heads) at a width and sequence the emulator
# runs in seconds; launches and syncs per step depend on the structure only, and the bytes are
# given by the formula the run prints.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
finch=${FINCH_BIN:-$repo/target/release/finch}
fake=${FAKE_CUDA_DIR:-$repo/target/fake-cuda}
[ -x "$finch" ] || { echo "step-counters: no finch binary at $finch (cargo build --release)" >&2; exit 1; }
[ -e "$fake/libcuda.so.1" ] || { echo "step-counters: no fake driver in $fake (tools/kernel-emu/fake-cuda/build.sh)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Text of printable bytes, tokenized one token per byte.
head -c 150000 /dev/urandom | base64 > "$work/text.txt"
"$finch" tokenize --tokenizer bytes --out "$work/data" "$work/text.txt" > /dev/null
B=4 T=64
model=(--n-layer 12 --n-head 12 --n-embd 96 --context-length "$T" --batch-size "$B" --seq-len "$T"
    --device cuda --precision bf16 --lr-schedule constant --checkpoint-every 1000)
get() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v.get(k, {}) if isinstance(v, dict) else {}
print(v if v != {} else 0)' "$1" "$2"; }
for accum in 1 4; do
    for steps in 2 6; do
        FAKE_CUDA_COUNTERS="$work/c$accum-$steps.json" LD_LIBRARY_PATH="$fake" \
            "$finch" train --data "$work/data/train_*.bin" "${model[@]}" --grad-accum "$accum" --steps "$steps" \
            --out "$work/run$accum-$steps" "$@" > "$work/log$accum-$steps.txt" 2>&1 ||
            { cat "$work/log$accum-$steps.txt" >&2; exit 1; }
    done
    line="grad-accum $accum (B=$B T=$T, 12 layers):"
    for key in launches syncs.total htod.count htod.bytes dtoh.count dtoh.bytes memsets.count; do
        a=$(get "$work/c$accum-2.json" "$key")
        b=$(get "$work/c$accum-6.json" "$key")
        line+=" $key $(python3 -c "print(($b - $a) / 4)")"
    done
    echo "$line"
done
