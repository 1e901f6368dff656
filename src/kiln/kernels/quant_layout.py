"""The packed layout of weight-only quantized Linears (W4A16 / W8A16) that the kernels of
kiln.kernels.quant_linear read: `pack` builds it from integer weights (kiln.model.quantized.
IntWeight's fields), `dequantize_ref` undoes it.

PackedWeight:
- qweight int32 [N, Kp / PACK], output-major like nn.Linear.weight (PACK = 32 / bits values a
  word), the inputs cut into chunks of CHUNK = PACK * W inputs (W words a row): word j of chunk c
  holds, in bit field i (bits [bits*i, bits*(i+1))), the input k = c * CHUNK + i * W + j. So the
  i-th fields of a run of words are W *consecutive* inputs: a kernel multiplies them by one
  contiguous slice of x, and a chunk never straddles a quantization group;
- scales [N, chunks] and zeros [N, chunks] (float16, one per chunk: a group spanning several
  chunks repeats its values), or zeros None when every zero is 2^(bits-1) (symmetric);
- perm int32 [K] or None: with act-order (GPTQ desc_act) the inputs are sorted by group once at
  load, so that groups are contiguous; the kernels multiply x[..., perm].
Dequantized: W[n, k] = scales[n, c(k)] * (q[n, k] - zeros[n, c(k)]) in float32, like
IntWeight.dequantize (bit for bit, before the cast to the activations' dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_WORDS = 32  # words of a row in one chunk, at most (128 bytes)


@dataclass
class PackedWeight:
    """A quantized Linear weight in the kernels' layout (see the module doc)."""

    qweight: torch.Tensor  # int32 [N, Kp / PACK]
    scales: torch.Tensor  # float16 [N, Kp / CHUNK]
    zeros: torch.Tensor | None  # float16 [N, Kp / CHUNK]; None: 2^(bits-1) everywhere
    perm: torch.Tensor | None  # int32 [K]: the kernels multiply x[..., perm]
    bits: int
    chunk: int  # CHUNK: inputs a chunk
    in_features: int  # K

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def words(self) -> int:
        """W: words of a row in one chunk."""
        return self.chunk * self.bits // 32

    def tensors(self) -> dict[str, torch.Tensor]:
        """The device tensors by name (what a module registers as buffers)."""
        named = dict(qweight=self.qweight, scales=self.scales, zeros=self.zeros, perm=self.perm)
        return {k: v for k, v in named.items() if v is not None}


def chunk_size(bits: int, group_size: int, in_features: int) -> int:
    """CHUNK for a group size (-1: per channel): the group, capped at MAX_WORDS words a row."""
    group = in_features if group_size == -1 else group_size
    pack = 32 // bits
    chunk = min(group, pack * MAX_WORDS)
    if chunk % pack or group % chunk:
        raise ValueError(f"group size {group} does not split into chunks of {pack}-input words")
    return chunk


def pack(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
) -> PackedWeight:
    """The kernels' layout of integer weights q [K, N] (in [0, 2^bits)), scales / zeros
    [groups, N] and g_idx [K] (IntWeight's fields). Groups must hold group_size inputs each
    (in any order: act-order is sorted out here); ValueError otherwise."""
    k, n = q.shape
    device = q.device
    g_idx = g_idx.to(device=device, dtype=torch.int64)
    perm = None
    size = k if group_size == -1 else group_size
    if not torch.equal(g_idx, torch.arange(k, device=device) // size):
        perm = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[perm], torch.arange(k, device=device) // size):
            raise ValueError(f"g_idx does not give every group {size} inputs")
        q, g_idx, perm = q[perm], g_idx[perm], perm.to(torch.int32)
    chunk = chunk_size(bits, group_size, k)
    pack_n, words = 32 // bits, chunk * bits // 32
    kp = -(-k // chunk) * chunk
    q = F.pad(q.to(torch.int64), (0, 0, 0, kp - k))  # [Kp, N], padded inputs hold 0
    # [chunks, fields, W, N] -> fields within each word
    q = q.reshape(kp // chunk, pack_n, words, n)
    shifts = (bits * torch.arange(pack_n, device=device)).view(1, pack_n, 1, 1)
    packed = (q << shifts).sum(1)  # [chunks, W, N], the fields never overlap
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    qweight = packed.reshape(kp // pack_n, n).t().contiguous()
    group = g_idx[torch.arange(0, kp, chunk, device=device)]  # [chunks]: each chunk's group
    s = scales.to(device)[group].t().to(torch.float16).contiguous()  # [N, chunks]
    z = zeros.to(device)[group].t().contiguous()
    sym = bool((z == 2 ** (bits - 1)).all())
    z = None if sym else z.to(torch.float16)
    return PackedWeight(qweight, s, z, perm, bits, chunk, k)


def dequantize_ref(w: PackedWeight) -> torch.Tensor:
    """The float32 weight [N, K] in the permuted input order (x[..., perm] multiplies it)."""
    n, kw = w.qweight.shape
    pack_n, words = 32 // w.bits, w.words
    mask = (1 << w.bits) - 1
    words_ = w.qweight.to(torch.int64).view(n, kw // words, 1, words)
    shifts = (w.bits * torch.arange(pack_n, device=w.qweight.device)).view(1, 1, pack_n, 1)
    q = ((words_ >> shifts) & mask).float()  # [N, chunks, fields, W]
    s = w.scales.float()[:, :, None, None]
    z = w.zeros.float()[:, :, None, None] if w.zeros is not None else 2.0 ** (w.bits - 1)
    return ((q - z) * s).reshape(n, -1)[:, : w.in_features]
