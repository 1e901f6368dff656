"""Mamba mixers (Mamba-1 and Mamba-2): the SSM blocks that stand where attention would.

A mixer reads its recurrent state through the attention backend, like attention reads its
KV cache: `backend.ssm_states(layer_idx)` returns the layer's SSMStates (state pools, which
slot each sequence uses, whether it has a state yet, and where the flat token list splits
into sequences). A backend without `ssm_states` (training, the profiling forward) has no
cache: every row of a [B, T] input (or the whole flat list) is one sequence from zeros.

Parameter names follow Hugging Face's MambaMixer / Mamba2Mixer (in_proj, conv1d, x_proj,
dt_proj, dt_bias, A_log, D, norm, out_proj), under `layers.{i}.mixer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels.selective_scan import selective_scan, selective_state_update


@dataclass
class SSMStates:
    """One layer's recurrent state, and how this forward's sequences map onto it."""

    conv: torch.Tensor  # [num_slots, conv_dim, conv_kernel - 1]: the last inputs to the conv
    ssm: torch.Tensor  # [num_slots, D, N] float32
    state_idx: torch.Tensor  # [S] int64: each sequence's slot
    has_state: torch.Tensor  # [S] bool: False: starts from zeros (a fresh prefill)
    cu_seqlens: torch.Tensor | None = None  # [S + 1] of a flat input; None: rows of [B, T]
    decode: bool = False  # every sequence has a state (one token each: the decode kernel)


def state_shapes(config: ModelConfig, layer_idx: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(conv state [conv_dim, K - 1], SSM state [D, N]) of one sequence at an SSM layer."""
    s = config.ssm
    conv_dim = s.intermediate_size
    if config.layer_types[layer_idx] == "mamba2":
        conv_dim += 2 * s.n_groups * s.state_size
    return (conv_dim, s.conv_kernel - 1), (s.intermediate_size, s.state_size)


