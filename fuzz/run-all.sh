#!/usr/bin/env bash
# Runs keygate's cargo-fuzz targets, one after another (or N at a time with
# -j N), for SECONDS each (default 600), then prints per target: execs/s,
# total runs, corpus size (libFuzzer's own count, and the files kept in
# fuzz/corpus/TARGET) and crashes. Not part of CI (see README.md, "Fuzzing").
#
#   fuzz/run-all.sh                 # every target, 10 minutes each
#   fuzz/run-all.sh 60              # every target, 1 minute each
#   fuzz/run-all.sh -j 2 600 config headers
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`); runs on the stable toolchain
# through RUSTC_BOOTSTRAP=1. Environment:
#   FUZZ_SANITIZER  none (default: keygate has no unsafe code to check, and
#                   ASan slows every run) or address
#   FUZZ_NICE       niceness of the build and the runs (default 19)
# Logs: fuzz/artifacts/TARGET/run.log; crash inputs: fuzz/artifacts/TARGET/.
# Reproduce one: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

secs=600
jobs=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        -j) jobs="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *[!0-9]*) targets+=("$1"); shift ;;
        *) secs="$1"; shift ;;
    esac
done

cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-none}"
niceness="${FUZZ_NICE:-19}"
# The config target must see no KEYGATE_* overrides from this shell.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^KEYGATE_' || true)

if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Build once, up front, so the compile does not eat into the first run.
nice -n "$niceness" cargo fuzz build --sanitizer "$sanitizer"

max_len() {
    case "$1" in
        config) echo 16384 ;;     # the reference config is about 10 KiB
        admin_json) echo 20480 ;; # room for metadata over its 16 KiB limit
        *) echo 4096 ;;
    esac
}

run_one() {
    local t="$1"
    local seeds=("fuzz/seeds/$t")
    [ "$t" = config ] && seeds+=(config)
    local dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    touch "fuzz/artifacts/$t/run.started"
    local status=0
    nice -n "$niceness" cargo fuzz run --sanitizer "$sanitizer" "$t" \
        "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=30 \
        -print_final_stats=1 "${dict[@]}" \
        </dev/null >"fuzz/artifacts/$t/run.log" 2>&1 || status=$?
    echo "$status" >"fuzz/artifacts/$t/run.status"
}

for t in "${targets[@]}"; do
    rm -f "fuzz/artifacts/$t/run.status"
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    echo "fuzzing $t for ${secs}s..." >&2
    run_one "$t" &
done
wait

failed=0
printf '%-12s %8s %12s %12s %16s %10s %8s\n' target seconds execs/s runs "corpus (libFuzzer)" "corpus files" crashes
for t in "${targets[@]}"; do
    log="fuzz/artifacts/$t/run.log"
    status="$(cat "fuzz/artifacts/$t/run.status" 2>/dev/null || echo '?')"
    final_stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    # The last status line reads like `#123456 DONE cov: 812 ft: 2345 corp: 456/78Kb ...`.
    corp="$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2)"
    files="$(find "fuzz/corpus/$t" -type f | wc -l)"
    crashes="$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'leak-*' \
        -o -name 'timeout-*' -o -name 'oom-*' \) -newer "fuzz/artifacts/$t/run.started" 2>/dev/null | wc -l)"
    if [ "$status" != 0 ]; then
        failed=1
        crashes="$crashes (exit $status)"
    fi
    printf '%-12s %8s %12s %12s %16s %10s %8s\n' "$t" "$secs" "$(final_stat average_exec_per_sec)" \
        "$(final_stat number_of_executed_units)" "${corp:-?}" "$files" "$crashes"
done
if [ "$failed" != 0 ]; then
    echo "a target failed: see fuzz/artifacts/TARGET/run.log" >&2
fi
exit "$failed"
