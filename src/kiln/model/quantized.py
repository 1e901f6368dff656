"""Quantized checkpoint formats as the ecosystem writes them: GPTQ (AutoGPTQ / GPTQModel, v1
and v2) and AWQ GEMM (AutoAWQ). Packing into int32, unpacking, and dequantizing at load time.

Integer weights are kept input-major, as both formats store them: q [in, out], one scale and
zero per (group, output). Dequantized: W[:, k] = scales[g_idx[k]] * (q[k] - zeros[g_idx[k]]).

GPTQ: qweight int32 [in/pack, out], input k in bits bits*(k%pack) of row k//pack; qzeros int32
[groups, out/pack] packed the same way along the output; scales fp16 [groups, out]; g_idx int32
[in]. v1 ("gptq") stores zero - 1 (wrapped to `bits` bits); v2 ("gptq_v2") the zero itself.
AWQ GEMM (4 bits only): qweight int32 [in, out/8] packed along the output, slot i of column c
holding output 8c + AWQ_ORDER[i]; qzeros [groups, out/8] the same, no offset; scales [groups, out].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kiln.errors import CheckpointError, ConfigError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_PARTS = ("qweight", "qzeros", "scales")


@dataclass
class IntWeight:
    """A quantized Linear weight: q [in, out] in [0, 2^bits), scales [groups, out] fp16,
    zeros [groups, out] int, g_idx [in] (the group of each input column)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in], Linear's layout."""
        g = self.g_idx.long()
        w = (self.q - self.zeros[g]).float() * self.scales[g].float()  # [in, out]
        return w.t().contiguous()


