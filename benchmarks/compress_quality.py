"""What each compression method costs in quality, on a model kiln trains itself (issue 25).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compress_quality.py   # CPU, ~1 hour

Pretrains a Llama-family model (4 layers x 128, 4 heads, context 128, kiln's BPE of 2,048
tokens; 3,200 steps of 16 x 128 tokens, about 4 epochs of the bundled Shakespeare corpus, about
16 CPU-minutes on one core) with whole plays held out (kiln.train's document split). Small and
long rather than wide and short: a 4 x 256 model trained for 800 steps (0.4 tokens per
parameter) shrugged off everything (50% magnitude pruning +1.4% perplexity, int4 per-channel
RTN +0.1%), as undertrained models do; this one sees about 6 tokens per parameter. Then:

- pruning at 50% (magnitude, Wanda, SparseGPT), 2:4 (the same three), heads and MLP channels at
  25% (with and without a short recovery fine-tune); calibration text: training plays only;
- distillation: a 2 x 64 student distilled from it vs the same student trained from scratch
  for the same steps (kiln distill --alpha 0: the LM loss alone, same init and data);
- QAT: int4 g128 vs PTQ int4 g128 (RTN, GPTQ), with the full-precision model fine-tuned for
  the same steps as the control (QAT trains on more tokens than PTQ sees: the control says how
  much of its gain is just that);
- weight sharing: 2 layers unshared vs 4 layers sharing pairs (ALBERT) vs 3 layers with
  factorized embeddings (E = 24), at equal trained parameters (within 0.5%), each pretrained
  for the same steps.

Every model is scored on the same held-out tokens (kiln.eval.perplexity, windows of 128,
stride 64). Prints markdown tables, writes PNGs of quality against size into --figures and the
rows to --json. Every stage is cached under --workdir (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from quant_quality import calibration_text, held_out_ids, pretrain, size_mb

import kiln
from kiln.compress.config import DistillConfig, PruneConfig, QATConfig, TextData
from kiln.compress.distill import distill
from kiln.compress.prune import prune
from kiln.compress.qat import qat
from kiln.eval.ppl import perplexity
from kiln.model.loader import load_model
from kiln.quant.quantize import linears
from kiln.train.config import DataSpec, FinetuneConfig, ModelSpec, PretrainConfig, TrainConfig
from kiln.train.default_model import CORPUS
from kiln.train.pretrain import run_pretrain

BLOCK = 128
BASE = dict(
    model=dict(num_layers=4, num_heads=4, hidden_size=128, block_size=BLOCK),
    vocab_size=2048,
    train=dict(max_steps=3200, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=100,
               eval_interval=400, eval_steps=8, log_interval=50, ckpt_interval=400),
)  # fmt: skip
CALIB = dict(calib_samples=128, calib_len=BLOCK)
EVAL_TOKENS = 32768
RECOVER_STEPS = 100
STUDENT = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 192,
           "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
DISTILL_STEPS = 1000
QAT_STEPS = 300
QAT_GROUP = 128
SHARING = {  # label -> ModelSpec fields; equal trained parameters (within 0.5%)
    "2 layers": dict(num_layers=2),
    "4 layers, pairs shared": dict(num_layers=4, share_layers=2),
    "3 layers, E=24": dict(num_layers=3, embedding_size=24),
}
SHARING_STEPS = 1000


def finetune(steps: int, lr: float, device: str, **extra) -> FinetuneConfig:
    """The knobs of every short training run here (recovery, distillation, QAT)."""
    return FinetuneConfig(max_steps=steps, batch_size=16, lr=lr, min_lr=lr / 10,
                          warmup_steps=10, eval_interval=steps, eval_steps=8, log_interval=20,
                          device=device, **extra)  # fmt: skip


def nonzero_params(model) -> int:
    """Parameters that are not pruned zeros (each shared tensor once)."""
    zeros = sum(int((lin.weight == 0).sum()) for layer in model.layers
                for lin in linears(layer).values())  # fmt: skip
    return model.num_parameters() - zeros


def score(model_dir: Path, ids: torch.Tensor, device: str) -> dict:
    model = load_model(model_dir, dtype="float32", device=device)
    r = perplexity(model, ids, max_len=BLOCK, stride=BLOCK // 2, progress=False)
    return {
        "perplexity": r["perplexity"],
        "params": nonzero_params(model),
        "mb": size_mb(model_dir),
    }


def channel_ratio(x: torch.Tensor) -> float:
    """max / median of the per-channel RMS of x [..., channels] over its tokens."""
    rms = x.reshape(-1, x.shape[-1]).pow(2).mean(0).sqrt()
    return (rms.max() / rms.median()).item()


@torch.no_grad()
def outlier_stats(model_dir: Path, ids: torch.Tensor) -> dict:
    """How uneven the channels are (max / median channel RMS): the worst decoder Linear's
    input, and the worst block output (the residual stream)."""
    model = load_model(model_dir, dtype="float32", device="cpu")
    linear, residual = {}, {}
    for i, layer in enumerate(model.layers):
        for n, lin in linears(layer).items():
            name = f"layers.{i}.{n}"
            lin.register_forward_hook(lambda m, inp, out, k=name: linear.update({k: inp[0]}))
        layer.register_forward_hook(lambda m, inp, out, i=i: residual.update({i: out}))
    model(ids[: 8 * BLOCK].view(8, BLOCK))
    ratios = {k: channel_ratio(x) for k, x in linear.items()}
    worst = max(ratios, key=ratios.get)
    return {"worst_linear": worst, "worst_ratio": ratios[worst],
            "residual_ratio": max(channel_ratio(x) for x in residual.values())}  # fmt: skip


def cached(out: Path, make) -> Path:
    """out, made by make(out) unless a finished model (config.json) is there already."""
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        make(out)
        print(f"{out.name}: made in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def pruning_rows(base: Path, work: Path, calib: Path, device: str) -> dict[str, Path]:
    rows = {}
    for label, kwargs in {
        "magnitude 50%": dict(method="magnitude", sparsity=0.5),
        "wanda 50%": dict(method="wanda", sparsity=0.5),
        "sparsegpt 50%": dict(method="sparsegpt", sparsity=0.5),
        "magnitude 2:4": dict(method="magnitude", pattern="2:4"),
        "wanda 2:4": dict(method="wanda", pattern="2:4"),
        "sparsegpt 2:4": dict(method="sparsegpt", pattern="2:4"),
        "heads 25%": dict(method="heads", sparsity=0.25),
        "channels 25%": dict(method="channels", sparsity=0.25),
        f"heads 25% + {RECOVER_STEPS} steps": dict(method="heads", sparsity=0.25,
                                                   recover_steps=RECOVER_STEPS),
        f"channels 25% + {RECOVER_STEPS} steps": dict(method="channels", sparsity=0.25,
                                                      recover_steps=RECOVER_STEPS),
    }.items():  # fmt: skip
        cfg = PruneConfig(calib=str(calib), **CALIB, **kwargs)
        train = finetune(RECOVER_STEPS, 3e-4, device)
        out = work / label.replace(" ", "_").replace("%", "").replace(":", "-").replace("+", "")
        rows[label] = cached(out, lambda o, c=cfg, t=train: prune(base, o, c, t, TextData()))
    return rows


def distill_rows(base: Path, work: Path, device: str) -> dict[str, Path]:
    rows = {}
    for label, alpha in (("student from scratch", 0.0), ("student distilled", 0.5)):
        train = finetune(DISTILL_STEPS, 2e-3, device)
        cfg = DistillConfig(temperature=2.0, alpha=alpha)
        make = lambda o, c=cfg, t=train: distill(base, json.dumps(STUDENT), o, c, t, TextData())  # noqa: E731
        rows[label] = cached(work / label.replace(" ", "_"), make)
    return rows


def qat_rows(base: Path, work: Path, calib: Path, device: str) -> dict[str, Path]:
    train = finetune(QAT_STEPS, 1e-4, device)
    fp = PruneConfig("magnitude", 0.0, recover_steps=QAT_STEPS)  # prunes nothing: a fine-tune
    scheme = QATConfig(bits=4, group_size=QAT_GROUP)
    g = f"g{QAT_GROUP}"
    return {
        f"fp32 + {QAT_STEPS} steps": cached(
            work / "fp_finetuned", lambda o: prune(base, o, fp, train, TextData())
        ),
        f"rtn int4 {g}": cached(work / "rtn_int4", lambda o: kiln.quantize(
            base, o, method="rtn", bits=4, group_size=QAT_GROUP)),
        f"gptq int4 {g}": cached(work / "gptq_int4", lambda o: kiln.quantize(
            base, o, method="gptq", bits=4, group_size=QAT_GROUP, calib=calib, **CALIB)),
        f"qat int4 {g} ({QAT_STEPS} steps)": cached(
            work / "qat_int4", lambda o: qat(base, o, scheme, train, TextData())
        ),
    }  # fmt: skip


def sharing_rows(base: Path, work: Path, device: str) -> tuple[dict[str, Path], dict]:
    rows, trained = {}, {}
    for label, fields in SHARING.items():
        out = work / label.replace(" ", "_").replace(",", "").replace("=", "")
        spec = dict(BASE["model"]) | fields
        cfg = PretrainConfig(
            data=DataSpec(corpus=str(CORPUS), tokenizer=str(base.parent / "tokenizer")),
            model=ModelSpec(model_type="llama", **spec),
            train=TrainConfig(out_dir=str(out), device=device, **(BASE["train"] | dict(
                max_steps=SHARING_STEPS, eval_interval=SHARING_STEPS))),
        )  # fmt: skip
        record = out / "trained_params.json"
        if not record.is_file():
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            result = run_pretrain(cfg)
            record.write_text(json.dumps(result.get("trained_params", result["num_params"])))
            print(f"{label}: pretrained in {time.perf_counter() - t:.0f} s", flush=True)
        rows[label], trained[label] = out / "model", json.loads(record.read_text())
    return rows, trained


def table(title: str, rows: dict, base_label: str, size: str, note: dict | None = None) -> str:
    base = rows[base_label]["perplexity"]
    unit = {"mb": "weights MB", "params": "params (M, nonzero)", "trained": "params (M, trained)"}[
        size
    ]
    lines = [f"\n**{title}**\n", f"| model | held-out ppl | vs {base_label} | {unit} |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for label, r in rows.items():
        value = r["mb"] if size == "mb" else r["params"] / 1e6
        extra = f" ({note[label]})" if note and label in note else ""
        lines.append(f"| {label}{extra} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / base - 1):+.1f}% | {value:.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot(title: str, rows: dict, size: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, r) in enumerate(rows.items()):
        x = r["mb"] if size == "mb" else r["params"] / 1e6
        ax.scatter(x, r["perplexity"], color=f"C{i % 10}", s=40, zorder=3)
        ax.annotate(label, (x, r["perplexity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel({"mb": "weights MB (safetensors)", "params": "parameters (M, nonzero)",
                   "trained": "parameters trained (M)"}[size])  # fmt: skip
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/compress_quality"))
    p.add_argument("--figures", type=Path, default=Path("notes/figures"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    work, device = args.workdir, args.device
    work.mkdir(parents=True, exist_ok=True)

    base, meta = pretrain(work, BASE, device)
    ids = held_out_ids(work, meta, EVAL_TOKENS)
    calib = calibration_text(work, meta)
    stats = outlier_stats(base, ids)
    print(f"held out: {', '.join(meta['documents']['val'])} ({len(ids)} tokens scored)")
    print(
        f"input channel RMS max/median: worst Linear {stats['worst_linear']} "
        f"{stats['worst_ratio']:.1f}x, residual stream {stats['residual_ratio']:.1f}x"
    )

    sections = {
        "pruning": ({"base": base} | pruning_rows(base, work / "prune", calib, device), "params"),
        "distillation": (
            {"teacher (base)": base} | distill_rows(base, work / "distill", device),
            "params",
        ),  # fmt: skip
        "qat": ({"fp32": base} | qat_rows(base, work / "qat", calib, device), "mb"),
    }
    shared, trained = sharing_rows(base, work / "sharing", device)
    sections["sharing"] = (shared, "trained")

    results = {"outliers": stats, "sections": {}}
    args.figures.mkdir(parents=True, exist_ok=True)
    for name, (dirs, size) in sections.items():
        rows = {label: score(d, ids, device) for label, d in dirs.items()}
        note = None
        if name == "sharing":  # the parameters trained, not the materialized export's
            note = {k: f"exported {r['params'] / 1e6:.2f} M" for k, r in rows.items()}
            for label, n in trained.items():
                rows[label]["params"] = n
        results["sections"][name] = rows
        print(table(name, rows, next(iter(rows)), size, note))
        plot(f"kiln compress: {name} (held-out perplexity vs size)", rows, size,
             args.figures / f"compress_{name}.png")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
