"""Pipeline parallelism for training, on torch.distributed.pipelining.

The Transformer is cut into `num_stages` stages of consecutive blocks (stage 0 also embeds the
tokens, the last stage also applies the final norm, the LM head and the loss); each rank of the
pipeline group holds one stage. A batch is split into micro-batches that flow through the
stages under a GPipe schedule (every forward, then every backward) or 1F1B (one forward, one
backward, in steady state: fewer activations alive at once). The schedule scales the gradients
by 1 / micro-batches, so a step equals one process's step over the whole batch.

    runner = PipelineRunner(model, rank, num_stages, num_microbatches, "1f1b", device)
    loss = runner.step(x, y)      # forward + backward; the batch's mean loss on the last stage
    clip_grad_norm(runner.parameters(), max_norm)   # the norm over every stage
    optimizer.step()

Tied embeddings: stage 0's embedding and the last stage's LM head start equal, their
gradients are summed between the two ranks after each backward, so they stay equal.

Parameter names stay the Transformer's (`layers.5.mlp.up_proj.weight`), so the stages' state
dicts together are the whole model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError
from kiln.model.attention import DENSE_CAUSAL
from kiln.model.transformer import Transformer

SCHEDULES = ("gpipe", "1f1b")


def stage_layers(num_layers: int, index: int, num_stages: int) -> range:
    """The blocks stage `index` of `num_stages` holds: a balanced contiguous split."""
    return range(index * num_layers // num_stages, (index + 1) * num_layers // num_stages)


class Stage(nn.Module):
    """Blocks of a Transformer; stage 0 embeds, the last stage norms and projects to logits."""

    def __init__(self, model: Transformer, index: int, num_stages: int):
        super().__init__()
        first, last = index == 0, index == num_stages - 1
        self.embed_tokens = model.embed_tokens if first else None
        self.embed_positions = model.embed_positions if first else None
        keep = stage_layers(len(model.layers), index, num_stages)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in keep})
        self.rotary = model.rotary
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: token ids [B, T] into stage 0, hidden states [B, T, H] between stages
        b, t = x.shape[:2]
        positions = torch.arange(t, device=x.device).expand(b, t)
        if self.embed_tokens is not None:
            ids = x
            x = self.embed_tokens(ids)
            if self.embed_positions is not None:
                x = x + self.embed_positions(positions)
        for layer in self.layers.values():
            x = layer(x, positions, self.rotary, DENSE_CAUSAL)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))  # [B, T, vocab]
        return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of one micro-batch (kiln.train.pretrain.lm_loss's)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class PipelineRunner:
    """One rank's stage of a pipeline and the schedule that drives it."""

    def __init__(
        self,
        model: Transformer,
        index: int,
        num_stages: int,
        num_microbatches: int,
        schedule: str,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        dp_group: dist.ProcessGroup | None = None,
        tie_group: dist.ProcessGroup | None = None,
    ):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if schedule not in SCHEDULES:
            raise ConfigError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")
        if num_stages > len(model.layers):
            raise ConfigError(f"{num_stages} pipeline stages for {len(model.layers)} layers")
        if schedule == "1f1b" and num_microbatches < num_stages:
            raise ConfigError(
                f"1F1B needs at least as many micro-batches as stages, got {num_microbatches} "
                f"for {num_stages}"
            )
        self.index, self.num_stages, self.group = index, num_stages, group
        # tied embeddings: (first, last) stage ranks of this pipeline sum the shared gradient
        self.tied = model.config.tie_word_embeddings and num_stages > 1
        if self.tied and tie_group is None:  # one pipeline, the world's ranks (every rank joins)
            tie_group = dist.new_group([0, num_stages - 1])
        self.tie_group = tie_group
        self.module = Stage(model, index, num_stages).to(device)
        run = self.module
        if dp_group is not None:  # data-parallel replicas of this stage (the schedule no_syncs)
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            run = DDP(self.module, device_ids=ids, process_group=dp_group)
        stage = PipelineStage(run, index, num_stages, device, group=group)
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = cls(stage, num_microbatches, loss_fn=lm_loss)
        self.num_microbatches = num_microbatches

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of the batch (x, y) [B, T], B a multiple of the micro-batches;
        the batch's mean loss on the last stage, None on the others. Stage 0 reads x, the last
        stage y (the others ignore them)."""
        if x.shape[0] % self.num_microbatches:
            raise ConfigError(
                f"batch size {x.shape[0]} is not a multiple of {self.num_microbatches} "
                "micro-batches"
            )
        loss = None
        if self.is_last:
            losses: list[torch.Tensor] = []
            args = (x,) if self.is_first else ()
            self.schedule.step(*args, target=y, losses=losses, return_outputs=False)
            loss = torch.stack(losses).mean().detach()
        else:
            self.schedule.step(*((x,) if self.is_first else ()), return_outputs=False)
        if self.tied and (self.is_first or self.is_last):
            dist.all_reduce(self._tied_weight().grad, group=self.tie_group)
        return loss

    def _tied_weight(self) -> nn.Parameter:
        return self.module.embed_tokens.weight if self.is_first else self.module.lm_head.weight

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, forward only, on every stage (sent from the last)."""
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        self.schedule.eval(*args, target=y if self.is_last else None, losses=losses)
        return self.share_loss(torch.stack(losses).mean() if self.is_last else None, x.device)

    def share_loss(self, loss: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The last stage's loss on every stage of the pipeline."""
        total = (
            loss.detach().float().clone() if loss is not None else torch.zeros((), device=device)
        )
        dist.all_reduce(total, group=self.group)
        return total

    def gather_into(self, model: Transformer) -> None:
        """Every stage's trained weights into `model` on every rank of the pipeline (each stage
        owner broadcasts its blocks; the model's other parameters are stale until then)."""
        owners = {}
        for s in range(self.num_stages):
            for i in stage_layers(len(model.layers), s, self.num_stages):
                owners[f"layers.{i}."] = s
        last = self.num_stages - 1
        for name, p in model.named_parameters():
            prefix = ".".join(name.split(".")[:2]) + "."
            owner = owners.get(prefix, 0 if name.startswith("embed_") else last)
            src = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            dist.broadcast(p.data, src=src, group=self.group)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip every stage's gradients by their joint norm (all-reduced over the pipeline)."""
        params = self.parameters()
        counted = params
        if self.tied and self.is_last:  # the tied weight counts once, on stage 0
            counted = [p for p in params if p is not self.module.lm_head.weight]
        grads = [p.grad for p in params if p.grad is not None]
        counted = [p.grad for p in counted if p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in counted]).sum() if counted else None
        device = grads[0].device if grads else torch.device("cpu")
        total = sq if sq is not None else torch.zeros((), device=device)
        dist.all_reduce(total, group=self.group)
        norm = total.sqrt()
        if math.isfinite(max_norm):
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return norm


