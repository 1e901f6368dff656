"""Fused sampling for the engine's common case: temperature only, one pass over the logits.

Each row b of logits [B, V] yields a token and its log-probability under the RAW logits
(temperature not applied, as vLLM reports it):
- greedy rows (temperature <= 0) take argmax_v logits[v], ties to the smallest index, exactly
  torch.argmax on the float32 logits;
- sampled rows draw by Gumbel-max: argmax_v logits[v] / T - log E_v with E_v ~ Exp(1) (so
  -log E_v is Gumbel), which is an exact draw from softmax(logits / T).

Each program walks its row (or, with num_splits > 1, a piece of whole chunks of it) in chunks
of BLOCK_V and never reduces inside the loop: each lane of the chunk keeps its own running max
and sum of exp (an online log-sum-exp of the raw logits) and its own best score and index,
updated only on a strictly greater score, so that a lane's best is its first. One reduction at
the end merges the lanes: the max score, then the smallest index among the lanes holding it.
Split rows write that per piece, and a second kernel merges the pieces the same way. Splits
put more SMs on small batches (a lone row would leave all but one SM idle); the result does
not depend on them. The kernel works in base 2: argmax x * log2(e) / T - log2 E is the same.

Noise is Philox (tl.randint4x), keyed by the row's seed, which the kernel loads from a device
tensor (so a CUDA graph can replay the call with new seeds): counter c gives the noise of
tokens 4c .. 4c + 3, one Philox call for four tokens, so a token's noise depends only on (seed,
token). Its 31 bits give u in (0, 1), finest near 0, and E = -log(1 - u): a short series below
1/64 keeps the smallest E (the ones that win draws) exact, where 1 - u would round them. On
CUDA log2 is the hardware's lg2.approx (relative error ~1e-7); the precise one costs more than
the rest of the kernel. The torch reference draws its noise (in float64) from a
torch.Generator: the same math, other random numbers.
"""

from __future__ import annotations

import torch

from kiln.kernels._triton import num_sms, tl, triton, use_triton

