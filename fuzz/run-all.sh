#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) each, one after another on one core, starting
# from the committed seeds plus whatever corpus earlier runs kept in fuzz/corpus/, and prints one
# summary line per target: inputs tried, seconds, corpus size, crashes. Needs a nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz`). Exit status: non-zero if any target crashed.
#
#   bash fuzz/run-all.sh            # 10 minutes per target
#   bash fuzz/run-all.sh 60 token_file checkpoint
set -uo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
# The targets that read JSON get the JSON dictionary.
json_targets=" model_config model_weights checkpoint jsonl_line train_log log_resume train_args "

cargo +nightly fuzz build -O >/dev/null 2>&1 || { echo "error: cargo +nightly fuzz build failed" >&2; exit 1; }
logs="$(mktemp -d)"
status=0
printf '%-14s %12s %8s %10s %8s\n' target inputs seconds corpus crashes
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dict=()
    [[ "$json_targets" == *" $t "* ]] && dict=(-dict=dicts/json.dict)
    before=$(find "artifacts/$t" -type f | wc -l)
    cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 "${dict[@]}" \
        >"$logs/$t.log" 2>&1
    rc=$?
    crashes=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$logs/$t.log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    printf '%-14s %12s %8s %10s %8s\n' "$t" "${runs:-?}" "${took:-?}" "$corpus" "$crashes"
    if [ $rc -ne 0 ] || [ "$crashes" -ne 0 ]; then
        status=1
        echo "  $t failed (exit $rc); its output: $logs/$t.log" >&2
        tail -30 "$logs/$t.log" >&2
    fi
done
echo "logs: $logs"
exit $status
