"""Engine-side transformations of the plain model (gpt-fast style): same weights, fewer ops.

- q/k/v projections become one Linear, and gate/up one Linear (one GEMM instead of three/two);
- RMSNorm runs as kiln.kernels.rmsnorm, fused with the residual add before it (the blocks
  then pass (hidden, residual) pairs along, and the final norm finishes the last add);
- a MoE layer's experts are stacked into two [E, ...] weights and run as the ops' fused_moe
  (Triton: two grouped GEMMs over the tokens sorted by expert, kiln.kernels.fused_moe);
- SiLU-and-mul and RoPE run as kiln.kernels ops; under the engine's paged backends, the
  per-head q/k norms, RoPE and the K/V store run as one op on the qkv output (attend_qkv).
`load_weights` goes the other way: a plain model's weights copied into a fused one in place
(reinforcement learning syncs the policy into the engine between rollouts).
The kernels are the engine's Ops (kiln.engine.ops), chosen once at start-up: their torch
references (the transformed model runs, and is tested, on CPU) or their Triton versions. The
model code itself is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.engine.ops import Ops
from kiln.errors import ConfigError
from kiln.kernels.common import HeadLayout, QKNormRope
from kiln.model.attention import Attention
from kiln.model.layers import MLP, MoE, RMSNorm, route
from kiln.model.quant_layers import QuantLinear, concat_quantized
from kiln.model.transformer import Block, Transformer


def _fused_linear(parts: list[nn.Module]) -> nn.Module:
    """One Linear computing the parts' outputs side by side; packed int4/int8 weights
    concatenate after repacking, a W8A8 Linear type fuses its own (`cat`: weights and their
    per-channel scales stacked along the output)."""
    if isinstance(parts[0], QuantLinear):
        return concat_quantized(parts)
    if not isinstance(parts[0], nn.Linear):
        return type(parts[0]).cat(parts)
    w = parts[0].weight
    out = nn.Linear(
        w.shape[1],
        sum(p.weight.shape[0] for p in parts),
        bias=parts[0].bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
    out.requires_grad_(False)
    return out


class FusedAttention(nn.Module):
    """kiln.model.attention.Attention with one qkv_proj and the ops' RoPE."""

    def __init__(self, attn: Attention, ops: Ops):
        super().__init__()
        self.ops = ops
        self.layer_idx, self.scale = attn.layer_idx, attn.scale
        self.sliding_window = attn.sliding_window
        self.heads = HeadLayout(attn.num_heads, attn.num_kv_heads, attn.head_dim)
        self.qkv_proj = _fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm

    def forward(self, x, positions, rotary, backend):
        return self.o_proj(self.attend_qkv(self.qkv_proj(x), positions, rotary, backend))

    def attend_qkv(self, qkv, positions, rotary, backend):
        """Attention from the qkv projection's output; [..., Hq * D] before o_proj."""
        lead, heads = qkv.shape[:-1], self.heads
        attend_qkv = getattr(backend, "attend_qkv", None)
        if attend_qkv is not None and qkv.dim() == 2:  # the paged backends: one fused op
            qk = self.qk_norm_rope(rotary)
            out = attend_qkv(
                self.layer_idx, qkv, positions, heads, qk, self.scale, self.sliding_window
            )
            return out.reshape(*lead, heads.num_heads * heads.head_dim)
        q, k, v = heads.split_qkv(qkv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = self.ops.rope(q, k, positions, rotary.cos_sin)
        out = backend.attend(self.layer_idx, q, k, v, self.scale, self.sliding_window)
        return out.reshape(*lead, heads.num_heads * heads.head_dim)

    def qk_norm_rope(self, rotary) -> QKNormRope:
        """The q/k norm weights and RoPE table the fused op applies (rotary None: no RoPE)."""
        cos_sin = rotary.cos_sin if rotary is not None else None
        if self.q_norm is None:
            return QKNormRope(cos_sin=cos_sin)
        return QKNormRope(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos_sin)


class FusedMLP(nn.Module):
    """SwiGLU with one gate_up_proj and the ops' silu_and_mul."""

    def __init__(self, mlp: MLP, ops: Ops):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = _fused_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class FusedMoE(nn.Module):
    """kiln.model.layers.MoE with its experts stacked, w13 [E, 2I, H] (each expert's gate_proj
    rows, then up_proj's) and w2 [E, H, I], run by the ops' fused_moe. Same router, same
    routing; the per-expert weights are dropped with the MoE module."""

    def __init__(self, moe: MoE, ops: Ops):
        super().__init__()
        self.ops = ops
        self.gate, self.top_k, self.renormalize = moe.gate, moe.top_k, moe.renormalize
        with torch.no_grad():
            w13 = [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts]
            self.w13 = nn.Parameter(torch.stack(w13), requires_grad=False)
            w2 = [e.down_proj.weight for e in moe.experts]
            self.w2 = nn.Parameter(torch.stack(w2), requires_grad=False)

    @staticmethod
    def fits(moe: nn.Module, config) -> bool:
        """Experts the fused kernel computes: SwiGLU over plain bias-free Linears."""
        linears = [m for e in getattr(moe, "experts", []) for m in e.children()]
        plain = all(type(m) is nn.Linear and m.bias is None for m in linears)
        return isinstance(moe, MoE) and plain and config.gated_mlp and config.activation == "silu"

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.ops.fused_moe(x, self.w13, self.w2, weights, ids).reshape(shape)


class FusedRMSNorm(nn.Module):
    """RMSNorm through the ops' kernel; given (x, residual) it adds first and returns both."""

    def __init__(self, norm: RMSNorm, ops: Ops):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.ops = ops

    def forward(self, x, residual=None):
        return self.ops.rmsnorm(x, self.weight, self.eps, residual)


class FinalNorm(FusedRMSNorm):
    """The model's last norm, finishing the last block's pending residual add."""

    def forward(self, x):
        hidden, residual = x
        return self.ops.rmsnorm(hidden, self.weight, self.eps, residual)[0]


class ResidualBlock(nn.Module):
    """Block whose norms fuse the residual adds; carries (hidden, residual) between blocks.

    A step of at most `gemv_max_batch` tokens (small-batch decode) runs its four projections
    as the ops' GEMVs (kiln.kernels.gemv: Triton instead of cuBLAS, or their references), with
    each RMSNorm (and its residual add) and the SiLU-and-mul fused into the GEMV that reads
    their output. Packed quantized projections run their own kernels instead (see _gemv_fits).
    """

    def __init__(self, block: Block, ops: Ops, gemv_max_batch: int = 0):
        super().__init__()
        self.ops = ops
        self.input_layernorm = FusedRMSNorm(block.input_layernorm, ops)
        self.self_attn = block.self_attn
        self.post_attention_layernorm = FusedRMSNorm(block.post_attention_layernorm, ops)
        self.mlp = block.mlp
        self.gemv_max_batch = gemv_max_batch if _gemv_fits(self.self_attn, self.mlp) else 0

    def forward(self, x, positions, rotary, backend):
        h, residual = x if isinstance(x, tuple) else (x, None)
        if 0 < h.shape[0] <= self.gemv_max_batch and h.dim() == 2:
            return self._forward_gemv(h, residual, positions, rotary, backend)
        if residual is not None:
            h, residual = self.input_layernorm(h, residual)
        else:
            h, residual = self.input_layernorm(h), h
        h = self.self_attn(h, positions, rotary, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def _forward_gemv(self, h, residual, positions, rotary, backend):
        attn, mlp, ops = self.self_attn, self.mlp, self.ops
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = _rmsnorm_gemv(ops, h, residual, norm1, attn.qkv_proj)
        out = attn.attend_qkv(qkv, positions, rotary, backend)
        h = _gemv(ops, out, attn.o_proj)
        gate_up, residual = _rmsnorm_gemv(ops, h, residual, norm2, mlp.gate_up_proj)
        return _silu_mul_gemv(ops, gate_up, mlp.down_proj), residual


# The small-batch GEMVs of a plain Linear (kiln.kernels.gemv).
def _gemv(ops: Ops, x, linear):
    return ops.gemv(x, linear.weight, linear.bias)


def _rmsnorm_gemv(ops: Ops, x, residual, norm, linear):
    return ops.rmsnorm_gemv(x, residual, norm.weight, norm.eps, linear.weight, linear.bias)


def _silu_mul_gemv(ops: Ops, gate_up, linear):
    return ops.silu_mul_gemv(gate_up, linear.weight, linear.bias)


def _gemv_fits(attn: FusedAttention, mlp: nn.Module) -> bool:
    """Whether the block's projections are what the fused GEMVs read: plain Linears (not an
    MoE, not W8A8 Linears, not packed int4/int8 ones: those run their own kernels). Packed
    projections with the norm and SiLU-mul in their GEMVs' prologues decoded at half the speed
    of the same kernels without them (an H100, Llama-3-8B W4A16: 101.7 vs 193.9 tok/s;
    notes/BENCHMARKS.md, session 10): each program recomputed the prologue over all of K."""
    if not isinstance(mlp, FusedMLP):
        return False
    projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return all(isinstance(m, nn.Linear) for m in projections)


class GemvLinear(nn.Module):
    """A Linear (the LM head) that runs as the ops' GEMV (Triton: kiln's resident-weight
    kernel) for steps of at most `gemv_max_batch` rows, F.linear otherwise; the weight is
    shared, not copied."""

    def __init__(self, linear: nn.Linear, ops: Ops, gemv_max_batch: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.ops = ops
        self.gemv_max_batch = gemv_max_batch

    def forward(self, x):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= self.gemv_max_batch and self.weight.is_contiguous():
            return self.ops.gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def bind_quant_ops(model: nn.Module, ops: Ops) -> None:
    """Make every packed quantized Linear multiply through the ops' kernel (or reference)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.matmul = ops.quant_matmul


def fuse_model(model: Transformer, ops: Ops, gemv_max_batch: int = 0) -> Transformer:
    """Apply the transformations in place (weights are shared, not copied, where unchanged),
    running `ops`; steps of at most `gemv_max_batch` tokens use the fused GEMVs. Parts fused
    already are left as they are (a draft made of a fused target's layers and a head of its
    own, kiln.engine.spec_decode.hidden)."""
    config = model.config
    for i, block in enumerate(model.layers):
        if isinstance(block, ResidualBlock) or isinstance(block.self_attn, FusedAttention):
            continue
        block.self_attn = FusedAttention(block.self_attn, ops)
        if isinstance(block.mlp, MLP) and block.mlp.gated and config.activation == "silu":
            block.mlp = FusedMLP(block.mlp, ops)
        elif FusedMoE.fits(block.mlp, config):
            block.mlp = FusedMoE(block.mlp, ops)
        if config.norm_type == "rmsnorm":
            if block.self_attn.q_norm is not None:
                attn = block.self_attn
                attn.q_norm = FusedRMSNorm(attn.q_norm, ops)
                attn.k_norm = FusedRMSNorm(attn.k_norm, ops)
            model.layers[i] = ResidualBlock(block, ops, gemv_max_batch)
    if isinstance(model.norm, RMSNorm):
        model.norm = FinalNorm(model.norm, ops)
    if gemv_max_batch and isinstance(model.lm_head, nn.Linear):
        model.lm_head = GemvLinear(model.lm_head, ops, gemv_max_batch)
    for m in model.modules():  # quantized Linears: their kernels with Triton's ops, else refs
        if hasattr(m, "use_kernel"):
            m.use_kernel = ops.name == "triton"
    return model


def plain_weight_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain kiln parameter name -> the tensor of `model` (fused or not) that holds it: a
    fused weight's rows for each of the Linears fuse_model concatenated, else the parameter."""
    views: dict[str, torch.Tensor] = {}
    fused: set[str] = set()
    for prefix, m in model.named_modules():
        parts = []
        if isinstance(m, FusedAttention):
            h = m.heads
            rows = [h.num_heads * h.head_dim] + [h.num_kv_heads * h.head_dim] * 2
            parts = [("qkv_proj", ["q_proj", "k_proj", "v_proj"], rows)]
        elif isinstance(m, FusedMLP):
            half = m.gate_up_proj.weight.shape[0] // 2
            parts = [("gate_up_proj", ["gate_proj", "up_proj"], [half, half])]
        elif isinstance(m, FusedMoE):
            fused |= {f"{prefix}.w13", f"{prefix}.w2"}
            half = m.w13.shape[1] // 2
            for e in range(m.w13.shape[0]):
                gate, up = m.w13[e].split([half, half])
                experts = f"{prefix}.experts.{e}"
                views |= {f"{experts}.gate_proj.weight": gate, f"{experts}.up_proj.weight": up,
                          f"{experts}.down_proj.weight": m.w2[e]}  # fmt: skip
        for name, plain, rows in parts:
            linear = getattr(m, name)
            for kind in ("weight", "bias"):
                tensor = getattr(linear, kind, None)
                if tensor is None:
                    continue
                fused.add(f"{prefix}.{name}.{kind}")
                for part, piece in zip(plain, tensor.split(rows)):
                    views[f"{prefix}.{part}.{kind}"] = piece
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in fused:
            views[name] = p
    return views


@torch.no_grad()
def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a plain model's state dict (kiln names, every weight) into `model`, fused or not,
    in place: its tensors keep their storage, so captured CUDA graphs stay valid."""
    views = plain_weight_views(model)
    unknown = sorted(set(state) - set(views))
    missing = sorted(set(views) - set(state))
    if unknown or missing:
        raise ConfigError(
            "the weights do not fit the engine's model: "
            + (f"it has no {unknown[0]!r} (quantized or adapter-wrapped?)" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"{missing[0]!r} not given" if missing else "")
        )
    for name, tensor in state.items():
        views[name].copy_(tensor)
