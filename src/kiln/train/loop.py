"""THE training loop, shared by pretraining, SFT and DPO.

    for step in range(start, max_steps):
        lr = warmup + cosine(step)
        for micro in range(grad_accum):
            batch = train_batch(step * grad_accum + micro)
            loss, metrics = loss_fn(model, batch)   # under bf16 autocast on CUDA
            (loss / grad_accum).backward()          # DDP all-reduces on the last micro-step
        clip grads; AdamW step
        log (JSONL + tqdm) / validate / checkpoint (atomic) every N steps

What a run needs comes in as arguments: the model, a TrainConfig, `train_batch(i)` (a pure
function of the micro-step index, so `resume=True` replays the same data) and
`loss_fn(model, batch) -> (loss, metrics)`. `loss_fn` receives the model as the loop runs it
(DDP-wrapped, compiled): call it, do not reach into its submodules. Only parameters with
requires_grad are optimized and checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kiln.errors import CheckpointError, ConfigError, KilnError
from kiln.train import distributed
from kiln.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from kiln.train.config import TrainConfig

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, Any]]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW over trainable params; matrices decay, norms/biases do not; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )


def autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_batch: Callable[[int], Any],
    loss_fn: LossFn,
    val_batch: Callable[[int], Any] | None = None,
    resume: bool = False,
    on_save: Callable[[Path], None] | None = None,
) -> dict:
    """Train `model` in place; returns the final step, losses, throughput and file paths."""
    cfg.validate()
    if cfg.pipeline_parallel > 1:
        raise ConfigError("pipeline_parallel runs in kiln pretrain (kiln.train.pipeline)")
    info = distributed.init(cfg.device)
    out = Path(cfg.out_dir)
    ckpt = out / CHECKPOINT_NAME
    if not resume and ckpt.exists():
        raise CheckpointError(
            f"{str(ckpt)!r} already exists: pass resume to continue it, or use another out_dir"
        )
    if info.is_main:
        remove_stale_temporaries(ckpt)  # ~ a checkpoint's size each, left by a kill mid-write
    torch.manual_seed(cfg.seed + info.rank)
    model.to(info.device).train()
    if cfg.compile:
        model.compile()  # in place: parameter names (and checkpoints) stay unchanged
    runner = distributed.wrap(model, info, cfg.fsdp)
    optimizer = make_optimizer(model, cfg, info.device)
    start = load_checkpoint(ckpt, model, optimizer)[0] if resume else 0
    log = RunLog(out, info.is_main, keep_until=start)
    log.write({"event": "start", "step": start, "world_size": info.world_size, **asdict(cfg)})
    ctx = autocast(cfg, info.device)
    progress = _progress_bar(cfg.max_steps, start, info.is_main)
    meter = Meter()
    result: dict[str, Any] = {"step": start, "checkpoint": str(ckpt), "log": str(log.path)}
    for step in range(start, cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batches = (train_batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum))
        loss, grad_norm = train_step(runner, optimizer, loss_fn, batches, cfg, ctx, meter, info)
        done = step + 1
        progress.update(1)
        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            record = meter.flush(done, optimizer.param_groups[0]["lr"], grad_norm)
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            result.update(train_loss=record["loss"])
            if "tokens_per_s" in record:
                result["tokens_per_s"] = record["tokens_per_s"]
        if val_batch is not None and (done % cfg.eval_interval == 0 or done == cfg.max_steps):
            val_loss = evaluate(model, loss_fn, val_batch, cfg.eval_steps, ctx, info.device)
            log.write({"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            result.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            meter.restart_clock()
        if done % cfg.ckpt_interval == 0 or done == cfg.max_steps:
            _check_finite(float(loss), done)
            save_checkpoint(ckpt, model, optimizer, done)
            if on_save is not None and info.is_main:
                on_save(ckpt)
            meter.restart_clock()
        result["step"] = done
    progress.close()
    if info.is_main:
        result["plot"] = str(plot_losses(log.path, out / "loss.png"))
    return result


def train_step(runner, optimizer, loss_fn, batches, cfg, ctx, meter, info) -> tuple[Tensor, Tensor]:
    """One optimizer step over grad_accum micro-batches; returns (last loss, grad norm)."""
    for micro, batch in enumerate(batches):
        with distributed.no_sync(runner, micro == cfg.grad_accum - 1):
            with ctx:
                loss, metrics = loss_fn(runner, to_device(batch, info.device))
            (loss / cfg.grad_accum).backward()
        meter.add(loss.detach(), metrics, info.world_size)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@torch.no_grad()
def evaluate(model, loss_fn: LossFn, val_batch, steps: int, ctx, device) -> float:
    """Mean loss over val_batch(0..steps-1), averaged across ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(steps):
        with ctx:
            loss, _ = loss_fn(model, to_device(val_batch(i), device))
        total += loss.float()
    model.train()
    return float(distributed.mean_across_ranks(total / steps))


def to_device(batch, device: torch.device):
    """Move a tensor, or a tuple/list/dict of them, to `device`."""
    if isinstance(batch, Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # a pageable copy would wait for the GPU to go idle
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Meter:
    """Accumulates losses/metrics between log lines without syncing the device every step.

    A metric named `num_tokens` counts the tokens of a micro-batch and becomes `tokens_per_s`.
    """

    def __init__(self):
        self.restart_clock()
        self._reset()

    def _reset(self):
        self.loss_sum, self.micro, self.tokens = None, 0, 0.0
        self.metric_sums: dict[str, Any] = {}

    def restart_clock(self):
        """Leave evaluation and checkpoint time out of the throughput."""
        self.t0 = time.perf_counter()
        self.tokens = 0.0

    def add(self, loss: Tensor, metrics: dict[str, Any], world_size: int):
        self.loss_sum = loss.float() if self.loss_sum is None else self.loss_sum + loss.float()
        self.micro += 1
        for k, v in metrics.items():
            if k == "num_tokens":
                self.tokens += float(v) * world_size
            else:
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v

    def flush(self, step: int, lr: float, grad_norm: Tensor) -> dict[str, Any]:
        values = torch.stack([self.loss_sum / self.micro, grad_norm.float().to(self.loss_sum)])
        loss, norm = distributed.mean_across_ranks(values).tolist()
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm}
        record |= {k: float(v) / self.micro for k, v in self.metric_sums.items()}
        if self.tokens:
            record["tokens_per_s"] = self.tokens / elapsed
        record["elapsed_s"] = elapsed
        _check_finite(loss, step)
        self._reset()
        self.restart_clock()
        return record


def _check_finite(loss: float, step: int) -> None:
    if math.isnan(loss) or math.isinf(loss):
        raise KilnError(f"training loss became {loss} by step {step}; the last checkpoint is kept")


class RunLog:
    """out_dir/log.jsonl, one JSON object a line; a resumed run drops lines past its start."""

    def __init__(self, out_dir: Path, is_main: bool, keep_until: int):
        self.path = out_dir / "log.jsonl"
        self.is_main = is_main
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if json.loads(line).get("step", 0) <= keep_until:
                    kept.append(line + "\n")
        tmp = self.path.with_name("log.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")


def plot_losses(log_path: Path, png_path: Path) -> Path:
    """Train and validation loss against step, from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for pts, label in ((train_pts, "train"), (val_pts, "val")):
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
