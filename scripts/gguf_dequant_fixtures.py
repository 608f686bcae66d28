#!/usr/bin/env python3
"""Writes trainer/tests/fixtures/gguf_dequant.json: random GGML blocks of every tensor type the
trainer reads, with the values the `gguf` Python package's reference dequantization gives them
(the same arithmetic as llama.cpp's ggml-quants.c). The trainer's test
`dequantization_matches_the_gguf_reference` compares its own dequantization bit for bit.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install numpy gguf==0.19.0
    /tmp/gguf-venv/bin/python scripts/gguf_dequant_fixtures.py

Block bytes are random, except the f16/f32 scale fields, which hold random finite values (a
random bit pattern would often be an infinity or a NaN). Q8_K has no reference in the package:
its values are computed here from its definition (f32 scale times each signed byte).
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

QK_K = 256
# type: (elements per block, bytes per block, byte offsets of f16 scale fields, f32 fields)
LAYOUTS = {
    T.BF16: (1, 2, [], []),
    T.Q4_0: (32, 18, [0], []),
    T.Q4_1: (32, 20, [0, 2], []),
    T.Q5_0: (32, 22, [0], []),
    T.Q5_1: (32, 24, [0, 2], []),
    T.Q8_0: (32, 34, [0], []),
    T.Q2_K: (QK_K, 84, [80, 82], []),
    T.Q3_K: (QK_K, 110, [108], []),
    T.Q4_K: (QK_K, 144, [0, 2], []),
    T.Q5_K: (QK_K, 176, [0, 2], []),
    T.Q6_K: (QK_K, 210, [208], []),
    T.Q8_K: (QK_K, 292, [], [0]),
}


def blocks(rng, kind, count):
    per_block, size, halves, singles = LAYOUTS[kind]
    raw = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
    for offset in halves:
        scale = rng.normal(0.0, 0.05, size=count).astype(np.float16)
        raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(count, 2)
    for offset in singles:
        scale = rng.normal(0.0, 0.05, size=count).astype(np.float32)
        raw[:, offset:offset + 4] = scale.view(np.uint8).reshape(count, 4)
    if kind == T.BF16:
        # Finite bf16 values: random f32s rounded to their upper halves.
        values = rng.normal(0.0, 2.0, size=count).astype(np.float32)
        raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(count, 2)
    return raw


def reference(kind, raw):
    if kind == T.Q8_K:
        d = raw[:, 0:4].copy().view(np.float32)
        q = raw[:, 4:4 + QK_K].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    return quants.dequantize(raw.reshape(-1), kind).reshape(-1).astype(np.float32)


def main():
    rng = np.random.default_rng(20261124)
    cases = []
    for kind in LAYOUTS:
        count = 64 if LAYOUTS[kind][0] == 1 else 3
        raw = blocks(rng, kind, count)
        values = reference(kind, raw)
        assert np.isfinite(values).all(), kind
        cases.append({
            "type": kind.name,
            "id": int(kind),
            "elements": int(values.size),
            "blocks_hex": raw.tobytes().hex(),
            "values_f32_le_hex": values.astype("<f4").tobytes().hex(),
        })
    out = pathlib.Path(__file__).resolve().parent.parent / "trainer/tests/fixtures/gguf_dequant.json"
    out.write_text(json.dumps({"generator": "scripts/gguf_dequant_fixtures.py", "cases": cases}, indent=1) + "\n")
    print(f"wrote {out} ({len(cases)} types)")


if __name__ == "__main__":
    main()
