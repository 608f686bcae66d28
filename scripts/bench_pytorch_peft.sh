#!/usr/bin/env bash
# PyTorch + PEFT LoRA baseline for the Rust trainer's benchmark.
#
# Creates (or reuses) a virtualenv under ${TRIBUTARY_CACHE:-~/.cache/tributary}/venv-bench,
# installs torch, transformers, peft and gguf from PyPI by package name, and runs
# scripts/bench_pytorch_peft.py with the arguments given here, e.g.
#
#   scripts/bench_pytorch_peft.sh --threads 2 --steps 10
#
# The last line of stdout is the benchmark's JSON result.
#
# Environment:
#   TRIBUTARY_CACHE      cache root (default ~/.cache/tributary)
#   BENCH_PYTHON         interpreter used to create the venv (default python3)
#   BENCH_PIP_SPECS      packages to install (default: the versions this was checked with)
#   BENCH_REINSTALL=1    rebuild the venv from scratch
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TRIBUTARY_CACHE:-$HOME/.cache/tributary}"
venv="$cache/venv-bench"
python="${BENCH_PYTHON:-python3}"
specs="${BENCH_PIP_SPECS:-torch==2.15.0 transformers==5.23.0 peft==0.21.2 gguf==0.19.0}"
stamp="$venv/.tributary-bench-specs"

if [[ "${BENCH_REINSTALL:-0}" == 1 ]]; then
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "[bench] creating venv $venv" >&2
    mkdir -p "$cache"
    "$python" -m venv "$venv"
fi

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$specs" ]] \
    || ! "$venv/bin/python" -c 'import torch, transformers, peft, gguf' 2>/dev/null; then
    echo "[bench] installing: $specs" >&2
    # shellcheck disable=SC2086 # word splitting of the spec list is intended
    "$venv/bin/python" -m pip install --quiet $specs >&2
    printf '%s' "$specs" > "$stamp"
else
    echo "[bench] reusing venv $venv" >&2
fi

exec "$venv/bin/python" "$here/bench_pytorch_peft.py" "$@"
