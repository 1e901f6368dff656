"""What the KV cache levers cost in quality: perplexity on held-out text with a bf16, fp8 or
int8 KV cache, and with StreamingLLM or H2O eviction at 10%, 20% and 50% of the context.

    python benchmarks/kv_quality.py                  # GPU: trains a 6-layer char model
    python benchmarks/kv_quality.py --size cpu       # CPU (~5 min, 1 thread): 4 layers, 512
    python benchmarks/kv_quality.py --size cpu-bpe   # the same over kiln's BPE (1,024 tokens)
    python benchmarks/kv_quality.py --tiny           # CPU: a tiny model, to see it work

A model kiln trains on the bundled corpus (kiln.train.pretrain; reused from --workdir when
it is there), evaluated through the engine itself (EngineCore: its paged pool, kernels,
scales and evictor) on windows of `context - 1` tokens of the held-out split. Each window is one
request whose prompt is the window: the prompt is prefilled in chunks of --chunk tokens (a
KV block by default), so eviction acts between chunks as it does between decode steps, and
every position's next-token log-likelihood is read from the final norm's output. Prints a
table and writes kv_quality.png (perplexity against budget) next to --json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kiln.engine.core import EngineCore
from kiln.engine.sampling_params import SamplingParams
from kiln.train.config import load_config
from kiln.train.default_model import CORPUS
from kiln.train.pretrain import run_pretrain

SIZES = {  # ModelSpec / TrainConfig overrides
    "gpu": dict(num_layers=6, num_heads=6, num_kv_heads=2, hidden_size=384, block_size=1024,
                max_steps=600, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                device="cuda", tokenizer="char"),
    "cpu": dict(num_layers=4, num_heads=4, num_kv_heads=2, hidden_size=128, block_size=512,
                max_steps=400, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                device="cpu", tokenizer="char"),
    # the same with kiln's BPE (1,024 tokens): a window spans ~4x the text of a char model's
    "cpu-bpe": dict(num_layers=4, num_heads=4, num_kv_heads=2, hidden_size=128, block_size=512,
                    max_steps=400, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                    device="cpu", tokenizer="bpe", vocab_size=1024),
    "tiny": dict(num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64, block_size=256,
                 max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                 device="cpu", tokenizer="char"),
}  # fmt: skip


def train_model(workdir: Path, size: str) -> Path:
    """A model trained on the bundled corpus (reused if workdir has one): its directory."""
    if (workdir / "model" / "config.json").is_file():
        return workdir / "model"
    overrides = {k: str(v) for k, v in SIZES[size].items()}
    overrides["corpus"] = str(CORPUS)
    overrides.update(out_dir=str(workdir), eval_interval="100000", ckpt_interval="100000",
                     log_interval="50", eval_steps="1")  # fmt: skip
    run_pretrain(load_config(None, overrides))
    return workdir / "model"


def held_out(workdir: Path) -> np.ndarray:
    meta = json.loads((workdir / "data" / "meta.json").read_text())
    return np.fromfile(workdir / "data" / "val.bin", dtype=meta["dtype"]).astype(np.int64)


def window_nll(core: EngineCore, ids: list[int], rid: str) -> tuple[float, int]:
    """Sum of -log p(ids[t + 1] | the engine's KV of ids[:t + 1]) over the window, and the
    count: the prompt runs through the engine, the final norm's outputs are kept."""
    rows: list[torch.Tensor] = []
    hook = core.runner.model.norm.register_forward_hook(lambda m, i, o: rows.append(o.detach()))
    try:
        core.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=1))
        while core.has_work():
            core.step()
    finally:
        hook.remove()
    hidden = torch.cat(rows)[: len(ids) - 1]  # row t predicts token t + 1
    logits = core.runner.model.compute_logits(hidden).float()
    target = torch.tensor(ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return nll.item(), len(ids) - 1


def perplexity(model: Path, windows: list[list[int]], desc: str, **engine_args) -> float:
    core = EngineCore(str(model), use_cuda_graph=False, enable_prefix_caching=False,
                      **engine_args)  # fmt: skip
    total, count = 0.0, 0
    with torch.inference_mode():
        for i, w in enumerate(tqdm(windows, desc=desc, leave=False)):
            nll, n = window_nll(core, w, str(i))
            total, count = total + nll, count + n
    core.block_manager.check_all_free()
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny CPU model (to see it work)")
    p.add_argument("--size", choices=list(SIZES), default="gpu", help="model and context")
    p.add_argument("--workdir", default=None, help="the trained model and its data")
    p.add_argument("--windows", type=int, default=None, help="held-out windows (16; tiny 4)")
    p.add_argument("--block-size", type=int, default=None, help="KV block (16; tiny 4)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (a block)")
    p.add_argument("--budgets", default="0.1,0.2,0.5", help="fractions of the context")
    p.add_argument("--json", default="kv_quality.json")
    args = p.parse_args()
    size = "tiny" if args.tiny else args.size
    workdir = Path(args.workdir or f"runs/kv_quality_{size}")
    model = train_model(workdir, size)
    context = SIZES[size]["block_size"]
    block = args.block_size or (4 if args.tiny else 16)
    chunk = args.chunk or block
    tokens = held_out(workdir)
    n = args.windows or (4 if args.tiny else 16)
    assert len(tokens) >= n * context, f"{len(tokens)} held-out tokens < {n} x {context}"
    # a prompt leaves room for one generated token: windows of context - 1 tokens
    windows = [tokens[i * context : (i + 1) * context - 1].tolist() for i in range(n)]
    device = SIZES[size]["device"]
    common = dict(device=device, block_size=block, max_model_len=context)
    auto = "fp32"  # the model's dtype: the auto cache's
    if device == "cuda":
        common["dtype"], auto = "bfloat16", "bf16"

    rows = []
    for kv_dtype in ("auto", "fp8", "int8"):  # the whole window as one prefill
        ppl = perplexity(model, windows, kv_dtype, kv_cache_dtype=kv_dtype,
                         max_num_batched_tokens=context, **common)  # fmt: skip
        rows.append(dict(kv=auto if kv_dtype == "auto" else kv_dtype, eviction="none",
                         budget=context, ppl=ppl))  # fmt: skip
    full = perplexity(model, windows, "chunked", max_num_batched_tokens=chunk, **common)
    rows.append(dict(kv=auto, eviction="none (chunked)", budget=context, ppl=full))
    for frac in (float(f) for f in args.budgets.split(",")):
        budget = max(int(frac * context), 4 + block)  # at least sinks + one block
        for policy in ("streaming", "h2o"):
            ppl = perplexity(model, windows, f"{policy} {budget}", kv_eviction=policy,
                             kv_budget=budget, max_num_batched_tokens=chunk, **common)  # fmt: skip
            rows.append(dict(kv=auto, eviction=policy, budget=budget, ppl=ppl))

    base = rows[0]["ppl"]
    print(f"\nperplexity, {n} held-out windows of {context} tokens ({model})")
    print(f"{'kv':>6} {'eviction':>16} {'budget':>7} {'ppl':>9} {'vs ' + auto:>8}")
    for r in rows:
        print(f"{r['kv']:>6} {r['eviction']:>16} {r['budget']:>7} {r['ppl']:9.3f} "
              f"{100 * (r['ppl'] / base - 1):+7.2f}%")  # fmt: skip
    Path(args.json).write_text(json.dumps(dict(context=context, windows=n, rows=rows), indent=1))
    plot(rows, full, context, Path(args.json).with_suffix(".png"))


def plot(rows, full: float, context: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in ("streaming", "h2o"):
        pts = [(r["budget"] / context, r["ppl"]) for r in rows if r["eviction"] == policy]
        ax.plot(*zip(*pts), marker="o", label=policy)
    ax.axhline(full, color="gray", linestyle="--", label="full cache")
    ax.set_xlabel("KV budget (fraction of the context)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
