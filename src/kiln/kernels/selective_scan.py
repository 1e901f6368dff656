"""Mamba's selective scan: a chunked scan over a prefill's tokens and a one-token state update.

For each channel d and state index n, with dt = softplus(delta + delta_bias):

    h_t = exp(dt_t A[d, n]) h_{t-1} + dt_t B_t[g(d), n] u_t        (the state [D, N])
    y_t = sum_n h_t C_t[g(d), n] + D[d] u_t,  then y_t * silu(z_t)  (when z is given)

g(d) = d // (D / G): Mamba-1 has G = 1 group; Mamba-2 is the same recurrence with dt, A and
D shared by the head_dim channels of a head, and B, C by the heads of a group (its caller
expands them per channel), so one kernel serves both.

The tokens are a flat varlen list (`cu_seqlens` [S + 1] bound the S sequences); sequence s
starts from `state[state_idx[s]]` if `has_state[s]`, else from zeros, and its final state is
written back there. The state is float32 whatever the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels._triton import tl, triton, use_triton


def _dt(delta, delta_bias, delta_softplus):
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    return F.softplus(dt) if delta_softplus else dt


def _per_channel(t: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[..., G, N] -> [..., D, N]: each channel's group's row."""
    return t.float().repeat_interleave(num_channels // t.shape[-2], dim=-2)


def selective_scan_ref(
    u: torch.Tensor,  # [T, D]
    delta: torch.Tensor,  # [T, D]
    A: torch.Tensor,  # [D, N] float32
    B: torch.Tensor,  # [T, G, N]
    C: torch.Tensor,  # [T, G, N]
    D: torch.Tensor | None,  # [D]
    z: torch.Tensor | None,  # [T, D]
    delta_bias: torch.Tensor | None,  # [D]
    delta_softplus: bool,
    state: torch.Tensor,  # [num_slots, D, N] float32, updated in place
    state_idx: torch.Tensor,  # [S]
    has_state: torch.Tensor,  # [S] bool
    cu_seqlens: torch.Tensor,  # [S + 1]
) -> torch.Tensor:
    """Plain-torch selective scan, one token at a time; y [T, D] in u's dtype."""
    dt = _dt(delta, delta_bias, delta_softplus)
    Bd, Cd = _per_channel(B, u.shape[1]), _per_channel(C, u.shape[1])  # [T, D, N]
    y = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    bounds = cu_seqlens.tolist()
    for s, slot in enumerate(state_idx.tolist()):
        h = state[slot].clone() if has_state[s] else torch.zeros_like(state[slot])
        for t in range(bounds[s], bounds[s + 1]):
            h = torch.exp(dt[t, :, None] * A) * h + (dt[t] * u[t].float())[:, None] * Bd[t]
            y[t] = (h * Cd[t]).sum(-1)
        state[slot] = h
    return _finish(y, u, D, z)


def _finish(y, u, D, z):
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_state_update_ref(
    u: torch.Tensor,  # [S, D]: one token of each sequence
    delta: torch.Tensor,  # [S, D]
    A: torch.Tensor,  # [D, N] float32
    B: torch.Tensor,  # [S, G, N]
    C: torch.Tensor,  # [S, G, N]
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    state: torch.Tensor,  # [num_slots, D, N] float32, updated in place
    state_idx: torch.Tensor,  # [S]
) -> torch.Tensor:
    """Plain-torch decode step: every sequence advances its state by one token; y [S, D]."""
    dt = _dt(delta, delta_bias, delta_softplus)  # [S, D]
    Bd, Cd = _per_channel(B, u.shape[1]), _per_channel(C, u.shape[1])
    h = state[state_idx] * torch.exp(dt[..., None] * A) + (dt * u.float())[..., None] * Bd
    state[state_idx] = h
    return _finish((h * Cd).sum(-1), u, D, z)


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)  # torch's threshold


