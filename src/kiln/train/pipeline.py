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

Parameter names stay the Transformer's (`layers.5.mlp.up_proj.weight`), so the stages' state
dicts together are the whole model's.
"""

from __future__ import annotations

import math

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
        if model.config.tie_word_embeddings and num_stages > 1:
            raise ConfigError(
                "pipeline parallelism puts the embedding and the LM head on different stages: "
                "set tie_word_embeddings = false"
            )
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
        self.module = Stage(model, index, num_stages).to(device)
        stage = PipelineStage(self.module, index, num_stages, device, group=group)
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
        if self.is_last:
            losses: list[torch.Tensor] = []
            args = (x,) if self.is_first else ()
            self.schedule.step(*args, target=y, losses=losses, return_outputs=False)
            return torch.stack(losses).mean().detach()
        self.schedule.step(*((x,) if self.is_first else ()), return_outputs=False)
        return None

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip every stage's gradients by their joint norm (all-reduced over the pipeline)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else None
        device = grads[0].device if grads else torch.device("cpu")
        total = sq if sq is not None else torch.zeros((), device=device)
        dist.all_reduce(total, group=self.group)
        norm = total.sqrt()
        if math.isfinite(max_norm):
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return norm