# Launch settings: chunks of BLOCK_V tokens for whole rows, SPLIT_BLOCK_V for split ones (the
# fastest of each on an H100 at V = 151936, B = 1 .. 256); the interpreter uses 128-token
# chunks so that tiny tests still cross chunk boundaries. Multiples of 4 (four tokens per
# Philox call); the draw does not depend on them.
CUDA_CONFIG = dict(BLOCK_V=8192, SPLIT_BLOCK_V=4096, num_warps=16)
INTERPRETER_CONFIG = dict(BLOCK_V=128, SPLIT_BLOCK_V=128, num_warps=4)
MAX_SPLITS = 64  # a power of two: the merge kernel loads them all


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    generator: torch.Generator | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: logits [B, V], temperature [B] (<= 0: greedy) -> (tokens [B] int64,
    logprobs [B] float32 under the raw logits). Sampled rows use Gumbel-max with noise drawn
    from `generator`. `bitmask` [B, ceil(V / 32)]: tokens whose bit is clear are -inf first."""
    x = logits.float()
    if bitmask is not None:
        x = x.masked_fill(~unpack_bitmask(bitmask, x.shape[1]), float("-inf"))
    greedy = temperature <= 0
    tokens = x.argmax(-1)
    if not bool(greedy.all()):
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        exp1 = -torch.log1p(-u)  # Exp(1), exact down to the smallest values
        gumbel = -torch.log(exp1.clamp_min_(1e-300)).float()
        t = torch.where(greedy, 1.0, temperature.float())[:, None]
        tokens = torch.where(greedy, tokens, (x / t + gumbel).argmax(-1))
    logprobs = torch.log_softmax(x, -1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V / 32)] int32 -> [B, V] bool: bit j of word w is token 32w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:  # lg2.approx.f32: one instruction, where tl.log2 is a ~20-instruction polynomial
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _neg_log2_exp1(r, FAST_LOG: tl.constexpr):
    """Philox words r -> -log2 E with E = -log(1 - u) ~ Exp(1), u uniform in (0, 1)."""
    i = r.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, ~i, i)  # 31 random bits
    u = (i.to(tl.float32) + 0.5) * 4.656612873077393e-10  # * 2^-31
    u = tl.minimum(u, 0.99999994)  # i near 2^31 rounds up to u = 1
    small = u + u * u * (0.5 + u * 0.3333333333333333)  # -log(1 - u), error < u^4 / 4
    big = _log2(1.0 - u, FAST_LOG) * -0.6931471805599453
    return -_log2(tl.where(u < 0.015625, small, big), FAST_LOG)


@triton.jit
def _merge(best, best_idx, run_max, run_sum, V):
    """Lanes (or splits) -> (best score, its first token, max logit, sum of exp(x - max))."""
    top = tl.max(best)
    token = tl.min(tl.where(best == top, best_idx, V))  # the first of the lanes' firsts
    m = tl.max(run_max)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(run_sum * tl.exp2((run_max - m_safe) * 1.4426950408889634))
    return top, token, m, total


@triton.jit
def _finish(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, total):
    x_tok = tl.load(row_ptr + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, (x_tok - m) - tl.log(total))


# temperature and seeds may be slices of a packed per-step buffer: their alignment varies.
@triton.jit(do_not_specialize=["temperature_ptr", "seeds_ptr"])
def _sample_kernel(
    logits_ptr, temperature_ptr, seeds_ptr, tokens_ptr, logprobs_ptr, parts_ptr, mask_ptr,
    stride_row, stride_mask, V,
    BLOCK_V: tl.constexpr, SPLIT: tl.constexpr, FAST_LOG: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    row_ptr = logits_ptr + row * stride_row
    temp = tl.load(temperature_ptr + row).to(tl.float32)
    seed = tl.load(seeds_ptr + row)
    sampled = temp > 0
    log2e = 1.4426950408889634
    scale = log2e / tl.where(sampled, temp, 1.0)
    # Split s takes whole chunks: tokens [lo, hi).
    split_len = tl.cdiv(tl.cdiv(V, num_splits), BLOCK_V) * BLOCK_V
    lo = split * split_len
    hi = tl.minimum(lo + split_len, V)

    # A chunk is [BLOCK_V // 4, 4]: token 4 * i + j of the chunk takes Philox output j of
    # counter i, and each thread's four tokens are contiguous in memory.
    QUADS: tl.constexpr = BLOCK_V // 4
    quad = tl.arange(0, QUADS)
    lane = quad[:, None] * 4 + tl.arange(0, 4)[None, :]  # [QUADS, 4]
    col = tl.arange(0, 4)[None, :]
    run_max = tl.full([QUADS, 4], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([QUADS, 4], dtype=tl.float32)
    best = tl.full([QUADS, 4], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([QUADS, 4], dtype=tl.int32)
    for start in range(lo, hi, BLOCK_V):
        idx = start + lane
        x = tl.load(row_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        if MASK:  # a token whose bit is clear is -inf: out of the draw and the log-sum-exp
            word = tl.load(mask_ptr + row * stride_mask + idx // 32, mask=idx < hi, other=0)
            x = tl.where(((word >> (idx % 32)) & 1) != 0, x, float("-inf"))
        # Online log-sum-exp, one exp2 per token: exp2(-|x - m| * log2 e) rescales the sum
        # when x is the new max and is x's own term otherwise.
        new_max = tl.maximum(run_max, x)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # both -inf: e = 0
        e = tl.exp2((tl.minimum(run_max, x) - safe_max) * log2e)
        run_sum = tl.where(x > run_max, run_sum * e + 1.0, run_sum + e)
        run_max = new_max
        if sampled:
            r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + quad)
            r = tl.where(col == 0, r0[:, None], r1[:, None])
            r = tl.where(col == 2, r2[:, None], r)
            r = tl.where(col == 3, r3[:, None], r)
            score = x * scale + _neg_log2_exp1(r, FAST_LOG)
        else:
            score = x
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)

    top, token, m, total = _merge(best, best_idx, run_max, run_sum, V)
    if SPLIT:  # parts [4, B, num_splits]: best score, its token, max logit, sum of exp
        part = parts_ptr + row * num_splits + split
        plane = tl.num_programs(0) * num_splits
        tl.store(part, top)
        tl.store(part + plane, token.to(tl.float32, bitcast=True))
        tl.store(part + 2 * plane, m)
        tl.store(part + 3 * plane, total)
    else:
        _finish(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, total)


@triton.jit(do_not_specialize=["num_splits"])
def _sample_merge_kernel(
    logits_ptr, tokens_ptr, logprobs_ptr, parts_ptr,
    stride_row, V, num_splits,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    ok = s < num_splits
    part = parts_ptr + row * num_splits + s
    plane = tl.num_programs(0) * num_splits
    best = tl.load(part, mask=ok, other=float("-inf"))
    best_idx = tl.load(part + plane, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    run_max = tl.load(part + 2 * plane, mask=ok, other=float("-inf"))
    run_sum = tl.load(part + 3 * plane, mask=ok, other=0.0)
    _, token, m, total = _merge(best, best_idx, run_max, run_sum, V)
    _finish(logits_ptr + row * stride_row, tokens_ptr, logprobs_ptr, row, token, m, total)


def choose_num_splits(batch: int, vocab: int, device: torch.device) -> int:
    """About one program per SM (on an H100, more only queued up), each split at least one
    chunk long; batches of num_sms rows or more take whole rows."""
    config = CUDA_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG
    chunks = triton.cdiv(vocab, config["SPLIT_BLOCK_V"])
    return max(1, min(num_sms(device) // batch, chunks, MAX_SPLITS))


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    num_splits: int | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton sampling; same contract as sample_ref, with the noise of row b keyed by
    seeds[b] (int64, on the device). num_splits (None: chosen from the batch and the SM
    count) cuts each row into that many pieces of whole chunks, merged by a second kernel;
    the result does not depend on it. `bitmask` [B, ceil(V / 32)] int32 (structured
    outputs): only the tokens whose bit is set are drawn, and the logprobs are those of the
    masked logits (as if kiln.engine.structured.apply_bitmask had run first), in the same
    single pass over the logits."""
    b, v = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert temperature.shape == (b,) and seeds.shape == (b,) and seeds.dtype == torch.int64
    assert temperature.device == logits.device == seeds.device
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b == 0:
        return tokens, logprobs
    if bitmask is not None:
        assert bitmask.shape == (b, triton.cdiv(v, 32)) and bitmask.dtype == torch.int32
        assert bitmask.stride(1) == 1 and bitmask.device == logits.device
    config = CUDA_CONFIG if logits.is_cuda else INTERPRETER_CONFIG
    block_v = config["SPLIT_BLOCK_V"]
    if num_splits is None:
        num_splits = choose_num_splits(b, v, logits.device)
    num_splits = max(1, min(num_splits, triton.cdiv(v, block_v), MAX_SPLITS))
    # No empty splits: each takes whole chunks, as the kernel cuts them.
    num_splits = triton.cdiv(v, triton.cdiv(triton.cdiv(v, num_splits), block_v) * block_v)
    split = num_splits > 1
    if not split:
        block_v = config["BLOCK_V"]
    parts = torch.empty(4, b, num_splits, device=logits.device) if split else tokens  # unused
    _sample_kernel[(b, num_splits)](
        logits, temperature, seeds, tokens, logprobs, parts,
        bitmask if bitmask is not None else tokens,  # (unused without a mask)
        logits.stride(0), bitmask.stride(0) if bitmask is not None else 0, v,
        BLOCK_V=block_v, SPLIT=split, num_warps=config["num_warps"],
        FAST_LOG=logits.is_cuda and torch.version.hip is None,  # PTX lg2.approx: NVIDIA only
        MASK=bitmask is not None,
    )  # fmt: skip
    if split:
        _sample_merge_kernel[(b,)](
            logits, tokens, logprobs, parts,
            logits.stride(0), v, num_splits,
            BLOCK_S=MAX_SPLITS,
        )  # fmt: skip
    return tokens, logprobs


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    generator: torch.Generator | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their raw logprobs: Triton on CUDA (noise keyed by `seeds`), else the
    torch reference (noise from `generator`; `seeds` unused)."""
    if use_triton(logits):
        return sample_triton(logits, temperature, seeds, bitmask=bitmask)
    return sample_ref(logits, temperature, generator, bitmask)
