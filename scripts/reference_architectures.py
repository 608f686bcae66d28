#!/usr/bin/env python3
"""Write the per-architecture reference fixtures the trainer's Rust tests check against.

For each decoder family the trainer runs (Llama 3.x, Mistral, Qwen2, Qwen3) this script builds a
tiny model from a config (nothing is downloaded), initialises it so that attention is sharp and
biases and norms are far from their defaults, and records with Hugging Face transformers, in
float64:

* the logits of two fixed token sequences (longer than Mistral's sliding window),
* the top-1/top-2 logit margins and how peaked attention is (so a wrong RoPE, scale, mask or norm
  cannot hide behind near-uniform attention),
* the RoPE inverse frequencies transformers computed (Llama 3 scaling included),
* a LoRA adapter on all seven projections, saved by `peft` in its own layout, and the logits with
  it applied.

Each model is written as a Hugging Face folder (config.json + model.safetensors) and as a GGUF
file laid out as llama.cpp's converter lays it out (Llama's query/key rows permuted to interleaved
rotary pairs, Llama 3's scaling as a `rope_freqs.weight` divisor per frequency), written with the
`gguf` package's own tensor and key names. llama.cpp converts `MistralForCausalLM` as
`general.architecture = llama` and writes no sliding window, so its runtime attends to the whole
context; for Mistral the script also records transformers' logits with the window switched off,
which is what that file computes.

Usage:
    python scripts/reference_architectures.py [--out DIR]
    python scripts/reference_architectures.py --check-adapter DIR --arch NAME [--out DIR]

The second form loads an adapter the Rust side exported with `peft`, strictly (no missing or
unexpected keys), and checks it changes the logits as the fixture's adapter does.

Needs: torch, transformers (5.x), peft, safetensors, gguf, numpy.
"""

import argparse
import copy
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "trainer/tests/fixtures/arch"

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)
SEQUENCES, LENGTH = 2, 12


