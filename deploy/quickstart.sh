#!/usr/bin/env bash
# Runs a whole experiment on this machine over loopback QUIC: a coordinator process and a fleet of
# trainers, then re-derives every round with `verify`.
#
# Until the burn trainer lands, the trainers are synthetic (real protocol, made-up deltas):
# see the project's issues.
#
#   deploy/quickstart.sh [--experiment FILE] [--out DIR] [--trainers N]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
experiment="$root/experiments/synthetic.toml"
out="$root/run/quickstart-$(date +%Y%m%d-%H%M%S)"
trainers=20
while [ $# -gt 0 ]; do
    case "$1" in
        --experiment) experiment=$(realpath "$2"); shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --trainers) trainers="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

echo "building (release)..."
(cd "$root" && cargo build --release --locked -q -p tributary-coordinator -p tributary-tests --bin tributary-coordinator --bin tributary-loadgen)
bin="$root/target/release"

ready="$out/ready.json"
rm -f "$ready"
"$bin/tributary-coordinator" serve --data-dir "$out/data" --listen 127.0.0.1:0 \
    --experiment "$experiment" --http 127.0.0.1:0 --ready-file "$ready" --exit-when-finished \
    >"$out/coordinator.out" 2>"$out/coordinator.log" &
coordinator=$!
trap 'kill $coordinator 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    [ -s "$ready" ] && break
    kill -0 $coordinator 2>/dev/null || { cat "$out/coordinator.log" >&2; exit 1; }
    sleep 0.1
done
addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addr"])' "$ready")
fingerprint=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint"])' "$ready")
echo "coordinator on $addr (fingerprint $fingerprint)"

"$bin/tributary-loadgen" --coordinator "$addr" --fingerprint "$fingerprint" --trainers "$trainers" | tee "$out/trainers.txt"
wait $coordinator
trap - EXIT

echo
"$bin/tributary-coordinator" verify --data-dir "$out/data"
"$bin/tributary-coordinator" status --data-dir "$out/data" > "$out/status.json"
echo "status: $out/status.json"
echo "$out"