@triton.jit
def _scan_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    state_ptr, idx_ptr, has_ptr, cu_ptr,
    stride_u, stride_dt, stride_b, stride_bg, stride_c, stride_cg, stride_z, stride_y,
    stride_slot, stride_sd,
    DIM, NSTATE, GROUP_DIM,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: one sequence, BLOCK_D channels. The tokens go BLOCK_T at a time; within a
    chunk the recurrence is a parallel (associative) scan, between chunks the state carries."""
    seq = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask, nmask = d < DIM, n < NSTATE
    dn_mask = dmask[:, None] & nmask[None, :]
    start, end = tl.load(cu_ptr + seq), tl.load(cu_ptr + seq + 1)
    slot = tl.load(idx_ptr + seq).to(tl.int64)
    has = tl.load(has_ptr + seq) != 0
    s_off = slot * stride_slot + d[:, None] * stride_sd + n[None, :]
    h = tl.load(state_ptr + s_off, mask=dn_mask, other=0.0).to(tl.float32)  # [BD, BN]
    h = tl.where(has, h, 0.0)  # a fresh sequence: whatever the slot held is not its state
    A = tl.load(A_ptr + d[:, None] * NSTATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    g = d // GROUP_DIM
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        td_mask = tmask[:, None] & dmask[None, :]
        tdn_mask = td_mask[:, :, None] & nmask[None, None, :]
        t64 = t.to(tl.int64)
        u = tl.load(u_ptr + t64[:, None] * stride_u + d[None, :], mask=td_mask, other=0.0)
        u = u.to(tl.float32)  # [BT, BD]
        dt = tl.load(dt_ptr + t64[:, None] * stride_dt + d[None, :], mask=td_mask, other=0.0)
        dt = dt.to(tl.float32)
        if HAS_BIAS:
            dt += bias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        bc = g[None, :, None] * stride_bg + n[None, None, :]
        Bt = tl.load(B_ptr + t64[:, None, None] * stride_b + bc, mask=tdn_mask, other=0.0)
        cc = g[None, :, None] * stride_cg + n[None, None, :]
        Ct = tl.load(C_ptr + t64[:, None, None] * stride_c + cc, mask=tdn_mask, other=0.0)
        dA = tl.where(tdn_mask, tl.exp(dt[:, :, None] * A[None, :, :]), 1.0)  # [BT, BD, BN]
        dBu = tl.where(tdn_mask, (dt * u)[:, :, None] * Bt.to(tl.float32), 0.0)
        decay, hs = tl.associative_scan((dA, dBu), 0, _combine)
        hs = decay * h[None, :, :] + hs  # every token's state
        y = tl.sum(hs * Ct.to(tl.float32), axis=2)  # [BT, BD]
        if HAS_D:
            y += u * Dv[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + t64[:, None] * stride_z + d[None, :], mask=td_mask, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + t64[:, None] * stride_y + d[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=td_mask)  # fmt: skip
        last = tl.minimum(t0 + BLOCK_T, end) - 1
        h = tl.sum(tl.where((t == last)[:, None, None], hs, 0.0), axis=0)
    tl.store(state_ptr + s_off, h, mask=dn_mask)


def _block_sizes(dim: int, nstate: int, tokens: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(nstate)
    block_d = max(1, min(triton.next_power_of_2(dim), 4096 // block_n))
    block_t = max(1, min(16, 8192 // (block_d * block_n)))
    return min(block_t, triton.next_power_of_2(max(tokens, 1))), block_d, block_n


def _check(u, delta, A, B, C, state):
    assert u.stride(-1) == delta.stride(-1) == B.stride(-1) == C.stride(-1) == 1
    assert A.is_contiguous() and state.is_contiguous() and state.dtype == torch.float32
    assert u.shape[1] % B.shape[1] == 0


def selective_scan_triton(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, state_idx, has_state, cu_seqlens
) -> torch.Tensor:
    """Triton chunked selective scan; same contract as selective_scan_ref."""
    _check(u, delta, A, B, C, state)
    num_seqs, (T, dim), nstate = len(state_idx), u.shape, A.shape[1]
    y = torch.empty_like(u)
    block_t, block_d, block_n = _block_sizes(dim, nstate, T)
    z_ = z if z is not None else u
    _scan_kernel[(num_seqs, triton.cdiv(dim, block_d))](
        u, delta, A, B, C, D if D is not None else A, z_,
        delta_bias if delta_bias is not None else A, y,
        state, state_idx, has_state, cu_seqlens,
        u.stride(0), delta.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        z_.stride(0), y.stride(0), state.stride(0), state.stride(1),
        dim, nstate, dim // B.shape[1],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n,
    )  # fmt: skip
    return y


@triton.jit
def _state_update_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, state_ptr, idx_ptr,
    stride_u, stride_dt, stride_b, stride_bg, stride_c, stride_cg, stride_z, stride_y,
    stride_slot, stride_sd,
    DIM, NSTATE, GROUP_DIM,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: one sequence's token, BLOCK_D channels; the state is read and written once."""
    seq = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < DIM
    dn_mask = dmask[:, None] & (n < NSTATE)[None, :]
    slot = tl.load(idx_ptr + seq).to(tl.int64)
    s_off = slot * stride_slot + d[:, None] * stride_sd + n[None, :]
    h = tl.load(state_ptr + s_off, mask=dn_mask, other=0.0)
    A = tl.load(A_ptr + d[:, None] * NSTATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + seq * stride_u + d, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + seq * stride_dt + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    g = d // GROUP_DIM
    Bv = tl.load(B_ptr + seq * stride_b + g[:, None] * stride_bg + n[None, :], mask=dn_mask,
                 other=0.0).to(tl.float32)  # fmt: skip
    Cv = tl.load(C_ptr + seq * stride_c + g[:, None] * stride_cg + n[None, :], mask=dn_mask,
                 other=0.0).to(tl.float32)  # fmt: skip
    h = h * tl.exp(dt[:, None] * A) + (dt * u)[:, None] * Bv
    tl.store(state_ptr + s_off, h, mask=dn_mask)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += u * tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + seq * stride_z + d, mask=dmask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + seq * stride_y + d, y.to(y_ptr.dtype.element_ty), mask=dmask)


