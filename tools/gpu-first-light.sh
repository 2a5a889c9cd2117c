#!/usr/bin/env bash
# The one prepared script for the first minutes on a real GPU (the GPU machine has no Rust).
#
#   tools/gpu-first-light.sh build          here: release finch (PTX and cubins embedded) and the
#                                           GPU test binary, stripped, into target/first-light/
#   tools/gpu-first-light.sh run OUT_DIR    on the GPU machine, from the repository root, with
#                                           target/first-light carried: every step below, each
#                                           time-boxed, all output in OUT_DIR/first-light.log
#
# The run, at most about 9.5 minutes: nvidia-smi and the driver; finch check (every kernel at
# f32 and bf16, and training CPU vs GPU); the GPU tests; finch train --model gpt2 on random tokens
# at B=16 and B=64, T=1024, 20 steps each (the first loss should be about ln 50257 = 10.8-11;
# tok/s and MFU), then 8 steps at B=16 with --profile (per-kernel times); 10 steps of
# --model llama-135m at B=8, T=1024 (first loss also about 10.8; tok/s); finch bench matmul
# against cuBLAS, square shapes first, then GPT-2's; finch bench attention; finch bench memory;
# the PyTorch references in benches/. A step that fails or runs out of time is recorded and the next one starts: a
# short GPU window is not spent on one problem. The table at the end says what passed.
# BENCHMARKS.md says how the results are recorded.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bin=$repo/target/first-light

