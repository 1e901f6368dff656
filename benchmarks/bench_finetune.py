"""LoRA against full fine-tuning through the shared loop: tokens/s and peak memory side by side.

    python benchmarks/bench_finetune.py                 # Qwen3-0.6B-shaped random model (GPU)
    python benchmarks/bench_finetune.py --tiny          # a tiny model, to check it runs on CPU

Every row trains a fresh random model for --steps steps of SFT on --batch-size x --seq-len
random tokens (every token trained), bfloat16 autocast on CUDA, AdamW. tokens/s is the loop's
own meter over the last --log-interval steps; peak memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shapes import QWEN3_0_6B  # noqa: E402

from kiln.config import ModelConfig  # noqa: E402
from kiln.model.lora import LoraConfig, apply_lora  # noqa: E402
from kiln.model.transformer import Transformer  # noqa: E402
from kiln.train.finetune_data import Example  # noqa: E402
from kiln.train.loop import TrainConfig, train  # noqa: E402
from kiln.train.sft import collate, sft_loss  # noqa: E402

QWEN3_06B = dict(QWEN3_0_6B, model_type="qwen3", hidden_act="silu", torch_dtype="bfloat16")
TINY = {**QWEN3_06B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16}  # fmt: skip

# (name, weight dtype, LoRA config or None)
QV = ["q_proj", "v_proj"]
RUNS = [
    ("full, fp32 master weights", torch.float32, None),
    ("full, bf16 weights", torch.bfloat16, None),
    ("LoRA r=16 all-linear", torch.bfloat16, LoraConfig(r=16, lora_alpha=32)),
    ("LoRA r=16 q,v", torch.bfloat16, LoraConfig(r=16, lora_alpha=32, target_modules=QV)),
]


def build(config: ModelConfig, dtype: torch.dtype, device: str) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config)
    model.init_weights()
    return model.to(dtype)


def run_one(config, dtype, lora, args, device) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(config, dtype, device)
    if lora is not None:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    batch = collate([Example(row.tolist(), [True] * args.seq_len) for row in ids], 0)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out,
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=1e-4,
            warmup_steps=2,
            log_interval=args.log_interval,
            eval_interval=args.steps,
            ckpt_interval=args.steps,
        )
        t0 = time.perf_counter()
        result = train(model, cfg, lambda i: batch, sft_loss)
        wall = time.perf_counter() - t0
        log = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if "tokens_per_s" in r][-1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model
    return {
        "trainable": trainable,
        "tokens_per_s": last["tokens_per_s"],
        "peak_gib": peak,
        "loss": result["train_loss"],
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ModelConfig.from_hf(TINY if args.tiny else QWEN3_06B)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; model: {config.num_params / 1e6:.0f}M params, "
          f"{args.batch_size} x {args.seq_len} tokens a step, {args.steps} steps")  # fmt: skip
    header = f"| {'run':28} | {'trainable':>11} | {'tokens/s':>9} | {'peak GiB':>8} | {'loss':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for run_name, dtype, lora in RUNS:
        r = run_one(config, dtype, lora, args, device)
        print(f"| {run_name:28} | {r['trainable'] / 1e6:10.2f}M | {r['tokens_per_s']:9.0f} | "
              f"{r['peak_gib']:8.2f} | {r['loss']:6.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
