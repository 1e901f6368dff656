"""What the attention kernels share: their argument types (HeadLayout, QKNormRope, PagedKV)
and checks, the paged-attention pieces (the references' gather, the kernels' tile loads and
online softmax) and the per-head q/k norm, RoPE and K/V store of qkv_prepare, which
decode_qkv repeats bit for bit.

A sequence's K/V live in the paged cache [num_blocks, block_size, num_kv_heads, head_dim]:
its token t sits in block `block_table[t // block_size]` at offset `t % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels._triton import assert_head_dim, tl, triton
from kiln.kernels.causal_attention import causal_attention
from kiln.kernels.kv_quant import dequantize_ref, quant_kind, quantize_kv

LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are scaled by log2(e)


@dataclass(frozen=True)
class HeadLayout:
    """How the attention heads of a layer are laid out: Hq query heads, Hkv K/V heads (Hq a
    multiple of it), each head_dim wide; the fused projection's qkv row holds q, k, v heads
    in that order."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per K/V head."""
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_width(self) -> int:
        """Width of a qkv row: (Hq + 2 Hkv) * D."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [..., (Hq + 2 Hkv) * D] -> q [..., Hq, D], k and v [..., Hkv, D] (views)."""
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        return (
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
        )


# eq=False on the dataclasses of tensors: compared field by field, tensors would compare
# elementwise; these compare (and hash) by identity.
@dataclass(frozen=True, eq=False)
class QKNormRope:
    """What q and k go through between the qkv projection and attention: RMSNorm per head
    (Qwen3's q_norm / k_norm; no weights: none), then RoPE (no cos_sin table: none)."""

    q_norm_weight: torch.Tensor | None = None  # [D]
    k_norm_weight: torch.Tensor | None = None  # [D]
    eps: float = 0.0
    cos_sin: torch.Tensor | None = None  # [max_positions, D] float32: cos, then sin halves

    def __post_init__(self):
        assert (self.q_norm_weight is None) == (self.k_norm_weight is None), (
            "q_norm_weight and k_norm_weight go together"
        )

    @property
    def has_norm(self) -> bool:
        return self.q_norm_weight is not None

    @property
    def has_rope(self) -> bool:
        return self.cos_sin is not None


@dataclass(frozen=True, eq=False)
class PagedKV:
    """One layer's paged KV cache as a step's kernels use it: where the new tokens' K/V go
    (slot_mapping: the kernels that store) and which pages each sequence attends to
    (block_tables, context_lens: the kernels that read)."""

    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # like k_cache
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32: tokens in the cache after the step
    slot_mapping: torch.Tensor | None = None  # [N]: block_id * block_size + offset, -1 = skip
    # fp8 / int8 caches: [4, Hkv] float32 k_scale, v_scale, 1/k_scale, 1/v_scale
    # (kiln.kernels.kv_quant); None for a cache in the model's dtype
    scales: torch.Tensor | None = None
    # H2O: [num_blocks, block_size] float32 per-slot attention mass the attending ops add
    # each query's probabilities to (summed over heads); None: not collected
    scores: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def quant(self) -> int:
        """The kernels' QUANT switch (kiln.kernels.kv_quant: NO_QUANT, FP8, INT8)."""
        return quant_kind(self.k_cache)

    def scores_arg(self, dummy: torch.Tensor) -> torch.Tensor:
        """What a kernel gets for the scores pointer (dummy, never written, when None)."""
        return self.scores if self.scores is not None else dummy

    def scales_arg(self, dummy: torch.Tensor) -> torch.Tensor:
        """What a kernel gets for the scales pointer (dummy, never read, when unquantized)."""
        assert not self.quant or self.scales is not None, "a quantized cache needs its scales"
        return self.scales if self.quant else dummy


