#!/usr/bin/env bash
# Training throughput of Tributary's trainer against PyTorch + PEFT, in one run, on this machine:
# SmolLM2-135M, LoRA r=8 on q and v, sequence 128, batch 4, AdamW. Prints both JSON results and
# the ratio of tokens per second. Both use $THREADS threads (default: 2).
#
#   scripts/bench_training.sh [--steps N]
#
# The PyTorch side installs into a cached venv from PyPI (see bench_pytorch_peft.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
steps=10
if [[ "${1:-}" == "--steps" ]]; then steps="$2"; fi
threads="${THREADS:-2}"

"$root/deploy/fetch-assets.sh" >&2
# The CPU comparison needs no GPU backend (and skips its long build).
cargo build --release --manifest-path "$root/Cargo.toml" -p tributary-trainer --no-default-features >&2

echo "[bench] tributary (burn flex, $threads threads)" >&2
ours=$(RAYON_NUM_THREADS="$threads" "$root/target/release/tributary-trainer" bench --backend cpu --steps "$steps" | tail -n 1)
echo "[bench] pytorch + peft ($threads threads)" >&2
theirs=$("$here/bench_pytorch_peft.sh" --threads "$threads" --steps "$steps" | tail -n 1)

echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
print(f"tokens/s: tributary {ours['tokens_per_s']:.1f}, pytorch+peft {theirs['tokens_per_s']:.1f}, ratio {ratio:.2f}x")
print(f"peak RSS: tributary {ours['peak_rss_mib']:.0f} MiB, pytorch+peft {theirs['peak_rss_mib']:.0f} MiB")
PY
