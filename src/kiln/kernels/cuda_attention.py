"""Paged decode attention as a CUDA C++ kernel (csrc/paged_decode_attention.cu), beside the Triton
kernel and the torch reference in paged_decode_attention.py, with the same contract: q [B, Hq,
D] at position context_lens[b] - 1 over kiln's paged pool [num_blocks, block_size, Hkv, D].

The extension is built on first use with torch.utils.cpp_extension.load (nvcc, about a minute;
cached under TORCH_EXTENSIONS_DIR after that). It needs a CUDA device and nvcc: without either,
load_extension raises a ConfigError. Float caches only (no fp8/int8 pages, no H2O scores).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from kiln.errors import ConfigError
from kiln.kernels._triton import num_sms
from kiln.kernels.common import PagedKV, check_paged_args

CSRC = Path(__file__).parent / "csrc" / "paged_decode_attention.cu"
MAX_G = 8  # query heads a thread block takes (the .cu's MAX_G)
MIN_TOKENS_PER_SPLIT = 256
MAX_TOKENS_PER_SPLIT = 1024  # a split's scores sit in shared memory: MAX_G x this x 4 bytes


def nvcc() -> str | None:
    """The nvcc that torch's JIT build would use, if any."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_extension_available() -> bool:
    """Whether the kernel can be built and run here: a CUDA device, a CUDA torch, and nvcc."""
    return torch.cuda.is_available() and torch.version.cuda is not None and nvcc() is not None


@functools.cache
def load_extension():
    """The compiled extension (built once a process, from the cache when it is current)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise ConfigError(
            "the CUDA decode attention needs a CUDA device and a CUDA build of torch "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    if nvcc() is None:
        raise ConfigError("the CUDA decode attention is built on first use and needs nvcc")
    from torch.utils.cpp_extension import load

    return load(
        name="kiln_paged_decode_attention",
        sources=[str(CSRC)],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=False,
    )


def choose_tokens_per_split(batch: int, num_heads: int, num_kv_heads: int, max_len: int, device):
    """Keys a split takes: enough splits for two blocks an SM, none shorter than 256 keys,
    none longer than shared memory holds (max_len: the block table's capacity, no sync)."""
    group = num_heads // num_kv_heads
    blocks = batch * num_kv_heads * -(-group // MAX_G)
    want = -(-2 * num_sms(device) // blocks)
    splits = max(1, min(want, -(-max_len // MIN_TOKENS_PER_SPLIT)))
    splits = max(splits, -(-max_len // MAX_TOKENS_PER_SPLIT))
    return max(1, -(-max_len // splits))


def paged_decode_attention_cuda(
    q: torch.Tensor,
    kv: PagedKV,
    scale: float,
    sliding_window: int | None = None,
    tokens_per_split: int | None = None,
) -> torch.Tensor:
    """The CUDA kernel; paged_decode_attention_ref's contract (context length 0: zeros)."""
    check_paged_args(q, kv)
    if kv.quant or kv.scores is not None:
        raise ConfigError("the CUDA decode attention reads float caches only (no fp8/int8, H2O)")
    if tokens_per_split is None:
        max_len = kv.block_tables.shape[1] * kv.block_size
        tokens_per_split = choose_tokens_per_split(
            q.shape[0], q.shape[1], kv.k_cache.shape[2], max_len, q.device
        )
    assert tokens_per_split <= MAX_TOKENS_PER_SPLIT, tokens_per_split
    return load_extension().paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale,
        sliding_window or 0, tokens_per_split,
    )  # fmt: skip
