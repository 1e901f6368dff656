"""Tensor parallelism (Megatron-style), as a transformation of the one Transformer.

Rank r of `world` holds a slice of every projection:

- column-parallel (output split): q_proj by query heads, k_proj / v_proj by KV heads (each
  rank keeps the KV heads its query heads read; fewer KV heads than ranks are replicated),
  gate_proj / up_proj (every Mixtral expert too) by the intermediate dim;
- row-parallel (input split): o_proj and down_proj; their bias lives on rank 0 only;
- vocab-parallel: embed_tokens and lm_head by vocabulary rows (padded to a multiple of world).

A rank's attention and MLP sub-layers then produce partial sums of the full output, and one
all-reduce per sub-layer (a forward hook on the sub-layer, `reduce_sublayers`) adds them up;
an MoE's experts add their partial sums first, so it too costs one all-reduce. The embedding
all-reduces its masked lookup; the LM head all-gathers its vocabulary slice, so every rank
sees the full logits (symmetric collectives, which a CUDA graph can capture).

Weights load slice by slice (`load_model_shard`): tensors stream one at a time from the
memory-mapped safetensors, and only this rank's slice is copied to its device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.model.compressed_tensors import read_compressed_tensors
from kiln.model.hf_format import hf_to_kiln
from kiln.model.loader import (
    _checkpoint_tensors,
    assign_tensor,
    default_device,
    resolve_dtype,
)
from kiln.model.transformer import Transformer

COLUMN = ("gate_proj", "up_proj")  # split by the intermediate dim (rows of the weight)
ROW = ("o_proj", "down_proj")  # split by the input dim (columns); bias on rank 0


def check_tp_size(config: ModelConfig, world: int) -> None:
    """ConfigError unless `world` ranks can split the model's heads and MLP evenly."""
    hq, hkv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    size = f"tensor_parallel_size={world}"
    if world < 1:
        raise ConfigError(f"{size}: must be >= 1")
    if hq % world:
        raise ConfigError(f"{size} does not divide num_attention_heads={hq}")
    if hkv >= world and hkv % world:
        raise ConfigError(f"{size} does not divide num_key_value_heads={hkv}")
    if hkv < world and world % hkv:
        raise ConfigError(
            f"{size} is neither a divisor nor a multiple of num_key_value_heads={hkv} "
            "(fewer KV heads than ranks are replicated, each to world / kv_heads ranks)"
        )
    if inter % world:
        raise ConfigError(f"{size} does not divide intermediate_size={inter}")


class Shard:
    """Which slice of each weight rank `rank` of `world` holds."""

    def __init__(self, config: ModelConfig, rank: int, world: int):
        check_tp_size(config, world)
        self.config, self.rank, self.world = config, rank, world
        self.num_heads = config.num_heads // world
        self.num_kv_heads = max(1, config.num_kv_heads // world)
        # first KV head: replicated ones go to world / kv_heads consecutive ranks each
        self.kv_start = rank * config.num_kv_heads // world
        self.inter = config.intermediate_size // world
        self.vocab = -(-config.vocab_size // world)  # rows per rank, the last one padded

    def local_config(self) -> ModelConfig:
        """The config one rank's model is built from (vocab_size stays the full one)."""
        return self.config.replace(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, intermediate_size=self.inter
        )

    def slice(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """This rank's part of the full kiln tensor `name` (None: a bias it does not hold)."""
        module, kind = name.rsplit(".", 2)[-2:]
        d, r = self.config.head_dim, self.rank
        if name in ("embed_tokens.weight", "lm_head.weight"):
            rows = t[r * self.vocab : (r + 1) * self.vocab]
            return F.pad(rows, (0, 0, 0, self.vocab - rows.shape[0]))
        if module == "q_proj":
            return t[r * self.num_heads * d : (r + 1) * self.num_heads * d]
        if module in ("k_proj", "v_proj"):
            return t[self.kv_start * d : (self.kv_start + self.num_kv_heads) * d]
        if module in COLUMN:
            return t[r * self.inter : (r + 1) * self.inter]
        if module in ROW:
            if kind == "bias":
                return t if r == 0 else None
            width = t.shape[1] // self.world
            return t[:, r * width : (r + 1) * width]
        return t  # norms, the MoE router, learned positions: replicated


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + num_rows) of the embedding; others' tokens look up zeros here."""

    def __init__(self, num_rows: int, dim: int, rank: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, dim), requires_grad=False)
        self.start, self.group = rank * num_rows, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out, group=self.group)
        return out


