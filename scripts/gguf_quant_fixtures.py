#!/usr/bin/env python3
"""Writes trainer/tests/fixtures/gguf_quant.json: weight-like f32 values and the bytes the `gguf`
Python package's reference quantizers give them (the arithmetic of llama.cpp's
ggml-quants.c `quantize_row_*_ref`), for the types `tributary-trainer requantize` writes by the
reference rule: Q5_0 (llama.cpp's fallback for Q4_K on rows that are not whole super-blocks).
The trainer's test `quantization_matches_the_gguf_reference_byte_for_byte` compares its own.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install numpy gguf==0.19.0
    /tmp/gguf-venv/bin/python scripts/gguf_quant_fixtures.py

The values: normal blocks, blocks with one large outlier of either sign, a block of zeros, and
a block of small integers times a power of two (exact ties in the rounding).
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants


def values(rng):
    normal = rng.normal(0.0, 0.05, size=32 * 6).astype(np.float32)
    outliers = rng.normal(0.0, 0.02, size=32 * 4).astype(np.float32)
    outliers[5] = 0.9
    outliers[32 + 17] = -1.3
    outliers[64 + 31] = 0.4
    outliers[96] = -0.07
    zeros = np.zeros(32, dtype=np.float32)
    ties = (rng.integers(-16, 17, size=32) * 0.125).astype(np.float32)
    return np.concatenate([normal, outliers, zeros, ties])


def main():
    rng = np.random.default_rng(20261207)
    x = values(rng)
    cases = []
    for kind in [T.Q5_0]:
        data = quants.quantize(x, kind)
        cases.append({
            "type": kind.name,
            "values_f32_le_hex": x.astype("<f4").tobytes().hex(),
            "blocks_hex": data.tobytes().hex(),
        })
    out = pathlib.Path(__file__).resolve().parent.parent / "trainer/tests/fixtures/gguf_quant.json"
    out.write_text(json.dumps({"generator": "scripts/gguf_quant_fixtures.py", "cases": cases}, indent=1) + "\n")
    print(f"wrote {out} ({len(cases)} types)")


if __name__ == "__main__":
    main()