def selective_state_update_triton(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, state_idx
) -> torch.Tensor:
    """Triton decode step; same contract as selective_state_update_ref."""
    _check(u, delta, A, B, C, state)
    (num_seqs, dim), nstate = u.shape, A.shape[1]
    y = torch.empty_like(u)
    block_n = triton.next_power_of_2(nstate)
    block_d = max(1, min(triton.next_power_of_2(dim), 4096 // block_n))
    z_ = z if z is not None else u
    _state_update_kernel[(num_seqs, triton.cdiv(dim, block_d))](
        u, delta, A, B, C, D if D is not None else A, z_,
        delta_bias if delta_bias is not None else A, y, state, state_idx,
        u.stride(0), delta.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        z_.stride(0), y.stride(0), state.stride(0), state.stride(1),
        dim, nstate, dim // B.shape[1],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n,
    )  # fmt: skip
    return y


def _triton_ok(u: torch.Tensor) -> bool:
    return use_triton(u) and not torch.is_grad_enabled()  # the kernels have no backward


def selective_scan(*args, **kwargs) -> torch.Tensor:
    """The selective scan over a varlen token list (see the module doc): Triton on CUDA
    (the torch reference where gradients are wanted: training)."""
    fn = selective_scan_triton if _triton_ok(args[0]) else selective_scan_ref
    return fn(*args, **kwargs)


def selective_state_update(*args, **kwargs) -> torch.Tensor:
    """One decode token per sequence, its state updated in place: Triton on CUDA."""
    fn = selective_state_update_triton if _triton_ok(args[0]) else selective_state_update_ref
    return fn(*args, **kwargs)
