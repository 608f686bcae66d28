#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a number of executions each (default ten million) with
# libFuzzer under AddressSanitizer, and prints executions and any crash per target. Crashes are
# minimised into fuzz/artifacts/TARGET/; commit them under shared/tests/fuzz-regressions/ (or the
# trainer's) so the ordinary tests replay them.
#
#   scripts/fuzz.sh [RUNS] [TARGET...]
#
# Needs the nightly toolchain (rustup toolchain install nightly) and cargo-fuzz (installed here
# when missing). Not part of CI: ten million executions per target take hours on two cores.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

runs=${1:-10000000}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frames wire codec gguf peft)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked
fi
mkdir -p corpus
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    started=$(date +%s)
    if cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -runs="$runs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"corpus/$target.log" 2>&1; then
        outcome=ok
    else
        outcome="CRASH (see fuzz/artifacts/$target and fuzz/corpus/$target.log)"
    fi
    executed=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "corpus/$target.log" | tail -1 | grep -o '[0-9]*$' || echo '?')
    echo "$target: $executed executions in $(( $(date +%s) - started )) s: $outcome"
done
