"""Attention for a step of packed queries in which some sequences have one query (decodes)
and others a chunk (prefills), without knowing on the host which are which: a mixed CUDA
graph's step (kiln.engine.cuda_graphs), captured once for every mix of decodes and chunks.

Varlen prefill alone computes it right but wastes a decode's work: each program takes one
query head and a BLOCK_M-row tile, so a one-query sequence reads its K/V once per query head
(GROUP times) into a tile of BLOCK_M - 1 masked rows. Here two kernels share the output:

- the split-KV paged decode kernel over every sequence slot: the programs of a sequence with
  exactly one query (row cu_seqlens_q[b]) attend it, the GROUP query heads of a kv head
  together, every K/V tile read once; the others exit at once;
- varlen prefill for the sequences with more than one query (those with one exit at once).

A one-query chunk (a prompt's last token after a prefix hit) is the same computation as a
decode: the query at position context_len - 1 over keys [0, context_len). (Under H2O the
decode kernel adds no attention mass for a sequence whose whole context is its one token, as
for a decode graph's padded rows; the prefill kernel would add that token's own mass of 1 a
head. The evictor never sees such a block: it is the sequence's sink.)
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import use_triton
from kiln.kernels.common import PagedKV
from kiln.kernels.paged_decode_attention import paged_decode_attention_triton
from kiln.kernels.varlen_prefill_attention import (
    varlen_prefill_attention_ref,
    varlen_prefill_attention_triton,
)

# Same contract, one sequence at a time: the reference does not care how queries group.
mixed_attention_ref = varlen_prefill_attention_ref


def mixed_attention_triton(
    q: torch.Tensor,
    kv: PagedKV,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries q [N, Hq, D] (sequence b's at rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1], the last of its context_lens[b] tokens) over their
    paged K/V: the one-query sequences by split-KV decode, the rest by varlen prefill.
    num_splits: the decode kernel's (None: chosen from the sequence slots, see
    kiln.kernels.paged_decode_attention.choose_num_splits). Rows no sequence owns are left
    unwritten."""
    out = paged_decode_attention_triton(
        q, kv, scale, sliding_window, num_splits, cu_seqlens_q=cu_seqlens_q
    )
    return varlen_prefill_attention_triton(
        q, kv, cu_seqlens_q, scale, sliding_window, out=out, skip_single=True
    )


def mixed_attention(
    q: torch.Tensor,
    kv: PagedKV,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed decodes and prefill chunks over their paged K/V: Triton on
    CUDA."""
    fn = mixed_attention_triton if use_triton(q) else mixed_attention_ref
    return fn(q, kv, cu_seqlens_q, scale, sliding_window)
