"""`kiln prune`: zero a share of every decoder Linear's weights, or remove whole attention heads
and MLP channels (kiln.compress.structured), and write the result as a plain HF checkpoint.

Unstructured and N:M methods, each choosing the weights with the lowest score:

    magnitude   |W|, compared over the whole Linear (the classic baseline)
    wanda       |W_ij| * ||X_j||_2 (Sun et al., 2023), compared within each output row, as the
                paper does: the input norms ||X_j|| over calibration tokens
    sparsegpt   OBS saliency with the surviving weights updated (kiln.compress.sparsegpt)

An N:M pattern (`--pattern 2:4`: at most N nonzeros in every M consecutive inputs of a row, the
layout NVIDIA's sparse tensor cores run) applies the same score within each group of M.
Wanda and SparseGPT run block by block like GPTQ (kiln.quant.quantize.calibrate_blocks): block
i's calibration inputs are what the already pruned blocks before it give. A recovery
fine-tune (--recover-steps) then trains the survivors with the pruned weights held at zero.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from kiln.compress.config import PRUNE_METHODS, STRUCTURED, PruneConfig, TextData
from kiln.compress.sparsegpt import lowest, sparsegpt
from kiln.compress.stats import InputNorms
from kiln.compress.structured import prune_structured
from kiln.errors import InputError
from kiln.model.transformer import Transformer
from kiln.quant.gptq import Hessian
from kiln.quant.quantize import PERCDAMP, calibrate_blocks, calibration, linears
from kiln.train.config import FinetuneConfig


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an "N:M" pattern, None for ""; InputError unless 0 < N < M."""
    if not pattern:
        return None
    n, sep, m = pattern.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise InputError(
            f"--pattern {pattern!r}: expected N:M with 0 < N < M, e.g. 2:4", param="pattern"
        )
    return int(n), int(m)


def resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The share of weights to remove: --sparsity, or 1 - N/M under an N:M pattern."""
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise InputError(
                f"--sparsity {sparsity} contradicts --pattern {nm[0]}:{nm[1]} (sparsity "
                f"{implied:g}); leave --sparsity out",
                param="sparsity",
            )
        return implied
    if sparsity is None:
        raise InputError("--sparsity is required (or --pattern N:M)", param="sparsity")
    if not 0 <= sparsity < 1:
        raise InputError(f"--sparsity {sparsity} must be in [0, 1)", param="sparsity")
    return sparsity


def check_pattern_shapes(model: Transformer, nm: tuple[int, int] | None) -> None:
    """InputError naming the first decoder Linear whose inputs do not split into groups of M."""
    if nm is None:
        return
    for i, layer in enumerate(model.layers):
        for name, lin in linears(layer).items():
            if lin.in_features % nm[1]:
                raise InputError(
                    f"--pattern {nm[0]}:{nm[1]}: layers.{i}.{name} has {lin.in_features} "
                    f"inputs, not a multiple of {nm[1]}",
                    param="pattern",
                )


def prune_mask(
    score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool
) -> torch.Tensor:
    """True where score [out, in] is among the lowest: in each group of M inputs of a row (the
    M - N lowest), else in each row (per_row) or over the whole matrix."""
    if nm is not None:
        n, m = nm
        groups = score.reshape(score.shape[0], -1, m)  # [out, in / M, M]
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).view_as(score)
    if per_row:
        k = int(score.shape[1] * sparsity)
        drop = torch.topk(score, k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)
    return lowest(score, int(score.numel() * sparsity))


@torch.no_grad()
def prune_model(
    model: Transformer,
    ids: torch.Tensor | None,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    progress: bool = False,
) -> None:
    """Zero `sparsity` of every decoder Linear's weights in place (magnitude needs no
    calibration ids [samples, len]); SparseGPT also updates the survivors."""
    if method == "magnitude":
        for layer in model.layers:
            for lin in linears(layer).values():
                lin.weight.masked_fill_(prune_mask(lin.weight.abs(), sparsity, nm, False), 0)
        return
    if method == "wanda":
        stat = lambda name, m: InputNorms(m.in_features, m.weight.device)  # noqa: E731
    else:
        stat = lambda name, m: Hessian(m.in_features, m.weight.device)  # noqa: E731
    for _, found in calibrate_blocks(model, ids, stat, method, progress):
        for lin, s in found.values():
            w = lin.weight
            if not s.n:  # an MoE expert no calibration token reached: by magnitude
                w.masked_fill_(prune_mask(w.abs(), sparsity, nm, True), 0)
            elif method == "wanda":
                score = w.abs() * s.sq.sqrt().to(w.dtype)[None]  # |W| * ||X_j||
                w.masked_fill_(prune_mask(score, sparsity, nm, per_row=True), 0)
            else:
                w.copy_(sparsegpt(w, s.h, sparsity, nm, percdamp=PERCDAMP))


def hold_zeros(model: Transformer) -> list:
    """Keep the decoder Linears' zero weights at zero while training: their gradient masked
    (AdamW then never moves them; weight decay of 0 is 0). The hooks' handles."""
    handles = []
    for layer in model.layers:
        for lin in linears(layer).values():
            keep = lin.weight.detach() != 0
            if not keep.all():
                handles.append(lin.weight.register_hook(lambda g, keep=keep: g * keep))
    return handles


