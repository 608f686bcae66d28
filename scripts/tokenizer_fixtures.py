#!/usr/bin/env python3
"""Write the tokenizer fixtures the trainer's Rust tests check against.

The tokenizers of Llama 3, Qwen2 and Llama 2/Mistral are rebuilt here at a small scale (nothing
is downloaded): their pre-tokenization and normalisation exactly as the published
`tokenizer.json`/`tokenizer.model` files configure them, with a small vocabulary trained on the
committed multilingual text. Each is written twice:

* as the reference library's own file (`tokenizer.json` for the byte-level BPEs, the
  SentencePiece `.model` for Llama 2's), whose token ids on every line of the text, and on the
  whole text, are recorded in `reference.json`;
* as GGUF tokenizer metadata the way llama.cpp's converter stores it
  (`tokenizer.ggml.model` `gpt2` with `tokenizer.ggml.pre` `llama-bpe` or `qwen2`; `llama` with
  pieces, scores and token types), which is what the trainer reads.

Usage:
    python scripts/tokenizer_fixtures.py [--out DIR]

Needs: tokenizers, sentencepiece, transformers, gguf.
"""

import argparse
import io
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "trainer/tests/fixtures/tokenizers"

# The split patterns of Llama 3's and Qwen2's tokenizer.json (they differ in how digits group).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def cases(text):
    return text.split("\n") + [text]


def byte_level_bpe(name, pattern, nfc, specials, text, out):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    import gguf

    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split("\n"), trainer)
    if name == "llama-bpe":
        # Llama 3's tokenizer.json takes a pre-token that is itself in the vocabulary whole.
        config = json.loads(tokenizer.to_str())
        config["model"]["ignore_merges"] = True
        tokenizer = Tokenizer.from_str(json.dumps(config))
    tokenizer.save(str(out / f"{name}.tokenizer.json"))

    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer = gguf.GGUFWriter(str(out / f"{name}.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if token in specials else 1 for token in tokens])
    writer.add_bos_token_id(tokens.index(specials[0]))
    writer.add_eos_token_id(tokens.index(specials[1]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "ids": [tokenizer.encode(case, add_special_tokens=False).ids for case in cases(text)],
        "vocab": len(tokens),
    }


def sentencepiece_bpe(text, out):
    import gguf
    import sentencepiece as spm

    model = io.BytesIO()
    # Llama 2's trainer settings: byte fallback, digits split, whitespace kept as written.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")),
        model_writer=model,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=0.99,
        unk_id=0,
        bos_id=1,
        eos_id=2,
    )
    path = out / "llama-spm.model"
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ids = [sp.encode(case) for case in cases(text)]

    # transformers' own conversion of the same model (its Llama tokenizer) must agree.
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(path, Path(folder) / "tokenizer.model")
        converted = LlamaTokenizer.from_pretrained(folder)
    fast_ids = [converted.encode(case, add_special_tokens=False) for case in cases(text)]
    agree = sum(a == b for a, b in zip(ids, fast_ids))

    def kind(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_unused(i):
            return 5
        if sp.is_byte(i):
            return 6
        return 1

    size = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(out / "llama-spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(size)])
    writer.add_token_scores([sp.get_score(i) for i in range(size)])
    writer.add_token_types([kind(i) for i in range(size)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "ids": ids,
        "vocab": size,
        "transformers_agrees_on": f"{agree} of {len(ids)} cases",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    text = (args.out / "multilingual.txt").read_bytes().decode("utf-8")
    import tokenizers
    import sentencepiece
    import transformers

    reference = {
        "versions": {
            "tokenizers": tokenizers.__version__,
            "sentencepiece": sentencepiece.__version__,
            "transformers": transformers.__version__,
        },
        "llama-bpe": byte_level_bpe(
            "llama-bpe", LLAMA3_PATTERN, False, ["<|begin_of_text|>", "<|end_of_text|>"], text, args.out
        ),
        "qwen2": byte_level_bpe(
            "qwen2", QWEN2_PATTERN, True, ["<|im_start|>", "<|im_end|>"], text, args.out
        ),
        "llama-spm": sentencepiece_bpe(text, args.out),
    }
    (args.out / "reference.json").write_text(json.dumps(reference) + "\n")
    for name in ("llama-bpe", "qwen2", "llama-spm"):
        entry = reference[name]
        print(f"{name}: vocabulary {entry['vocab']}, {sum(map(len, entry['ids']))} ids", end="")
        print(f", transformers agrees on {entry['transformers_agrees_on']}" if "transformers_agrees_on" in entry else "")


if __name__ == "__main__":
    main()