def dequantize_pages(
    k: torch.Tensor, v: torch.Tensor, kv: PagedKV, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered pages k, v [..., Hkv, D] of kv's cache in `dtype` (dequantized if need be)."""
    if not kv.quant:
        return k, v
    return dequantize_ref(k, kv.scales[0], dtype), dequantize_ref(v, kv.scales[1], dtype)


def gather_kv(kv: PagedKV, block_table: torch.Tensor, length: int, dtype: torch.dtype):
    """The first `length` tokens of one sequence's K and V in `dtype`: two [length, Hkv, D]."""
    blocks = block_table[: -(-length // kv.block_size)].long()
    k = kv.k_cache[blocks].flatten(0, 1)[:length]
    v = kv.v_cache[blocks].flatten(0, 1)[:length]
    return dequantize_pages(k, v, kv, dtype)


def attend_paged_ref(
    q: torch.Tensor,
    kv: PagedKV,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence's queries q [T, Hq, D], the last T of its context_len tokens -> [T, Hq, D]."""
    k, v = gather_kv(kv, block_table, context_len, q.dtype)
    if kv.scores is not None:
        add_attention_mass_ref(q, k, scale, kv, block_table)
    q_offset = context_len - q.shape[0]
    return causal_attention(q[None], k[None], v[None], scale, q_offset, sliding_window)[0]


def add_attention_mass_ref(
    q: torch.Tensor, k: torch.Tensor, scale: float, kv: PagedKV, block_table: torch.Tensor
) -> None:
    """H2O's statistic: add the attention probabilities of one sequence's queries q [T, Hq,
    D] (its last T tokens, causal) over its first L cached keys k [L, Hkv, D], summed over
    queries and heads, to kv.scores at the keys' slots."""
    length, group, bs = k.shape[0], q.shape[1] // k.shape[1], kv.block_size
    keys = k.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    s = torch.einsum("thd,lhd->htl", q.float(), keys) * scale
    t = torch.arange(length, device=q.device)
    q_pos = length - q.shape[0] + torch.arange(q.shape[0], device=q.device)
    s = s.masked_fill(t[None, None, :] > q_pos[None, :, None], float("-inf"))
    mass = s.softmax(-1).sum((0, 1))  # [L]
    slots = block_table[t // bs].long() * bs + t % bs
    kv.scores.view(-1).index_add_(0, slots, mass)


def check_paged_args(q: torch.Tensor, kv: PagedKV) -> None:
    """Assert the shapes and layouts the paged attention kernels rely on (q [.., Hq, D])."""
    num_heads, head_dim = q.shape[1:]
    k_cache, v_cache, block_tables = kv.k_cache, kv.v_cache, kv.block_tables
    num_kv_heads = k_cache.shape[2]
    assert_head_dim(head_dim)
    assert num_heads % num_kv_heads == 0, f"{num_heads} q heads over {num_kv_heads} kv heads"
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert k_cache.dtype == v_cache.dtype and (k_cache.dtype == q.dtype or kv.quant)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert not kv.quant or (kv.scales is not None and kv.scales.shape == (4, num_kv_heads))
    assert block_tables is not None and kv.context_lens is not None, "attention reads pages"
    assert q.stride(-1) == 1 and block_tables.stride(-1) == 1


def check_qkv_args(
    qkv: torch.Tensor, positions: torch.Tensor, heads: HeadLayout, qk: QKNormRope, kv: PagedKV
) -> None:
    """Assert the shapes and layouts the qkv kernels rely on."""
    n, head_dim = qkv.shape[0], heads.head_dim
    k_cache, v_cache, slot_mapping = kv.k_cache, kv.v_cache, kv.slot_mapping
    assert_head_dim(head_dim)
    assert qkv.shape == (n, heads.qkv_width) and qkv.stride(-1) == 1
    assert k_cache.shape[2:] == (heads.num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    assert k_cache.dtype == v_cache.dtype and (k_cache.dtype == qkv.dtype or kv.quant)
    assert not kv.quant or (kv.scales is not None and kv.scales.shape == (4, heads.num_kv_heads))
    assert slot_mapping is not None and slot_mapping.shape == (n,), "the new K/V need slots"
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1
    if qk.has_norm:
        for w in (qk.q_norm_weight, qk.k_norm_weight):
            assert w.shape == (head_dim,) and w.is_contiguous() and w.dtype == qkv.dtype
    if qk.has_rope:
        assert positions.shape == (n,) and qk.cos_sin.stride(-1) == 1
        assert qk.cos_sin.shape[-1] == head_dim and qk.cos_sin.dtype == torch.float32


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """A GEMM program's (row tile, column tile) in grouped order: GROUP_M row tiles share each
    column tile of the weight while it is in L2."""
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def kv_tile_offsets(block_table_ptr, toks, valid, block_size, stride_block, stride_off):
    """Element offsets into the cache of the tokens `toks` (one kv head's row start each)."""
    page = tl.load(block_table_ptr + toks // block_size, mask=valid, other=0).to(tl.int64)
    return page * stride_block + (toks % block_size).to(tl.int64) * stride_off


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, ptrs, valid, dtype, QUANT: tl.constexpr):
    """K and V [BLOCK_N, D] at element offsets ptrs (rows `valid`), as `dtype` (the queries'):
    a quantized cache's values convert exactly; its scales are the caller's to apply."""
    k = tl.load(k_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
    if QUANT != 0:
        k, v = k.to(tl.float32).to(dtype), v.to(tl.float32).to(dtype)
    return k, v


@triton.jit
def add_attention_mass(
    q, k_cache_ptr, scores_ptr, table, head_off, lo, hi, q_pos, row_ok, m, l, qk_scale,
    block_size, stride_cache_block, stride_cache_off,
    D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    """H2O's statistic, a second pass over the keys [lo, hi) once the softmax's (m, l) of
    every row of q [M, D] (query positions q_pos [M], rows row_ok) are final: each key's
    probability, summed over the rows, added to scores_ptr at the key's slot (atomically:
    other heads and layers add to the same slots)."""
    d = tl.arange(0, D)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv_l = 1.0 / tl.where(l > 0, l, 1.0)
    for tile in range(lo, hi, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        tok_ok = toks < hi
        page = tl.load(table + toks // block_size, mask=tok_ok, other=0).to(tl.int64)
        off = (toks % block_size).to(tl.int64)
        ptrs = (page * stride_cache_block + off * stride_cache_off)[:, None] + head_off + d[None, :]
        k = tl.load(k_cache_ptr + ptrs, mask=tok_ok[:, None], other=0.0)
        if QUANT != 0:
            k = k.to(tl.float32).to(q.dtype)
        qq = q
        if DOT_UPCAST:
            qq, k = q.to(tl.float32), k.to(tl.float32)
        s = tl.dot(qq, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = row_ok[:, None] & tok_ok[None, :] & (toks[None, :] <= q_pos[:, None])
        p = tl.where(valid, tl.exp2(s - m_safe[:, None]) * inv_l[:, None], 0.0)
        tl.atomic_add(scores_ptr + page * block_size + off, tl.sum(p, 0), mask=tok_ok)


@triton.jit
def online_softmax_step(
    q, k, v, valid, acc, m, l, qk_scale, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr
):  # fmt: skip
    """Fold one K/V tile into the running (acc, max, sum) of flash attention (base-2 scores).

    q [M, D], k and v [N, D], valid [M, N]; a row with nothing valid so far keeps m = -inf.
    """
    if DOT_UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l


def dot_options(q: torch.Tensor) -> dict:
    """The kernels' tl.dot settings: exact float32 products for float32 inputs (tests), tensor
    cores for 16-bit ones; in the CPU interpreter, bfloat16 goes through float32, because the
    interpreter multiplies bfloat16 tiles as raw 16-bit integers (Triton 3.9)."""
    return dict(
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=not q.is_cuda and q.dtype == torch.bfloat16,
    )


# ---------------------------------------------------- per-head q/k norm, RoPE and K/V store


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def torch_sum_plan(rows: int, head_dim: int) -> tuple[int, int]:
    """(VEC, BW): how PyTorch's CUDA reduction (ATen/native/cuda/Reduce.cuh, setReduceConfig
    and ReduceOp, torch 2.11 to 2.13) sums each row of a contiguous float32 [rows, head_dim].

    A row is reduced by BW threads. With VEC == 4 ("vectorize along input", head_dim >= 128),
    thread x loads the 4-vectors at elements 4 * (x + BW * j), keeps one running sum per lane
    of the vector and adds the four up in order; with VEC == 1 it is the same as one element
    a thread (BW == head_dim). The BW partial sums then meet in a halving tree (x += x + BW/2,
    down to 1: the shared-memory steps, then warp shuffles with decreasing offsets).
    """
    vec = 4 if head_dim >= 128 else 1
    dim0 = head_dim // vec
    max_threads = 512
    dim0_pow2 = _last_pow2(dim0) if dim0 < max_threads else max_threads
    dim1_pow2 = _last_pow2(rows) if rows < max_threads else max_threads
    width = min(dim0_pow2, 32)
    height = min(dim1_pow2, max_threads // width)
    width = min(dim0_pow2, max_threads // height)
    assert head_dim <= 512, "beyond that torch may split a row across warps"
    return vec, (width if vec == 4 else head_dim)


@triton.jit
def _squares(ptrs, mask):
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x * x


@triton.jit
def sum_squares(
    src_ptr, num_heads, D: tl.constexpr, VEC: tl.constexpr, LOG_BW: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Per head, the sum of x² over its D values in torch's order (torch_sum_plan):
    [BLOCK_H, 1]. src_ptr is the first head; heads are D apart."""
    BW: tl.constexpr = 1 << LOG_BW
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = heads < num_heads
    row = src_ptr + heads * D
    lanes = tl.arange(0, BW)[None, :]  # one column a reduction thread
    if VEC == 4:
        base = row + 4 * lanes
        s0 = _squares(base, mask)
        s1 = _squares(base + 1, mask)
        s2 = _squares(base + 2, mask)
        s3 = _squares(base + 3, mask)
        for j in tl.static_range(1, D // (4 * BW)):
            s0 += _squares(base + 4 * BW * j, mask)
            s1 += _squares(base + 4 * BW * j + 1, mask)
            s2 += _squares(base + 4 * BW * j + 2, mask)
            s3 += _squares(base + 4 * BW * j + 3, mask)
        s = ((s0 + s1) + s2) + s3
    else:
        s = _squares(row + lanes, mask)
    # the halving tree: a sum over an axis of size 2 is one addition, the tree's own
    for level in tl.static_range(LOG_BW):
        s = tl.sum(tl.reshape(s, [BLOCK_H, 2, BW >> (level + 1)]), axis=1)
    return s


@triton.jit
def norm_rope_heads(
    src_ptr, num_heads, w_ptr, eps, cos, sin,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    VEC: tl.constexpr, LOG_BW: tl.constexpr,
):  # fmt: skip
    """Norm and rotate every head of one token; src_ptr is the token's first head (stride D).
    Returns each head's two halves, [BLOCK_H, D/2] each (padded heads hold zeros)."""
    D: tl.constexpr = 2 * HALF
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    src = src_ptr + heads * D
    x1 = tl.load(src + d, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0)
    ty = x1.dtype
    if HAS_NORM:  # rmsnorm_ref: normalize in float32, round, times the weight, round
        ss = sum_squares(src_ptr, num_heads, D, VEC, LOG_BW, BLOCK_H)
        rstd = tl.rsqrt(ss * (1.0 / D) + eps)
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        x1 = ((x1.to(tl.float32) * rstd).to(ty).to(tl.float32) * w1).to(ty)
        x2 = ((x2.to(tl.float32) * rstd).to(ty).to(tl.float32) * w2).to(ty)
    if HAS_ROPE:  # rope_ref: rotate in float32, round
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(ty)
        x2 = (b * cos + a * sin).to(ty)
    return x1, x2


@triton.jit
def prepare_heads(
    src_ptr, dst_ptr, dst_stride_h, num_heads, w_ptr, eps, cos, sin, inv_scale,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    VEC: tl.constexpr, LOG_BW: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """norm_rope_heads, stored at dst_ptr (heads dst_stride_h apart); into a quantized cache
    (QUANT) times inv_scale [BLOCK_H, 1] and rounded (kiln.kernels.kv_quant)."""
    x1, x2 = norm_rope_heads(
        src_ptr, num_heads, w_ptr, eps, cos, sin, HAS_NORM, HAS_ROPE, HALF, BLOCK_H, VEC, LOG_BW
    )
    heads = tl.arange(0, BLOCK_H)[:, None]
    dst = dst_ptr + heads * dst_stride_h + tl.arange(0, HALF)[None, :]
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, quantize_kv(x1, inv_scale, QUANT).to(ty), mask=heads < num_heads)
    tl.store(dst + HALF, quantize_kv(x2, inv_scale, QUANT).to(ty), mask=heads < num_heads)


@triton.jit
def rope_cos_sin(pos_ptr, cos_sin_ptr, stride_cs, HAS_ROPE: tl.constexpr, HALF: tl.constexpr):
    """RoPE's factors at the position *pos_ptr: cos, sin [1, D/2] float32 (0.0 without RoPE)."""
    cos, sin = 0.0, 0.0
    if HAS_ROPE:
        pos = tl.load(pos_ptr).to(tl.int64)
        d = tl.arange(0, HALF)[None, :]
        cos = tl.load(cos_sin_ptr + pos * stride_cs + d)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d)
    return cos, sin


@triton.jit
def store_token_kv(
    row_ptr, slot, first_head, count, k_w_ptr, eps, cos, sin, k_cache_ptr, v_cache_ptr,
    scales_ptr,
    stride_kc_block, stride_kc_off, stride_kc_head,
    stride_vc_block, stride_vc_off, stride_vc_head,
    block_size, num_heads, num_kv_heads,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    VEC: tl.constexpr, LOG_BW: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """Norm and rotate the k of kv heads [first_head, first_head + count) of the token whose
    qkv row starts at row_ptr, and store them and their v in the cache at `slot` (>= 0);
    a quantized cache's values are scaled by the reciprocals in scales_ptr's rows 2 and 3."""
    D: tl.constexpr = 2 * HALF
    block, off = slot // block_size, slot % block_size
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = heads < count
    inv_k, inv_v = 1.0, 1.0
    if QUANT != 0:
        inv_k = tl.load(scales_ptr + 2 * num_kv_heads + first_head + heads, mask=mask, other=1.0)
        inv_v = tl.load(scales_ptr + 3 * num_kv_heads + first_head + heads, mask=mask, other=1.0)
    k_dst = k_cache_ptr + block * stride_kc_block + off * stride_kc_off
    prepare_heads(
        row_ptr + (num_heads + first_head) * D, k_dst + first_head * stride_kc_head,
        stride_kc_head, count, k_w_ptr, eps, cos, sin, inv_k,
        HAS_NORM, HAS_ROPE, HALF, BLOCK_H, VEC, LOG_BW, QUANT,
    )  # fmt: skip
    dd = tl.arange(0, D)[None, :]
    v = tl.load(row_ptr + (num_heads + num_kv_heads + first_head + heads) * D + dd, mask=mask)
    v = quantize_kv(v, inv_v, QUANT).to(v_cache_ptr.dtype.element_ty)
    v_dst = v_cache_ptr + block * stride_vc_block + off * stride_vc_off
    tl.store(v_dst + (first_head + heads) * stride_vc_head + dd, v, mask=mask)