def prune(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PruneConfig | None = None,
    train: FinetuneConfig | None = None,
    data: TextData | None = None,
    progress: bool = False,
) -> Path:
    """Prune the model in model_dir as `cfg` says, optionally fine-tune it for
    cfg.recover_steps on `data` (with `train`'s knobs), and write it to out_dir (its
    tokenizer beside it): a plain HF checkpoint, smaller for the structured methods."""
    from kiln.model.loader import load_model
    from kiln.train.distributed import resolve_device

    cfg, train, data = cfg or PruneConfig(), train or FinetuneConfig(), data or TextData()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if cfg.method not in PRUNE_METHODS:
        raise InputError(
            f"--method {cfg.method!r} is unknown; choose {', '.join(PRUNE_METHODS)}",
            param="method",
        )
    nm = parse_pattern(cfg.pattern)
    if nm is not None and cfg.method in STRUCTURED:
        raise InputError(f"--pattern is for unstructured methods, not {cfg.method}")
    sparsity = resolve_sparsity(cfg.sparsity, nm)
    if cfg.recover_steps < 0:
        raise InputError(f"--recover-steps must be >= 0, got {cfg.recover_steps}")
    if out_dir.exists():
        raise InputError(f"--out {str(out_dir)!r} already exists", param="out")
    model = load_model(model_dir, dtype="float32", device=resolve_device(train.device))
    check_pattern_shapes(model, nm)
    ids = None
    if cfg.method != "magnitude":
        ids = calibration(model, model_dir, cfg.calib, cfg.calib_samples, cfg.calib_len)
    if cfg.method in STRUCTURED:
        model = prune_structured(model, ids, cfg.method, sparsity, progress)
    else:
        prune_model(model, ids, cfg.method, sparsity, nm, progress)
    if cfg.recover_steps:
        recover(model, model_dir, out_dir, cfg.recover_steps, train, data)
    return save_pruned(model, model_dir, out_dir)


def recover(
    model: Transformer, model_dir: Path, out_dir: Path, steps: int, train: FinetuneConfig, data
) -> dict:
    """Fine-tune the pruned model for `steps` on corpus text, zeros held at zero."""
    from kiln.compress.training import run_config, text_windows
    from kiln.train.loop import train as train_loop
    from kiln.train.pretrain import lm_loss

    cfg = run_config(dataclasses.replace(train, max_steps=steps), out_dir, lr=2e-5)
    train_batch, val_batch, _ = text_windows(
        model_dir, data, model.config.max_position_embeddings, cfg
    )
    model.requires_grad_(True)
    handles = hold_zeros(model)
    try:
        return train_loop(model, cfg, train_batch, lm_loss, val_batch)
    finally:
        for h in handles:
            h.remove()
        model.requires_grad_(False).eval()


def save_pruned(model: nn.Module, model_dir: Path, out_dir: Path) -> Path:
    """The model as an HF directory in the source checkpoint's dtype, with the source's
    tokenizer and side files; config.json, written last, marks it complete."""
    from kiln.model.loader import DTYPES, save_model
    from kiln.quant.checkpoint import copy_side_files

    model.to(DTYPES.get(model.config.dtype or "float32", torch.float32)).cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_side_files(model_dir, out_dir)
    return save_model(model, out_dir)
