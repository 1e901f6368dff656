"""Pretraining throughput and model FLOPs utilization (MFU) of kiln's training loop.

    python benchmarks/bench_pretrain.py                       # GPT-2 124M shape, bf16, compile
    python benchmarks/bench_pretrain.py --no-compile --batch-size 8

H100 80GB HBM3 (kiln 2026-11): 480k tokens/s, 41.5% MFU at 32x1024; 414k, 35.8% at 16x1024.

Runs the real loop (kiln.train.loop.train) on random tokens, so the number includes
everything a step does (data, autocast forward, backward, clipping, fused AdamW). FLOPs per
token follow nanoGPT / PaLM: 6 * N (non-position-embedding params) + 12 * L * H * T.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from kiln.model.transformer import Transformer
from kiln.train.config import ModelSpec, TrainConfig
from kiln.train.loop import train
from kiln.train.pretrain import compiled_loss, lm_loss, model_config

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


def flops_per_token(config, block_size: int) -> float:
    n = config.num_params
    if config.position_embedding == "learned":
        n -= config.max_position_embeddings * config.hidden_size
    attn = 12 * config.num_layers * config.hidden_size * block_size
    return 6 * n + attn


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-type", default="gpt2")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()

    spec = ModelSpec(
        model_type=args.model_type, num_layers=args.layers, num_heads=args.heads,
        hidden_size=args.hidden, block_size=args.block_size,
    )  # fmt: skip
    config = model_config(spec, args.vocab, None, None)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    b, t = args.batch_size, args.block_size

    def batch(i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, args.vocab, (b, t + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out, max_steps=args.steps, batch_size=b, grad_accum=args.grad_accum,
            warmup_steps=10, log_interval=10, ckpt_interval=10**9, eval_interval=10**9,
            compile=not args.no_compile, dtype=args.dtype,
        )  # fmt: skip
        cfg.ckpt_interval = args.steps  # one save at the end, outside the timed intervals
        train(model, cfg, batch, lm_loss if args.no_compile else compiled_loss())
        records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # skip compile
    tokens_per_s = statistics.median(rates)
    fpt = flops_per_token(config, t)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops(device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params_M": round(config.num_params / 1e6, 1),
        "batch": f"{b}x{t}x{args.grad_accum}",
        "compile": not args.no_compile,
        "tokens_per_s": round(tokens_per_s),
        "tflops": round(tokens_per_s * fpt / 1e12, 1),
        "mfu": round(tokens_per_s * fpt / peak, 4) if peak else None,
        "final_loss": records[-1].get("loss"),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
