#!/usr/bin/env bash
# The same synthetic fleet against three deployments, one after the other on this machine:
# one node with SQLite and a blob folder, one node with PostgreSQL and Garage (S3), and a
# three-node cluster on PostgreSQL and Garage (`deploy/cluster.sh`). Prints each run's figures
# and a table: per-round wall time, delta MB/s (at the trainers), acknowledgement latency, lost.
#
#   scripts/load_cluster.sh [TRAINERS] [PER_ROUND] [ROUNDS] [PARAMS]    (default 10000 1000 3 100000)
#
# Deltas are int8 (PARAMS values each). Needs PostgreSQL (initdb) and Garage, as the tests do.
set -euo pipefail
cd "$(dirname "$0")/.."
trainers=${1:-10000}
per_round=${2:-1000}
rounds=${3:-3}
params=${4:-100000}
ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -q -p tributary-tests --bin tributary-loadgen
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

for storage in embedded postgres-s3; do
    echo "== one node, $storage" >&2
    target/release/tributary-loadgen --trainers "$trainers" --per-round "$per_round" \
        --rounds "$rounds" --params "$params" --codec int8 --storage "$storage" \
        2>"$work/$storage.log" | tee "$work/$storage.out" >&2
done

cat >"$work/cluster.toml" <<TOML
[experiment]
name = "load"
rounds = $rounds

[adapter]
kind = "synthetic"
params = $params
tensors = 1

[selection]
trainers_per_round = $per_round
over_selection = 1.0
quorum = $per_round
min_trainers = $trainers
round_timeout_secs = 600
gather_timeout_secs = 600

[training]
codec = { kind = "int8", block = 64 }
TOML
echo "== three nodes, postgres-s3" >&2
deploy/cluster.sh --synthetic --trainers "$trainers" --experiment "$work/cluster.toml" \
    --out "$work/cluster" >&2
cp "$work/cluster/trainers.out" "$work/cluster.out"

python3 - "$work" <<'PY'
import re, sys
work = sys.argv[1]
def figures(name):
    text = open(f"{work}/{name}.out").read()
    get = lambda pattern: (re.search(pattern, text) or [None, "?"])[1]
    return (get(r"median ([0-9.]+) s"), get(r"MB, ([0-9.]+) MB/s"),
            get(r"p50 ([0-9.]+) ms"), get(r"p99 ([0-9.]+) ms"), get(r"lost ([0-9]+)"))
print("| deployment | per-round wall time | deltas MB/s | ack p50 / p99 | lost |")
print("|---|---|---|---|---|")
for name, label in [("embedded", "one node, SQLite + blob folder"),
                    ("postgres-s3", "one node, PostgreSQL + Garage"),
                    ("cluster", "three nodes, PostgreSQL + Garage")]:
    median, rate, p50, p99, lost = figures(name)
    print(f"| {label} | {median} s | {rate} | {p50} ms / {p99} ms | {lost} |")
PY
