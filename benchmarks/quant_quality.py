"""What each quantization method costs in quality, on a model kiln trains itself (issue 16).

    PYTHONPATH=src python benchmarks/quant_quality.py            # GPU: GPT-2-small shape
    PYTHONPATH=src python benchmarks/quant_quality.py --tiny     # CPU: a tiny model (minutes)

Pretrains a Llama-family model with GPT-2-small's shape (12 layers x 768, 12 heads; kiln
quantize does not take GPT-2's fused c_attn) on the bundled Shakespeare corpus, whole plays held
out (kiln.train's document split), quantizes it with every method (calibration text: training
plays only), and scores the held-out plays with kiln.eval.perplexity (sliding window, stride half
the context). Prints a markdown table against the issue's targets (int8 and FP8 within 0.5% of
bf16; GPTQ and AWQ 4-bit g128 within 3% and better than RTN 4-bit) and writes quant_quality.png
(and --json) under --workdir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.eval.ppl import perplexity
from kiln.model.loader import load_model
from kiln.train.config import DataSpec, ModelSpec, PretrainConfig, TrainConfig
from kiln.train.default_model import CORPUS
from kiln.train.pretrain import run_pretrain

# label -> kiln.quantize options (None: the unquantized baseline); target: the most a method
# may lose against the baseline (and for 4-bit GPTQ / AWQ: beat RTN 4-bit).
METHODS = {
    "rtn int8": dict(method="rtn", bits=8, group_size=-1),
    "rtn int4 g128": dict(method="rtn", bits=4, group_size=128),
    "gptq int4 g128": dict(method="gptq", bits=4, group_size=128),
    "awq int4 g128": dict(method="awq", bits=4, group_size=128),
    "smoothquant w8a8": dict(method="smoothquant"),
    "fp8 w8a8": dict(method="fp8"),
}
TARGETS = {
    "rtn int8": 0.5,
    "smoothquant w8a8": 0.5,
    "fp8 w8a8": 0.5,
    "gptq int4 g128": 3.0,
    "awq int4 g128": 3.0,
}
BEAT_RTN4 = ("gptq int4 g128", "awq int4 g128")

# (model, training, calibration, evaluation) sizes; --tiny runs on a laptop's CPU.
GPU = dict(
    model=dict(num_layers=12, num_heads=12, hidden_size=768, block_size=512, dropout=0.1),
    vocab_size=4096,
    train=dict(max_steps=800, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=100,
               eval_interval=200, eval_steps=20, compile=True),
    calib=dict(calib_samples=128, calib_len=512),
    eval_tokens=None,
)  # fmt: skip
TINY = dict(
    model=dict(num_layers=2, num_heads=4, hidden_size=128, block_size=128, dropout=0.0),
    vocab_size=512,
    train=dict(max_steps=150, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20,
               eval_interval=150, eval_steps=4, compile=False),
    calib=dict(calib_samples=16, calib_len=128),
    eval_tokens=8192,
)  # fmt: skip


def pretrain(workdir: Path, size: dict, device: str) -> tuple[Path, dict]:
    """Train (or reuse) the model; its HF directory and the data split's metadata."""
    cfg = PretrainConfig(
        data=DataSpec(corpus=str(CORPUS), tokenizer="bpe", vocab_size=size["vocab_size"]),
        model=ModelSpec(model_type="llama", **size["model"]),
        train=TrainConfig(out_dir=str(workdir / "pretrain"), device=device, **size["train"]),
    )
    model_dir = workdir / "pretrain" / "model"
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        result = run_pretrain(cfg)
        print(f"pretrained in {time.perf_counter() - t:.0f} s: val loss {result['val_loss']:.3f}")
    meta = json.loads((workdir / "pretrain" / "data" / "meta.json").read_text())
    return model_dir, meta


def held_out_ids(workdir: Path, meta: dict, limit: int | None) -> torch.Tensor:
    """The held-out plays' tokens (kiln.train's val split), the first `limit` of them."""
    ids = np.fromfile(workdir / "pretrain" / "data" / "val.bin", dtype=meta["dtype"])
    return torch.from_numpy(ids[:limit].astype(np.int64))