def train_pipeline(
    model: Transformer,
    cfg,
    train_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    val_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    """`kiln pretrain --pipeline-parallel N` (under torchrun): kiln.train.loop's schedule (lr,
    clipping, AdamW, JSONL log, validation) over a pipeline of N stages, times world / N
    data-parallel replicas; each step's grad_accum micro-batches are the pipeline's
    micro-batches. No checkpoints mid-run (no resume); at the end every rank's `model` holds
    the trained weights of every stage, for the export."""
    from torch.distributed.device_mesh import init_device_mesh

    from kiln.train import distributed
    from kiln.train.loop import (
        Meter,
        RunLog,
        _progress_bar,
        autocast,
        lr_at,
        make_optimizer,
        plot_losses,
    )

    cfg.validate()
    info = distributed.init(cfg.device)
    pp = cfg.pipeline_parallel
    if info.world_size % pp:
        raise ConfigError(
            f"pipeline_parallel={pp} does not divide the {info.world_size} processes "
            "(world = pipeline stages x data-parallel replicas)"
        )
    dp = info.world_size // pp
    if val_batch is not None and cfg.batch_size % cfg.grad_accum:
        raise ConfigError(
            f"validation splits a batch of batch_size={cfg.batch_size} into grad_accum="
            f"{cfg.grad_accum} pipeline micro-batches: make it a multiple"
        )
    mesh = init_device_mesh(info.device.type, (dp, pp), mesh_dim_names=("dp", "pp"))
    tie_group = None
    if model.config.tie_word_embeddings:  # rank = replica * pp + stage (the mesh's layout)
        pairs = [[d * pp, d * pp + pp - 1] for d in range(dp)]
        tie_group, _ = dist.new_subgroups_by_enumeration(pairs)
    dp_rank = mesh.get_local_rank("dp")
    torch.manual_seed(cfg.seed + dp_rank)
    model.to(info.device).train()
    runner = PipelineRunner(
        model, mesh.get_local_rank("pp"), pp, cfg.grad_accum, cfg.pipeline_schedule,
        info.device, mesh.get_group("pp"), mesh.get_group("dp") if dp > 1 else None, tie_group,
    )  # fmt: skip
    for batches in (train_batch, val_batch):  # every stage of a replica reads the same rows
        if hasattr(batches, "data_parallel"):
            batches.data_parallel = (dp_rank, dp)
    optimizer = make_optimizer(runner.module, cfg, info.device)
    out = Path(cfg.out_dir)
    log = RunLog(out, info.is_main, keep_until=0)
    log.write({"event": "start", "step": 0, "world_size": info.world_size, **asdict(cfg)})
    ctx, meter = autocast(cfg, info.device), Meter()
    progress = _progress_bar(cfg.max_steps, 0, info.is_main)
    result: dict = {"step": 0, "log": str(log.path)}
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        parts = [train_batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
        x, y = (torch.cat(t).to(info.device) for t in zip(*parts))
        with ctx:
            loss = runner.share_loss(runner.step(x, y), info.device)
        grad_norm = runner.clip_grad_norm(cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add(loss, {"num_tokens": y.numel()}, dp)
        done = result["step"] = step + 1
        progress.update(1)
        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            record = meter.flush(done, optimizer.param_groups[0]["lr"], grad_norm)
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            result.update(train_loss=record["loss"], tokens_per_s=record.get("tokens_per_s"))
        if val_batch is not None and (done % cfg.eval_interval == 0 or done == cfg.max_steps):
            runner.module.eval()
            with ctx:
                losses = [runner.evaluate(*(t.to(info.device) for t in val_batch(i)))
                          for i in range(cfg.eval_steps)]  # fmt: skip
            runner.module.train()
            val = float(distributed.mean_across_ranks(torch.stack(losses).mean()))
            log.write({"step": done, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            result.update(val_loss=val, val_ppl=math.exp(min(val, 50)))
            meter.restart_clock()
    progress.close()
    runner.gather_into(model)
    if info.is_main:
        result["plot"] = str(plot_losses(log.path, out / "loss.png"))
    return result