build() {
    set -e
    cd "$repo"
    if [ -z "${NVCC:-}${CUDA_HOME:-}" ] && [ -x "$HOME/.cache/finch/cuda-13.0/nvidia/cu13/bin/nvcc" ]; then
        export CUDA_HOME=$HOME/.cache/finch/cuda-13.0/nvidia/cu13 # where .ci/run installs it
    fi
    export REQUIRE_NVCC=1 DENY_SPILLS=1
    cargo build --release --locked
    # The test binary's path, from cargo's own report of what it built.
    tests=$(cargo test --release --locked --no-run --test gpu --message-format=json |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
    mkdir -p "$bin"
    cp target/release/finch "$bin/finch"
    cp "$tests" "$bin/gpu-tests"
    strip "$bin/finch" "$bin/gpu-tests"
    git rev-parse HEAD > "$bin/COMMIT"
    git status --porcelain --untracked-files=no | grep -q . && echo "(with uncommitted changes)" >> "$bin/COMMIT"
    # `check --ptxas` prints the build's ptxas report before it looks for a GPU.
    { "$bin/finch" check --ptxas 2>/dev/null || true; } | grep -q 'sm_90a .*matmul_bf16' ||
        { echo "first-light: $bin/finch holds no kernels: was nvcc found?" >&2; exit 1; }
    du -sh "$bin"/*
    echo "first-light: carry target/first-light; on the GPU machine run: bash tools/gpu-first-light.sh run OUT_DIR"
}

# step NAME SECONDS COMMAND...: runs it with a time limit, logs its output, records the outcome.
results=()
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - start))
    local outcome=ok
    [ $rc -ne 0 ] && outcome="failed (exit $rc)"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && outcome="TIMED OUT"
    echo "=== $name: $outcome in $took s"
    results+=("$(printf '%-16s %-18s %5s s' "$name" "$outcome" "$took")")
}

random_tokens() {
    # llm.c token file of uniform random ids below 50257: what a first loss of ln 50257 needs.
    python3 - "$1" <<'EOF'
import array, random, struct, sys
n = 64 * 1024 * 21 + 1
random.seed(20240520)
tokens = array.array("H", (random.randrange(50257) for _ in range(n)))
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<3i", 20240520, 1, n) + bytes(1024 - 12))
    f.write(tokens.tobytes())
EOF
}

# train B OUT [STEPS NAME EXTRA...]: GPT-2 124M at T=1024 on the random tokens, logging to OUT/NAME.jsonl.
train() {
    local b=$1 out=$2 steps=${3:-20} name=${4:-train-b$1}
    shift 4 2>/dev/null || shift $#
    "$bin/finch" train --device cuda --data "$out/tokens.bin" --model gpt2 --batch-size "$b" --seq-len 1024 \
        --steps "$steps" --lr-schedule constant --warmup-steps 0 --print-every 1 --log "$out/$name.jsonl" "$@"
}

run() {
    local out=$1
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    exec > >(tee -a "$out/first-light.log") 2>&1
    cd "$repo"
    echo "first-light: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), finch $(cat "$bin/COMMIT" 2>/dev/null | tr '\n' ' ')"
    [ -x "$bin/finch" ] || { echo "first-light: no $bin/finch: run 'build' here and carry target/first-light" >&2; exit 1; }
    # cuBLAS for finch bench: PyTorch's wheel carries it.
    local cublas
    cublas=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/libcublas.so*", recursive=True)})))' 2>/dev/null)
    [ -n "$cublas" ] && export LD_LIBRARY_PATH="$cublas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONUNBUFFERED=1

    step nvidia-smi 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    step check 75 "$bin/finch" check
    step gpu-tests 75 env FINCH_BIN="$bin/finch" FINCH_REQUIRE_GPU=1 "$bin/gpu-tests" --test-threads 1
    # timeout runs programs, not shell functions: the script runs its own steps.
    local self=("bash" "$here/gpu-first-light.sh")
    step tokens 20 "${self[@]}" _tokens "$out/tokens.bin"
    step train-b16 60 "${self[@]}" _train 16 "$out"
    step train-b64 45 "${self[@]}" _train 64 "$out"
    step profile-b16 40 "${self[@]}" _train 16 "$out" 8 profile-b16 --profile
    # The Llama family's first run on a GPU (GpuLlama: a few waits per step, no graph yet).
    step train-llama 30 "$bin/finch" train --device cuda --data "$out/tokens.bin" --model llama-135m \
        --batch-size 8 --seq-len 1024 --steps 10 --lr-schedule constant --print-every 1 --log "$out/train-llama.jsonl"
    step bench-square 35 "$bin/finch" bench matmul --shapes square
    step bench-gpt2 50 "$bin/finch" bench matmul --shapes gpt2
    step bench-attention 30 "$bin/finch" bench attention
    step bench-memory 30 "$bin/finch" bench memory
    step torch-gpt2 40 python3 benches/gpt2_torch.py --batch-size 16 --seq-len 1024 --steps 10
    step torch-attention 30 python3 benches/attention_torch.py --backends flash
    rm -f "$out/tokens.bin"

    echo
    echo "first-light summary ($out/first-light.log)"
    printf '%s\n' "${results[@]}"
    for run in train-b16:16 train-b64:64 train-llama:8; do
        [ -f "$out/${run%:*}.jsonl" ] && python3 - "$out/${run%:*}.jsonl" "${run#*:}" "${run%:*}" <<'EOF'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"step"' in l]
if steps:
    rate = statistics.median(s["tok_per_s"] for s in steps[2:] or steps)
    mfus = [s["mfu"] for s in steps[2:] or steps if "mfu" in s]
    mfu = f", median MFU {100 * statistics.median(mfus):.1f}%" if mfus else ""
    print(f"{sys.argv[3]} B={sys.argv[2]} T=1024: first loss {steps[0]['loss']:.3f} (ln 50257 = 10.825), "
          f"{len(steps)} steps, median {rate:,.0f} tok/s after the first two{mfu}")
EOF
    done
}

case "${1:-}" in
    build) build ;;
    _tokens) random_tokens "$2" ;;
    _train) shift; train "$@" ;;
    run) [ -n "${2:-}" ] || { echo "usage: $0 run OUT_DIR" >&2; exit 2; }; run "$2" ;;
    *) echo "usage: $0 build | run OUT_DIR" >&2; exit 2 ;;
esac