def configs():
    """The four families, each with the options that set it apart switched on."""
    return {
        # Llama 3.x: llama3 RoPE scaling (all three frequency bands occur at head size 8),
        # biases on all four attention projections, untied head.
        "llama": LlamaConfig(
            **SHAPE,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
        # Mistral: heads wider than hidden / heads, a sliding window shorter than the sequence.
        "mistral": MistralConfig(
            **SHAPE,
            head_dim=12,
            sliding_window=4,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        # Qwen2/2.5: biased q/k/v, unbiased output, tied head.
        "qwen2": Qwen2Config(
            **SHAPE,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        # Qwen3: per-head RMSNorm on queries and keys, explicit head size, linear RoPE scaling.
        "qwen3": Qwen3Config(
            **SHAPE,
            head_dim=12,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
        ),
    }


def sharpen(model, generator):
    """Weights that make attention peaked and every bias and norm matter."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            def normal(std):
                return torch.randn(param.shape, generator=generator) * std

            def uniform(low, high):
                return low + (high - low) * torch.rand(param.shape, generator=generator)

            if name.endswith("embed_tokens.weight"):
                value = normal(1.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                value = uniform(1.5, 3.0)
            elif name.endswith("norm.weight"):
                value = uniform(0.5, 1.5)
            elif name.endswith(".bias"):
                value = normal(0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                value = normal(2.0 / math.sqrt(hidden))
            elif name.endswith("lm_head.weight"):
                value = normal(2.0 / math.sqrt(hidden))
            else:
                value = normal(1.0 / math.sqrt(param.shape[1]))
            param.copy_(value)


def token_ids(vocab, generator):
    return torch.randint(0, vocab, (SEQUENCES, LENGTH), generator=generator)


def attention_peak(model, ids):
    """Mean over layers, heads and queries (past the first four) of the largest attention weight."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(ids, output_attentions=True)
    peaks = [a[:, :, 4:, :].max(dim=-1).values.mean().item() for a in out.attentions]
    return sum(peaks) / len(peaks)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def margins(logits):
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).flatten()


def write_gguf(name, model, path):
    """The model as llama.cpp's converter writes it, in f32."""
    import gguf

    # Mistral goes through llama.cpp's Llama converter: same name, same permutation, no window.
    llama_layout = name in ("llama", "mistral")
    arch = {
        "llama": gguf.MODEL_ARCH.LLAMA,
        "mistral": gguf.MODEL_ARCH.LLAMA,
        "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3,
    }[name]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    scaling = config.rope_parameters.get("rope_type", "default")
    if scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR

    def interleave(rows, heads):
        # Hugging Face's rotate-half rows [heads, 2, head_dim / 2] to llama.cpp's [heads, head_dim / 2, 2].
        shape = rows.shape
        return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)

    leaf = {
        "input_layernorm.weight": (T.ATTN_NORM, "weight"),
        "post_attention_layernorm.weight": (T.FFN_NORM, "weight"),
        "self_attn.q_proj.weight": (T.ATTN_Q, "weight"),
        "self_attn.k_proj.weight": (T.ATTN_K, "weight"),
        "self_attn.v_proj.weight": (T.ATTN_V, "weight"),
        "self_attn.o_proj.weight": (T.ATTN_OUT, "weight"),
        "self_attn.q_proj.bias": (T.ATTN_Q, "bias"),
        "self_attn.k_proj.bias": (T.ATTN_K, "bias"),
        "self_attn.v_proj.bias": (T.ATTN_V, "bias"),
        "self_attn.o_proj.bias": (T.ATTN_OUT, "bias"),
        "self_attn.q_norm.weight": (T.ATTN_Q_NORM, "weight"),
        "self_attn.k_norm.weight": (T.ATTN_K_NORM, "weight"),
        "mlp.gate_proj.weight": (T.FFN_GATE, "weight"),
        "mlp.up_proj.weight": (T.FFN_UP, "weight"),
        "mlp.down_proj.weight": (T.FFN_DOWN, "weight"),
    }
    for hf_name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy().copy()
        if hf_name == "model.embed_tokens.weight":
            gguf_name = names[T.TOKEN_EMBD] + ".weight"
        elif hf_name == "model.norm.weight":
            gguf_name = names[T.OUTPUT_NORM] + ".weight"
        elif hf_name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            gguf_name = names[T.OUTPUT] + ".weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            kind, suffix = leaf[rest]
            gguf_name = names[kind].format(bid=int(layer)) + "." + suffix
            if llama_layout and rest.startswith("self_attn.q_proj"):
                data = interleave(data, config.num_attention_heads)
            elif llama_layout and rest.startswith("self_attn.k_proj"):
                data = interleave(data, config.num_key_value_heads)
        writer.add_tensor(gguf_name, data)
    if scaling == "llama3":
        # llama.cpp keeps Llama 3's scaling as a divisor per frequency.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        plain = 1.0 / (config.rope_parameters["rope_theta"] ** exponent)
        scaled = model.model.rotary_emb.inv_freq.double()
        writer.add_tensor(names[T.ROPE_FREQS] + ".weight", (plain / scaled).float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build(name, config, out):
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sharpen(model, generator)
    if config.tie_word_embeddings:
        model.tie_weights()
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)

    ids = token_ids(config.vocab_size, generator)
    reference = copy.deepcopy(model).double()
    logits = logits_of(reference, ids)
    peak = attention_peak(reference, ids)

    import peft

    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none"
    )
    adapted = peft.get_peft_model(copy.deepcopy(model), lora_config)
    with torch.no_grad():
        for param_name, param in adapted.named_parameters():
            if "lora_A" in param_name or "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapted.save_pretrained(folder / "adapter")
    (folder / "adapter" / "README.md").unlink(missing_ok=True)
    lora_logits = logits_of(copy.deepcopy(adapted).double(), ids)

    write_gguf(name, model, out / f"{name}.gguf")
    full_attention_logits = None
    if getattr(config, "sliding_window", None) is not None:
        whole = copy.deepcopy(reference)
        whole.config.sliding_window = None
        full_attention_logits = logits_of(whole, ids)
        # The window must matter at these lengths, or the fixture tests nothing.
        assert (full_attention_logits - logits).abs().max().item() > 0.1

    summary = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "ids": ids.tolist(),
        "vocab": config.vocab_size,
        "logits": [round(v, 9) for v in logits.flatten().tolist()],
        "lora_logits": [round(v, 9) for v in lora_logits.flatten().tolist()],
        "lora_scale": lora_config.lora_alpha / lora_config.r,
        "inv_freq": reference.model.rotary_emb.inv_freq.double().tolist(),
        "attention_scaling": float(reference.model.rotary_emb.attention_scaling),
        "min_margin": margins(logits).min().item(),
        "lora_min_margin": margins(lora_logits).min().item(),
        "attention_peak": peak,
        "full_attention_logits": None
        if full_attention_logits is None
        else [round(v, 9) for v in full_attention_logits.flatten().tolist()],
        "lora_change": (lora_logits - logits).abs().max().item(),
        "logit_scale": logits.abs().max().item(),
    }
    (folder / "reference.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"{name}: attention peak {peak:.3f}, min top-1/top-2 margin {summary['min_margin']:.4f}, "
        f"largest logit {summary['logit_scale']:.2f}, LoRA changes logits by up to {summary['lora_change']:.2f}"
    )


def check_adapter(name, adapter_dir, out):
    """Loads a Rust-exported adapter with peft, strictly, and compares its logits."""
    import peft
    from safetensors.torch import load_file

    folder = out / name
    reference = json.loads((folder / "reference.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(model, adapter_dir)
    stored = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    expected = {
        k.replace(".default", "")
        for k in adapted.state_dict()
        if "lora_" in k
    }
    missing = sorted(expected - set(stored))
    unexpected = sorted(set(stored) - expected)
    ids = torch.tensor(reference["ids"])
    logits = logits_of(adapted.double(), ids).flatten()
    want = torch.tensor(reference["lora_logits"], dtype=torch.float64)
    error = (logits - want).abs().max().item()
    print(f"{name}: missing {missing}, unexpected {unexpected}, largest logit difference {error:.2e}")
    return not missing and not unexpected and error < 1e-4


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check-adapter", type=Path)
    parser.add_argument("--arch")
    args = parser.parse_args()
    if args.check_adapter:
        sys.exit(0 if check_adapter(args.arch, args.check_adapter, args.out) else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    for name, config in configs().items():
        build(name, config, args.out)


if __name__ == "__main__":
    main()
