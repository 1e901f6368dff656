"""Fused mixture-of-experts MLP (vLLM's fused_moe design): SwiGLU experts for top-k routed
tokens in two grouped GEMMs.

The N tokens' N * k (token, expert) pairs are sorted by expert and each expert's run padded
to a multiple of BLOCK_M (`align_block_size`), so that every BLOCK_M-row tile of the sorted
list belongs to one expert. One kernel (`_fused_moe_kernel`) then multiplies each tile by its
expert's weights:

    gate_up [N*k, 2I] = x[token] @ w13[e]^T             (grouped GEMM 1: gate and up at once)
    act     [N*k, I]  = silu(gate) * up                   (kiln.kernels.silu_and_mul)
    y       [N*k, H]  = weight[pair] * (act @ w2[e]^T)    (grouped GEMM 2, routing weights applied)
    out     [N, H]    = sum over the k pairs of each token

Weights are stacked per layer: w13 [E, 2I, H] (each expert's gate_proj rows, then up_proj's)
and w2 [E, H, I] (down_proj). `fused_moe_ref` is the per-expert loop the model runs
(kiln.model.layers.MoE), the reference for the kernel. Launch settings come from JSON files
per shape in kiln/kernels/configs/fused_moe (written by benchmarks/tune_moe.py), else from
`default.json` there.

The routing, the alignment and the kernels stay on the device with static shapes (no host
sync), so the Triton path is capturable in a CUDA graph.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.kernels._triton import tl, triton, use_triton
from kiln.kernels.common import dot_options, grouped_tile
from kiln.kernels.silu_and_mul import silu_and_mul_ref, silu_and_mul_triton

CONFIG_DIR = Path(__file__).parent / "configs" / "fused_moe"


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Plain torch: x [N, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights / topk_ids [N, k] ->
    [N, H] = sum_j topk_weights[:, j] * expert_{topk_ids[:, j]}(x), one expert at a time."""
    out = torch.zeros_like(x)
    weights = topk_weights.to(x.dtype)
    for e in topk_ids.unique().tolist():
        token_idx, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = silu_and_mul_ref(F.linear(x[token_idx], w13[e]))
        out.index_add_(0, token_idx, F.linear(h, w2[e]) * weights[token_idx, slot, None])
    return out


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N * k (token, expert) pairs by expert, each expert's run padded to block_m.

    Returns sorted_ids [P] int32 (the pair index token * k + j, padding = N * k), expert_ids
    [P / block_m] int32 (the expert of each tile; -1 past the end) and num_padded [1] int32
    (the used length of sorted_ids). P = N * k + E * (block_m - 1) rounded up to block_m is
    the largest padded length, so every shape is known without reading the routing."""
    flat = topk_ids.flatten()
    pairs = flat.numel()
    dev = flat.device
    ones = torch.ones_like(flat)  # (not bincount: on CUDA it reads the max on the host)
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=dev).scatter_add_(0, flat, ones)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, in token order
    sorted_expert = flat[order]
    first = counts.cumsum(0) - counts  # each expert's first index in `order`
    dest = (ends - padded)[sorted_expert] + torch.arange(pairs, device=dev) - first[sorted_expert]
    size = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((size,), pairs, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    tile_start = torch.arange(0, size, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, tile_start, right=True).to(torch.int32)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit
def _fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_pairs, num_tiles_m,
    stride_am, stride_be, stride_bn, stride_cm,
    TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """C[pair] = A[pair // TOP_K] @ B[expert]^T (times the pair's routing weight), one
    [BLOCK_M, BLOCK_N] tile of the sorted pairs (all of one expert) a program."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, num_tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // TOP_K)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if DOT_UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(a, b, c, weights, sorted_ids, expert_ids, num_padded, top_k, config):
    """c[pair] = a[pair // top_k] @ b[expert]^T (* weights[pair]); a, b, c row-major."""
    n, k = b.shape[1], b.shape[2]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    tiles_m = sorted_ids.numel() // block_m
    grid = (tiles_m * triton.cdiv(n, block_n),)
    _fused_moe_kernel[grid](
        a, b, c, weights, sorted_ids, expert_ids, num_padded,
        n, k, c.shape[0], tiles_m,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        TOP_K=top_k, MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
        **dot_options(a),
    )  # fmt: skip


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton fused_moe; same contract as fused_moe_ref. `config`: launch settings
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), else `get_config`'s."""
    assert x.dim() == 2 and x.stride(-1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if config is None:
        config = get_config(num_tokens, num_experts, w2.shape[2], hidden, x.dtype, x.device)
    sorted_ids, expert_ids, num_padded = align_block_size(topk_ids, num_experts, config["BLOCK_M"])
    pairs = num_tokens * top_k
    gate_up = torch.empty(pairs, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, None, sorted_ids, expert_ids, num_padded, top_k, config)
    act = silu_and_mul_triton(gate_up)  # [N * k, I]
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(x.dtype).contiguous()
    _grouped_gemm(act, w2, y, weights, sorted_ids, expert_ids, num_padded, 1, config)
    return y.view(num_tokens, top_k, hidden).sum(dim=1)


# ------------------------------------------------------------------ launch settings per shape


def config_name(num_experts: int, inter: int, hidden: int, dtype, device) -> str:
    """The tuned-config file for one MoE shape on one device type."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dt = str(dtype).removeprefix("torch.")
    return f"E={num_experts},I={inter},H={hidden},dtype={dt},device={name.replace(' ', '_')}.json"


@functools.cache
def load_configs(name: str) -> dict[int, dict] | None:
    """A config file of CONFIG_DIR as {token count: launch settings}, or None if absent."""
    path = CONFIG_DIR / name
    if not path.is_file():
        return None
    return {int(m): cfg for m, cfg in json.loads(path.read_text()).items()}


@functools.lru_cache(maxsize=1024)
def get_config(num_tokens: int, num_experts: int, inter: int, hidden: int, dtype, device) -> dict:
    """Launch settings for `num_tokens` tokens: the tuned file's entry for the nearest token
    count, or default.json's; the CPU interpreter always takes small tiles. (Cached: callers
    must not change the dict.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)
    name = config_name(num_experts, inter, hidden, dtype, device)
    return nearest_config(load_configs(name) or load_configs("default.json"), num_tokens)


def nearest_config(table: dict[int, dict], num_tokens: int) -> dict:
    """The entry of `table` tuned for the token count nearest `num_tokens`."""
    return dict(table[min(table, key=lambda m: abs(m - num_tokens))])


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    """fused_moe: Triton on CUDA, the per-expert loop elsewhere."""
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