class ParallelLMHead(nn.Module):
    """The LM head's vocabulary slice; the slices' logits are all-gathered to [..., vocab]."""

    def __init__(self, num_rows: int, dim: int, vocab_size: int, world: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, dim), requires_grad=False)
        self.vocab_size, self.world, self.group = vocab_size, world, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, rows = x.shape[:-1], self.weight.shape[0]
        local = F.linear(x.reshape(-1, x.shape[-1]), self.weight)  # [n, rows]
        gathered = local.new_empty(self.world * local.shape[0], rows)
        dist.all_gather_single(gathered, local, group=self.group)
        logits = gathered.view(self.world, -1, rows).transpose(0, 1).reshape(-1, self.world * rows)
        if logits.shape[1] != self.vocab_size:  # drop the last slice's padding
            logits = logits[:, : self.vocab_size].contiguous()
        return logits.view(*lead, self.vocab_size)


def _all_reduce_output(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    out = out.contiguous()  # (a no-op for a projection's output; NCCL needs it)
    dist.all_reduce(out)
    return out


def reduce_sublayers(model: nn.Module) -> None:
    """One all-reduce after each attention and MLP / MoE sub-layer (of the plain or the
    engine-fused model); the fused GEMV path, which calls the projections directly, is off."""
    for layer in model.layers:
        layer.self_attn.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)
        if hasattr(layer, "gemv_max_batch"):
            layer.gemv_max_batch = 0


def load_model_shard(
    path: str | os.PathLike,
    rank: int,
    world: int,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """Rank `rank`'s slice of a Hugging Face model directory, for a process group of
    `world` ranks (torch.distributed must be initialized). GPTQ / AWQ weights are
    dequantized; W8A8 checkpoints are refused."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    config = ModelConfig.from_dir(path)
    if read_compressed_tensors(config.hf_config) is not None:
        raise ConfigError("tensor parallelism does not run W8A8 (compressed-tensors) weights")
    device = torch.device(device or default_device())
    dtype = resolve_dtype(dtype, config, device)
    shard = Shard(config, rank, world)
    with torch.device("meta"):
        full = dict(Transformer(config).named_parameters())
        model = Transformer(shard.local_config())
        model.embed_tokens = VocabParallelEmbedding(shard.vocab, config.hidden_size, rank)
        model.lm_head = ParallelLMHead(shard.vocab, config.hidden_size, config.vocab_size, world)
    if rank:
        for layer in model.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear) and m.bias is not None and _is_row(m, layer):
                    m.bias = None
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for where, hf_name, hf_tensor in _checkpoint_tensors(path, config):
        try:
            for name, tensor in hf_to_kiln(config, hf_name, hf_tensor):
                if name in full and tuple(tensor.shape) != tuple(full[name].shape):
                    raise CheckpointError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)}, config expects "
                        f"{tuple(full[name].shape)}"
                    )
                part = shard.slice(name, tensor) if name in full else tensor
                if part is not None:
                    assign_tensor(model, expected, name, part, dtype, device)
                    loaded.add(name)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks tensor {missing[0]!r}")
    model.reset_buffers(device)
    return model.eval()


def _is_row(linear: nn.Linear, layer: nn.Module) -> bool:
    return any(linear is m for name, m in layer.named_modules() if name.endswith(ROW))