@dataclass(frozen=True)
class QuantSpec:
    """What a config.json's `quantization_config` says about the stored weights."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per output channel
    zero_offset: int = 0  # 1 for GPTQ v1, which stores zero - 1

    @property
    def parts(self) -> tuple[str, ...]:
        return GPTQ_PARTS if self.method == "gptq" else AWQ_PARTS


def read_quant_config(hf_config: dict) -> QuantSpec | None:
    """The QuantSpec of a config.json dict, None when it is not quantized; ConfigError naming
    the field kiln cannot use."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError("quantization_config must be an object")

    def field(name, default=None):
        if name not in qc and default is None:
            raise ConfigError(f"quantization_config lacks the field {name!r}")
        return qc.get(name, default)

    method = field("quant_method")
    if method not in ("gptq", "awq"):
        raise ConfigError(
            f"quantization_config.quant_method {method!r} is not supported; kiln reads gptq, "
            "awq, compressed-tensors"
        )
    bits, group_size = field("bits"), field("group_size")
    allowed_bits = (4, 8) if method == "gptq" else (4,)
    if bits not in allowed_bits:
        raise ConfigError(f"quantization_config.bits {bits!r} is not supported for {method}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ConfigError(f"quantization_config.group_size {group_size!r} is not a positive int")
    if method == "awq":
        version = str(field("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"quantization_config.version {version!r}: kiln reads AWQ gemm")
        return QuantSpec("awq", bits, group_size)
    fmt = field("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(
            f"quantization_config.checkpoint_format {fmt!r}: kiln reads gptq, gptq_v2"
        )
    return QuantSpec("gptq", bits, group_size, zero_offset=1 if fmt == "gptq" else 0)


def pack_rows(q: torch.Tensor, bits: int, order: Iterable[int] | None = None) -> torch.Tensor:
    """Pack q [n, m] (values in [0, 2^bits)) along dim 0 into int32 [n * bits / 32, m];
    slot i of packed row r holds row r*pack + order[i]."""
    pack = 32 // bits
    order = list(order or range(pack))
    n = q.shape[0]
    assert n % pack == 0, f"{n} rows do not pack into int32 by {pack}"
    q = q.to(torch.int64).reshape(n // pack, pack, -1)
    packed = torch.zeros(n // pack, q.shape[2], dtype=torch.int64, device=q.device)
    for i, src in enumerate(order):
        packed |= q[:, src] << (bits * i)
    return _as_int32(packed)


def unpack_rows(
    packed: torch.Tensor, bits: int, order: Iterable[int] | None = None
) -> torch.Tensor:
    """Inverse of pack_rows: int32 [n / pack, m] -> int32 [n, m]."""
    pack = 32 // bits
    order = list(order or range(pack))
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(p.shape[0], pack, p.shape[1], dtype=torch.int64, device=p.device)
    for i, dst in enumerate(order):
        out[:, dst] = (p >> (bits * i)) & ((1 << bits) - 1)
    return out.reshape(-1, p.shape[1]).to(torch.int32)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_gptq(w: IntWeight, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """The GPTQ tensors (v1 by default: zeros stored minus 1) of an IntWeight."""
    mask = (1 << w.bits) - 1
    zeros = (w.zeros.to(torch.int64) - zero_offset) & mask
    return {
        "qweight": pack_rows(w.q, w.bits),
        "qzeros": pack_rows(zeros.t(), w.bits).t().contiguous(),
        "scales": w.scales.to(torch.float16).contiguous(),
        "g_idx": w.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(t: dict[str, torch.Tensor], spec: QuantSpec) -> IntWeight:
    """The IntWeight of GPTQ tensors; g_idx defaults to k // group_size when absent."""
    bits = spec.bits
    q = unpack_rows(t["qweight"], bits)
    zeros = unpack_rows(t["qzeros"].t(), bits).t()
    zeros = (zeros + spec.zero_offset) & ((1 << bits) - 1)
    g_idx = t.get("g_idx")
    if g_idx is None:
        g_idx = _default_g_idx(q.shape[0], spec.group_size, q.device)
    return IntWeight(q, t["scales"], zeros.contiguous(), g_idx.to(torch.int32), bits)


def pack_awq(w: IntWeight) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors of an IntWeight (4 bits, groups in input order)."""
    assert w.bits == 4, "AWQ GEMM is 4-bit"
    return {
        "qweight": pack_rows(w.q.t(), 4, AWQ_ORDER).t().contiguous(),
        "qzeros": pack_rows(w.zeros.t(), 4, AWQ_ORDER).t().contiguous(),
        "scales": w.scales.to(torch.float16).contiguous(),
    }


def unpack_awq(t: dict[str, torch.Tensor], spec: QuantSpec) -> IntWeight:
    """The IntWeight of AutoAWQ GEMM tensors."""
    q = unpack_rows(t["qweight"].t(), 4, AWQ_ORDER).t().contiguous()
    zeros = unpack_rows(t["qzeros"].t(), 4, AWQ_ORDER).t().contiguous()
    g_idx = _default_g_idx(q.shape[0], spec.group_size, q.device)
    return IntWeight(q, t["scales"], zeros, g_idx, 4)


def _default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // size).to(torch.int32)


def require_parts(prefix: str, parts: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming the first tensor a quantized Linear lacks."""
    need = [p for p in ("qweight", "qzeros", "scales") if p not in parts]
    if need:
        raise CheckpointError(f"quantized layer {prefix!r} lacks tensor {need[0]!r}")


def dequantize_tensors(
    spec: QuantSpec, tensors: Iterator[tuple[str, torch.Tensor]], conv1d: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass plain tensors through; gather each quantized Linear's parts (`p.qweight`, ...) and
    yield it, at the end, as `p.weight` float32: [out, in], or [in, out] for GPT-2's Conv1D."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        prefix, _, part = name.rpartition(".")
        if part in spec.parts:
            pending.setdefault(prefix, {})[part] = t
        else:
            yield name, t
    unpack = unpack_gptq if spec.method == "gptq" else unpack_awq
    for prefix, parts in pending.items():
        require_parts(prefix, parts)
        w = unpack(parts, spec).dequantize()
        yield f"{prefix}.weight", w.t() if conv1d else w
