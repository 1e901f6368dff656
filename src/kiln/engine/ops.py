"""Ops: the kernels the engine runs, chosen once at start-up: every kiln.kernels op as its
plain-torch reference, or every one as its Triton kernel.

The attention backend, the fused layers (kiln.engine.fuse) and the sampler are all handed the
same Ops, so `attention_backend="torch"` is the reference everywhere (attention, norms, RoPE,
the small-batch GEMVs' references, the sampler's kernel) and nothing decides per call from a
tensor's device. Under TRITON_INTERPRET=1 the Triton ops run on CPU tensors too (the tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.kernels import _triton
from kiln.kernels.decode_qkv import paged_decode_qkv_ref, paged_decode_qkv_triton
from kiln.kernels.fused_moe import fused_moe_ref, fused_moe_triton
from kiln.kernels.gemv import (
    gemv_ref,
    gemv_triton,
    rmsnorm_gemv_ref,
    rmsnorm_gemv_triton,
    silu_mul_gemv_ref,
    silu_mul_gemv_triton,
)
from kiln.kernels.mixed_attention import mixed_attention_ref, mixed_attention_triton
from kiln.kernels.paged_decode_attention import (
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from kiln.kernels.qkv_prepare import qkv_prepare_ref, qkv_prepare_triton
from kiln.kernels.quant_linear import quant_matmul_ref, quant_matmul_triton
from kiln.kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton
from kiln.kernels.rope import rope_ref, rope_triton
from kiln.kernels.sample import sample_ref, sample_triton
from kiln.kernels.silu_and_mul import silu_and_mul_ref, silu_and_mul_triton
from kiln.kernels.store_kvcache import store_kvcache_ref, store_kvcache_triton
from kiln.kernels.varlen_prefill_attention import (
    varlen_prefill_attention_ref,
    varlen_prefill_attention_triton,
)

log = logging.getLogger("kiln.engine")


def sample_seeded_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_ref with sample_triton's signature: its noise comes from torch's default
    generator (seeds unused), so only greedy rows match the kernel's tokens."""
    return sample_ref(logits, temperature, bitmask=bitmask)


@dataclass(frozen=True)
class Ops:
    """One implementation of each op the engine calls; each field has its kernel's signature
    (the attention ops take their cache as a kiln.kernels.common.PagedKV)."""

    name: str  # "torch" | "triton"
    # the attention backend (kiln.engine.attention.PagedBackend)
    store_kvcache: Callable
    paged_decode_attention: Callable
    varlen_prefill_attention: Callable
    mixed_attention: Callable  # decodes and chunks packed, which is which unknown on the host
    qkv_prepare: Callable
    paged_decode_qkv: Callable | None  # None: qkv_prepare then paged_decode_attention
    # the fused layers (kiln.engine.fuse)
    rmsnorm: Callable
    rope: Callable
    silu_and_mul: Callable
    gemv: Callable
    rmsnorm_gemv: Callable
    silu_mul_gemv: Callable
    fused_moe: Callable  # a MoE layer's SwiGLU experts (kiln.kernels.fused_moe)
    # packed weight-only quantized Linears (kiln.model.quant_layers.QuantLinear)
    quant_matmul: Callable
    # the sampler's one-pass temperature-only sampling (logits, temperatures, seeds,
    # bitmask=None: structured outputs' allowed tokens)
    sample: Callable

    @classmethod
    def torch(cls) -> Ops:
        """The plain-torch references (run anywhere; not capturable in CUDA graphs)."""
        return cls(
            name="torch",
            store_kvcache=store_kvcache_ref,
            paged_decode_attention=paged_decode_attention_ref,
            varlen_prefill_attention=varlen_prefill_attention_ref,
            mixed_attention=mixed_attention_ref,
            qkv_prepare=qkv_prepare_ref,
            paged_decode_qkv=paged_decode_qkv_ref,
            rmsnorm=rmsnorm_ref,
            rope=rope_ref,
            silu_and_mul=silu_and_mul_ref,
            gemv=gemv_ref,
            rmsnorm_gemv=rmsnorm_gemv_ref,
            silu_mul_gemv=silu_mul_gemv_ref,
            fused_moe=fused_moe_ref,
            quant_matmul=quant_matmul_ref,
            sample=sample_seeded_ref,
        )

    @classmethod
    def triton(cls) -> Ops:
        """The Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1)."""
        return cls(
            name="triton",
            store_kvcache=store_kvcache_triton,
            paged_decode_attention=paged_decode_attention_triton,
            varlen_prefill_attention=varlen_prefill_attention_triton,
            mixed_attention=mixed_attention_triton,
            qkv_prepare=qkv_prepare_triton,
            paged_decode_qkv=paged_decode_qkv_triton,
            rmsnorm=rmsnorm_triton,
            rope=rope_triton,
            silu_and_mul=silu_and_mul_triton,
            gemv=gemv_triton,
            rmsnorm_gemv=rmsnorm_gemv_triton,
            silu_mul_gemv=silu_mul_gemv_triton,
            fused_moe=fused_moe_triton,
            quant_matmul=quant_matmul_triton,
            sample=sample_triton,
        )


def choose_ops(attention_backend: str, device: torch.device) -> Ops:
    """The engine's ops for EngineConfig.attention_backend: "torch", "triton", or "auto"
    (Triton on CUDA where it is installed, the references elsewhere)."""
    name = attention_backend
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    log.info("kernels: %s", name)
    return Ops.triton() if name == "triton" else Ops.torch()


def triton_available() -> bool:
    """Whether Triton imports here (without it, kiln.kernels defines the kernels as stubs)."""
    if not _triton.HAS_TRITON:
        log.warning("Triton is not installed: using the torch ops")
    return _triton.HAS_TRITON
