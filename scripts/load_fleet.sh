#!/usr/bin/env bash
# A large fleet against one coordinator process on this machine, over loopback, with the
# coordinator's default limits. Prints: time to connect every trainer, the coordinator's memory
# per connection, per-round wall time, upload-to-acknowledgement latency (p50, p99), and any
# refused or lost upload.
#
#   scripts/load_fleet.sh [TRAINERS] [PER_ROUND] [ROUNDS] [PROCESSES]    (default 10000 1000 5 4)
#
# The coordinator is the release `tributary-coordinator serve` with a synthetic experiment; the
# trainers are `tributary-loadgen` processes, each taking its own range of identities and
# loopback addresses (16 trainers per address, so the per-address quota applies as it would).
set -euo pipefail
cd "$(dirname "$0")/.."

trainers=${1:-10000}
per_round=${2:-1000}
rounds=${3:-5}
processes=${4:-4}

cargo build --release --locked -q -p tributary-coordinator --bin tributary-coordinator \
    -p tributary-tests --bin tributary-loadgen
coordinator=target/release/tributary-coordinator
loadgen=target/release/tributary-loadgen

work=$(mktemp -d)
trap 'kill $coordinator_pid 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
# Every trainer holds a UDP socket in its load generator; the coordinator one descriptor each.
ulimit -n "$(ulimit -Hn)"

cat >"$work/load.toml" <<EOF
[experiment]
name = "fleet"
rounds = $rounds

[adapter]
kind = "synthetic"
params = 1000
tensors = 1

[selection]
trainers_per_round = $per_round
over_selection = 1.0
quorum = $per_round
min_trainers = $trainers
round_timeout_secs = 600
gather_timeout_secs = 900

[training]
codec = { kind = "f32" }
EOF

RUST_LOG=warn "$coordinator" serve --data-dir "$work/data" --listen 127.0.0.1:0 \
    --http 127.0.0.1:0 --experiment "$work/load.toml" --ready-file "$work/ready.json" \
    >"$work/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 100); do [ -f "$work/ready.json" ] && break; sleep 0.1; done
addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addr"])' "$work/ready.json")
fingerprint=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint"])' "$work/ready.json")
http=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/ready.json")
echo "coordinator $addr, metrics at http://$http/metrics, work folder $work" >&2
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$coordinator_pid/status"; }
baseline_kb=$(rss_kb)

# Sample the coordinator's resident memory while the fleet runs.
(while kill -0 $coordinator_pid 2>/dev/null; do rss_kb; sleep 0.2; done) >"$work/rss.txt" 2>/dev/null &
sampler=$!

per_process=$(( (trainers + processes - 1) / processes ))
pids=()
for p in $(seq 0 $((processes - 1))); do
    first=$((p * per_process))
    count=$(( trainers - first < per_process ? trainers - first : per_process ))
    "$loadgen" --coordinator "$addr" --fingerprint "$fingerprint" --trainers "$count" \
        --first-index "$first" --json-out "$work/gen-$p.json" >"$work/gen-$p.txt" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
kill $sampler 2>/dev/null || true
curl -s "http://$http/metrics" | grep -E '^tributary_limit_hits_total' >"$work/limits.txt" || true
if [ $status -ne 0 ]; then
    tail -n 20 "$work"/gen-*.txt "$work/coordinator.log" >&2
    exit 1
fi

python3 - "$work" "$trainers" "$per_round" "$baseline_kb" <<'EOF'
import glob, json, statistics, sys
work, trainers, per_round, baseline_kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gens = [json.load(open(path)) for path in sorted(glob.glob(f"{work}/gen-*.json"))]
rss = [int(line) for line in open(f"{work}/rss.txt") if line.strip().isdigit()]
connect = max(g["connect_all_s"] for g in gens)
acks = sorted(ms for g in gens for ms in g["ack_ms"])
def q(values, f):
    return values[min(len(values) - 1, round((len(values) - 1) * f))]
rounds = [statistics.median(values) for values in zip(*[g["round_s"] for g in gens])]
peak_kb = max(rss) if rss else 0
print(f"trainers {trainers}, selected per round {per_round}, load generator processes {len(gens)}")
print(f"time to connect all: {connect:.2f} s")
print(f"coordinator memory: {baseline_kb/1024:.0f} MiB idle, peak {peak_kb/1024:.0f} MiB, "
      f"{(peak_kb - baseline_kb) * 1024 / trainers / 1024:.1f} KiB per connected trainer")
if rounds:
    print(f"per-round wall time (rounds 1..): median {statistics.median(rounds):.3f} s, "
          f"max {max(rounds):.3f} s")
print(f"upload end to acknowledgement: p50 {q(acks, 0.5):.1f} ms, p99 {q(acks, 0.99):.1f} ms "
      f"({len(acks)} uploads)")
print(f"uploads {sum(g['uploads'] for g in gens)}, accepted {sum(g['accepted'] for g in gens)}, "
      f"refused {sum(g['rejected'] for g in gens)}, lost {sum(g['lost'] for g in gens)}, "
      f"deferred and re-sent {sum(g['deferred'] for g in gens)}")
for line in open(f"{work}/limits.txt"):
    print("coordinator limit hit:", line.strip())
EOF
