#!/usr/bin/env bash
# Training throughput on a GPU: Tributary's trainer on burn's wgpu backend against PyTorch + PEFT
# on CUDA, on the same GPU, in one run. The same job as scripts/bench_training.sh (SmolLM2-135M,
# LoRA r=8 on q and v, sequence 128, batch 4, AdamW), so the two scripts' figures compare.
# Prints both JSON results and the ratio of tokens per second.
#
#   scripts/bench_gpu.sh [--steps N] [--model FILE.gguf]
#
# Without --model the bench runs SmolLM2 from the asset cache; a larger GGUF (say a 7B from
# scripts/random_llama.py) is run by Tributary with its base in blocks and recomputed layers,
# and by PyTorch as transformers loads it. The PyTorch side installs into a cached venv from
# PyPI (see bench_pytorch_peft.sh; set BENCH_PIP_SPECS to a CUDA build of torch if the default
# wheel lacks one). Needs an NVIDIA GPU for the PyTorch side; Tributary takes the GPU wgpu
# prefers (`--backend gpu`), after its correctness probe against the CPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
steps=10
model=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

"$root/deploy/fetch-assets.sh" >&2
# The volunteer's build: the GPU backend is the default feature.
cargo build --release --manifest-path "$root/Cargo.toml" -p tributary-trainer >&2

ours_args=(bench --backend gpu --steps "$steps")
theirs_args=(--device cuda --steps "$steps")
if [[ -n "$model" ]]; then
    ours_args+=(--model "$model" --base-weights blocks --recompute-layers)
    theirs_args+=(--gguf "$model" --random-tokens)
fi

echo "[bench] tributary (burn wgpu)" >&2
ours=$("$root/target/release/tributary-trainer" "${ours_args[@]}" | tail -n 1)
echo "[bench] pytorch + peft (cuda)" >&2
theirs=$("$here/bench_pytorch_peft.sh" "${theirs_args[@]}" | tail -n 1)

echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
print(f"tokens/s on {theirs.get('gpu', 'the GPU')}: tributary (wgpu) {ours['tokens_per_s']:.1f}, "
      f"pytorch+peft (cuda) {theirs['tokens_per_s']:.1f}, ratio {ratio:.2f}x")
print(f"peak GPU memory: pytorch+peft {theirs.get('peak_gpu_mib', float('nan')):.0f} MiB "
      f"(tributary's is not read back through wgpu); host peak RSS: tributary "
      f"{ours['peak_rss_mib']:.0f} MiB, pytorch+peft {theirs['peak_rss_mib']:.0f} MiB")
PY
