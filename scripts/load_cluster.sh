#!/usr/bin/env bash
# The same synthetic fleet against four deployments, one after the other on this machine:
# one node with SQLite and a blob folder, one node with PostgreSQL and Garage (S3), and a
# three-node cluster on PostgreSQL and Garage (`deploy/cluster.sh`), first with every delta
# sent to the leader, then with uploads spread over the nodes. Prints each run's figures and a
# table: per-round wall time, delta MB/s (at the trainers), acknowledgement latency, lost, and
# for the clusters the CPU seconds each node used.
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
for mode in leader spread; do
    echo "== three nodes, postgres-s3, uploads to the $mode" >&2
    flag=()
    [ "$mode" = leader ] && flag=(--leader-uploads)
    deploy/cluster.sh --synthetic --trainers "$trainers" --experiment "$work/cluster.toml" \
        --out "$work/cluster-$mode" ${flag[@]+"${flag[@]}"} >&2
    cp "$work/cluster-$mode/trainers.out" "$work/cluster-$mode.out"
    cp "$work/cluster-$mode/cpu.txt" "$work/cluster-$mode.cpu" 2>/dev/null || true
done

python3 - "$work" <<'PY'
import re, sys
work = sys.argv[1]
def figures(name):
    text = open(f"{work}/{name}.out").read()
    get = lambda pattern: (re.search(pattern, text) or [None, "?"])[1]
    return (get(r"median ([0-9.]+) s"), get(r"MB, ([0-9.]+) MB/s"),
            get(r"p50 ([0-9.]+) ms"), get(r"p99 ([0-9.]+) ms"), get(r"lost ([0-9]+)"))
def cpu(name):
    try:
        lines = open(f"{work}/{name}.cpu").read().split("\n")
    except OSError:
        return ""
    return ", ".join(f"{l.split()[1]} {l.split()[2]} s" for l in lines if l.startswith("cpu "))
print("| deployment | per-round wall time | deltas MB/s | ack p50 / p99 | lost | node CPU (a leads) |")
print("|---|---|---|---|---|---|")
for name, label in [("embedded", "one node, SQLite + blob folder"),
                    ("postgres-s3", "one node, PostgreSQL + Garage"),
                    ("cluster-leader", "three nodes, every delta to the leader"),
                    ("cluster-spread", "three nodes, deltas spread over the nodes")]:
    median, rate, p50, p99, lost = figures(name)
    print(f"| {label} | {median} s | {rate} | {p50} ms / {p99} ms | {lost} | {cpu(name)} |")
PY