def calibration_text(workdir: Path, meta: dict) -> Path:
    """Training plays only, so that no held-out text calibrates a method."""
    out = workdir / "calib.txt"
    texts = [(CORPUS / name).read_text(encoding="utf-8") for name in meta["documents"]["train"]]
    out.write_text("\n".join(texts), encoding="utf-8")
    return out


def size_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20


def verdict(label: str, delta: float, rows: dict) -> str:
    """The issue's target for this method and whether it is met."""
    checks = []
    if label in TARGETS:
        checks.append((f"<= +{TARGETS[label]}%", delta <= TARGETS[label]))
    if label in BEAT_RTN4 and "rtn int4 g128" in rows:
        checks.append(
            ("< rtn int4", rows[label]["perplexity"] < rows["rtn int4 g128"]["perplexity"])
        )
    return ", ".join(f"{t} {'ok' if ok else 'MISSED'}" for t, ok in checks)


def plot(rows: dict, baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    ppl = [rows[k]["perplexity"] for k in labels]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(labels, ppl, color=["0.5"] + ["C0"] * (len(labels) - 1))
    ax.axhline(rows[baseline]["perplexity"], color="0.3", lw=0.8, ls="--")
    for bar, k in zip(bars, labels):
        ax.annotate(f"{rows[k]['delta_pct']:+.2f}%", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
    lo = min(ppl)
    ax.set_ylim(lo * 0.97, max(ppl) * 1.01)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("kiln quantize: perplexity of each method vs the unquantized model")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (minutes)")
    p.add_argument("--workdir", type=Path, default=Path("runs/quant_quality"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--max-steps", type=int, default=None, help="training steps (GPU: 800)")
    p.add_argument("--fresh", action="store_true", help="retrain and requantize from scratch")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = TINY if args.tiny else GPU
    if args.max_steps:
        size = size | {"train": size["train"] | {"max_steps": args.max_steps}}
    if args.fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)

    model_dir, meta = pretrain(args.workdir, size, device)
    ids = held_out_ids(args.workdir, meta, size["eval_tokens"])
    calib = calibration_text(args.workdir, meta)
    block = size["model"]["block_size"]
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    baseline = "bf16" if dtype == "bfloat16" else "fp32"
    print(f"held out: {', '.join(meta['documents']['val'])} ({len(ids)} tokens scored)")

    dirs = {baseline: model_dir}
    for label in args.methods:
        out = args.workdir / label.replace(" ", "_")
        if not out.is_dir():
            opts = METHODS[label]
            calibrated = opts["method"] in ("gptq", "awq", "smoothquant")
            extra = dict(calib=calib, **size["calib"]) if calibrated else {}
            t = time.perf_counter()
            kiln.quantize(model_dir, out, device=device, progress=True, **opts, **extra)
            print(f"{label}: quantized in {time.perf_counter() - t:.1f} s")
        dirs[label] = out

    rows = {}
    for label, d in dirs.items():
        model = load_model(d, dtype=dtype, device=device)
        t = time.perf_counter()
        r = perplexity(model, ids, max_len=block, stride=block // 2, progress=False)
        rows[label] = {"perplexity": r["perplexity"], "tokens": r["tokens"], "mb": size_mb(d)}
        print(f"{label}: perplexity {r['perplexity']:.3f} ({time.perf_counter() - t:.1f} s)")
        del model
    base = rows[baseline]["perplexity"]
    for row in rows.values():
        row["delta_pct"] = 100 * (row["perplexity"] / base - 1)

    print(f"\n| method | perplexity | vs {baseline} | weights MB | target |")
    print("|---|---:|---:|---:|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['perplexity']:.3f} | {row['delta_pct']:+.2f}% | "
              f"{row['mb']:.1f} | {verdict(label, row['delta_pct'], rows)} |")  # fmt: skip
    png = args.workdir / "quant_quality.png"
    plot(rows, baseline, png)
    print(f"\nplot: {png}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