class SSMStateCache:
    """State pools of every SSM layer, `num_slots` sequences each: the conv state in the
    model's dtype, the SSM state in float32. The reference loop (ContiguousKVCache) keeps one
    slot a row; the engine (kiln.engine.state_cache) one a running sequence."""

    def __init__(self, config: ModelConfig, num_slots: int, dtype, device):
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        for i in range(config.num_layers):
            if config.is_ssm_layer(i):
                conv, ssm = state_shapes(config, i)
                self.conv[i] = torch.zeros(num_slots, *conv, dtype=dtype, device=device)
                self.ssm[i] = torch.zeros(num_slots, *ssm, device=device)

    def view(self, layer_idx: int, state_idx, has_state, cu_seqlens=None, decode=False):
        conv, ssm = self.conv[layer_idx], self.ssm[layer_idx]
        return SSMStates(conv, ssm, state_idx, has_state, cu_seqlens, decode)

    def copy(self, src: int, dst: int) -> None:
        """Slot dst takes slot src's state (a forked sequence)."""
        for pool in (*self.conv.values(), *self.ssm.values()):
            pool[dst] = pool[src]

    @staticmethod
    def bytes_per_slot(config: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes one sequence's state takes over every SSM layer."""
        total = 0
        for i in range(config.num_layers):
            if config.is_ssm_layer(i):
                (c, k), (d, n) = state_shapes(config, i)
                total += c * k * dtype.itemsize + d * n * 4
        return total


def _states(backend, layer_idx: int, x: torch.Tensor, conv_dim: int, k: int, ssm_shape):
    """The layer's SSMStates from the backend, or zero states for a cacheless forward."""
    get = getattr(backend, "ssm_states", None)
    if get is not None:
        return get(layer_idx)
    s = x.shape[0] if x.dim() == 3 else 1
    conv = torch.zeros(s, conv_dim, k - 1, dtype=x.dtype, device=x.device)
    ssm = torch.zeros(s, *ssm_shape, device=x.device)
    idx = torch.arange(s, device=x.device)
    return SSMStates(conv, ssm, idx, torch.zeros(s, dtype=torch.bool, device=x.device))


def _cu_seqlens(x: torch.Tensor, st: SSMStates) -> torch.Tensor:
    if st.cu_seqlens is not None:
        return st.cu_seqlens
    b, t = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
    return torch.arange(0, b * t + 1, t, device=x.device)


def causal_conv1d(
    x: torch.Tensor,  # [T, C] flat tokens
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,
    st: SSMStates,
    cu_seqlens: torch.Tensor,  # [S + 1]
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over each sequence, continuing from its conv state (the
    K - 1 inputs before it; zeros for a fresh one), which it then advances, in place."""
    k, (n, c), s = weight.shape[1], x.shape, len(st.state_idx)
    # [S, K-1, C]: each sequence's previous inputs, zeros where it has none
    prev = st.conv[st.state_idx].transpose(1, 2)
    prev = torch.where(st.has_state[:, None, None], prev, 0)
    ext = torch.cat([prev.reshape(s * (k - 1), c), x.to(prev.dtype)])  # [S (K-1) + T, C]
    seg = torch.searchsorted(cu_seqlens[1:], torch.arange(n, device=x.device), right=True)
    pos = torch.arange(n, device=x.device) - cu_seqlens[seg]

    def rows(seq, q):  # ext rows of inputs at offsets q (< 0: in the state) of sequences seq
        return torch.where(q >= 0, s * (k - 1) + cu_seqlens[seq] + q, seq * (k - 1) + k - 1 + q)

    taps = torch.arange(k, device=x.device) - (k - 1)
    windows = ext[rows(seg[:, None], pos[:, None] + taps)]  # [T, K, C]
    out = torch.einsum("tkc,ck->tc", windows.float(), weight.float())
    if bias is not None:
        out = out + bias.float()
    seqs = torch.arange(s, device=x.device)[:, None]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
    st.conv[st.state_idx] = ext[rows(seqs, lens - 1 + taps[1:])].transpose(1, 2)
    return F.silu(out).to(x.dtype).contiguous()  # (einsum may hand back [T, C] column-major)


def _scan(st: SSMStates, cu_seqlens, u, dt, A, B, C, D, z, dt_bias, softplus):
    """The selective scan (kiln.kernels.selective_scan) of the step's tokens [T, D]."""
    if st.decode and u.shape[0] == len(st.state_idx):
        return selective_state_update(u, dt, A, B, C, D, z, dt_bias, softplus, st.ssm, st.state_idx)
    return selective_scan(
        u, dt, A, B, C, D, z, dt_bias, softplus, st.ssm, st.state_idx, st.has_state, cu_seqlens
    )


class MambaMixer(nn.Module):
    """Mamba-1: in_proj -> (x, z); x -> conv -> SiLU -> x_proj (dt, B, C) -> scan -> * silu(z)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        s, h = config.ssm, config.hidden_size
        self.layer_idx = layer_idx
        self.d, self.n, self.rank, self.k = (
            s.intermediate_size, s.state_size, s.time_step_rank, s.conv_kernel
        )  # fmt: skip
        self.in_proj = nn.Linear(h, 2 * self.d, bias=s.proj_bias)
        self.conv1d = nn.Conv1d(self.d, self.d, self.k, groups=self.d, bias=s.conv_bias)
        self.x_proj = nn.Linear(self.d, self.rank + 2 * self.n, bias=False)
        self.dt_proj = nn.Linear(self.rank, self.d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.d, self.n))
        self.D = nn.Parameter(torch.ones(self.d))
        self.out_proj = nn.Linear(self.d, h, bias=s.proj_bias)

    def forward(self, x: torch.Tensor, backend) -> torch.Tensor:
        st = _states(backend, self.layer_idx, x, self.d, self.k, (self.d, self.n))
        cu = _cu_seqlens(x, st)
        xs, z = self.in_proj(x.reshape(-1, x.shape[-1])).chunk(2, dim=-1)  # [T, D] each
        xs = causal_conv1d(xs, self.conv1d.weight[:, 0], self.conv1d.bias, st, cu)
        dt, B, C = self.x_proj(xs).split([self.rank, self.n, self.n], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # its bias goes in before the softplus
        A = -torch.exp(self.A_log.float())
        y = _scan(st, cu, xs, dt, A, B[:, None], C[:, None], self.D, z, self.dt_proj.bias, True)
        return self.out_proj(y).view(x.shape)


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm: RMSNorm of x * silu(gate) over groups of `group_size` channels."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        h = h.unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2: in_proj -> (z, xBC, dt); xBC -> conv -> SiLU -> (x, B, C) -> scan with scalar
    A, dt per head -> gated RMSNorm with z -> out_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        s, h = config.ssm, config.hidden_size
        self.layer_idx = layer_idx
        self.d, self.n, self.k, self.groups = (
            s.intermediate_size, s.state_size, s.conv_kernel, s.n_groups
        )  # fmt: skip
        self.heads, self.head_dim = s.num_heads, s.head_dim
        self.dt_limit = s.time_step_limit
        self.conv_dim = self.d + 2 * self.groups * self.n
        self.in_proj = nn.Linear(h, self.d + self.conv_dim + self.heads, bias=s.proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.k, groups=self.conv_dim, bias=s.conv_bias
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.d, self.d // self.groups, config.norm_eps)
        self.out_proj = nn.Linear(self.d, h, bias=s.proj_bias)

    def forward(self, x: torch.Tensor, backend) -> torch.Tensor:
        st = _states(backend, self.layer_idx, x, self.conv_dim, self.k, (self.d, self.n))
        cu = _cu_seqlens(x, st)
        proj = self.in_proj(x.reshape(-1, x.shape[-1]))
        z, xbc, dt = proj.split([self.d, self.conv_dim, self.heads], dim=-1)
        xbc = causal_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, st, cu)
        xs, B, C = xbc.split([self.d, self.groups * self.n, self.groups * self.n], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # [T, H]
        # per channel: the scan's Mamba-1 form, each head's scalars repeated head_dim times
        per_channel = lambda t: t.repeat_interleave(self.head_dim, dim=-1)  # noqa: E731
        A = per_channel(-torch.exp(self.A_log.float()))[:, None].expand(self.d, self.n)
        B, C = B.unflatten(-1, (self.groups, self.n)), C.unflatten(-1, (self.groups, self.n))
        y = _scan(
            st, cu, xs, per_channel(dt), A.contiguous(), B, C, per_channel(self.D), None,
            None, False,
        )  # fmt: skip
        return self.out_proj(self.norm(y, z)).view(x.shape)


def make_mixer(config: ModelConfig, layer_idx: int) -> nn.Module:
    cls = MambaMixer if config.layer_types[layer_idx] == "mamba" else Mamba2Mixer
    return cls(config, layer_idx)
