"""Sampler: one batched pass from logits to next tokens, every request with its own settings.

Order: penalties (repetition over prompt + output, presence/frequency over output) and
min_tokens' EOS mask act on the logits; logprobs are reported from the model's own distribution
(log_softmax of the raw logits, as vLLM does); then greedy rows take the argmax and the others
divide by their temperature, keep top_k / top_p / min_p, and draw with exponential noise
(argmax of p / q, q ~ Exp(1)). A request with a seed draws its noise from its own generator, so
its tokens do not depend on what else is in the batch.

A batch that only needs temperature sampling (no top-k/top-p/min-p, penalties, min_tokens
masks, seeds or top-N logprobs) can take the fast path instead: the engine Ops' `sample`
(kiln.kernels.sample: log-sum-exp and Gumbel-max argmax in a single pass over the logits, or
its torch reference); greedy rows give the same argmax either way. Whether a step's batch does
is its plan's decision (kiln.engine.model_runner.StepPlan), made once. Nothing here waits for
the GPU: `sample` returns a PendingSample whose results are copied to pinned host memory
behind the GPU work, and `.result()` waits for them (so the engine can schedule the next step
meanwhile).
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine.ops import Ops
from kiln.engine.sampling_params import GREEDY_BELOW
from kiln.engine.sequence import Sequence
from kiln.engine.structured import apply_bitmask, fill_bitmask
from kiln.engine.transfer import to_device, to_host

_temperature = operator.attrgetter("params.temperature")  # of a Sequence


class PendingSample:
    """A step's sampled tokens on their way to the host; .result() waits for them (once: the
    engine reads a step's tokens both for its grammars and for its outputs). `waited`: the
    host seconds spent blocked on the GPU for them, over the process's life (the step trace
    reads it: a step that waits is GPU-bound, one that does not is host-bound)."""

    waited = 0.0

    def __init__(self, tokens, token_lp, top=None):
        # top: (rows, wanted, vals [R, k] | None, ids [R, k] | None, chosen [R]) for logprobs
        self.tokens = tokens  # stays on the device: the next step's input ids
        self._host = [to_host(tokens), to_host(token_lp)]
        self._top = top
        if top is not None:
            self._host += [to_host(t) if t is not None else None for t in top[2:]]
        self._event = None
        if tokens.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        if self._result is None:
            self._result = self._read()
        return self._result

    def _read(self) -> SampleResult:
        if self._event is not None:
            t0 = time.perf_counter()
            self._event.synchronize()
            PendingSample.waited += time.perf_counter() - t0
        tokens, token_lp = self._host[0].tolist(), self._host[1].tolist()
        out: list[dict[int, float] | None] = [None] * len(tokens)
        if self._top is not None:
            rows, wanted = self._top[:2]
            vals, ids, chosen = (t.tolist() if t is not None else None for t in self._host[2:])
            for j, i in enumerate(rows):
                d = {}
                if wanted[i]:
                    d = dict(zip(ids[j][: wanted[i]], vals[j][: wanted[i]]))
                d[tokens[i]] = chosen[j]
                out[i] = d
        return SampleResult(tokens, token_lp, out)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token
    top_logprobs: list[dict[int, float] | None]  # top-N (+ the sampled token) where asked


def make_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of completion `index` of a request seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % 2**63 if index else seed)
    return g


class Sampler:
    def __init__(self, vocab_size: int, ops: Ops | None = None):
        self.vocab_size = vocab_size
        self.ops = ops if ops is not None else Ops.torch()  # ops.sample: the fast path
        self._seed_rng = np.random.default_rng(0x5EED)  # the fast path's noise seeds

    @torch.inference_mode()
    def compile_kernels(self, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the fused kernel's variants (split rows for small batches, whole rows for
        large ones) at start-up rather than on the first request."""
        from kiln.kernels._triton import num_sms

        for batch in (1, num_sms(device) + 1):
            logits = torch.zeros(batch, self.vocab_size, dtype=dtype, device=device)
            ones = torch.ones(batch, device=device)
            self.ops.sample(logits, ones, torch.zeros(batch, dtype=torch.long, device=device))
        torch.cuda.synchronize(device)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits [B, V] (any float dtype) for seqs[i] -> one token each (waits for them)."""
        return self.sample(logits, seqs).result()

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], fast: bool | None = None
    ) -> PendingSample:
        """Queue the sampling of one token per row on the device; nothing waits. `fast`: the
        rows take the fused op (ops.sample), as the step plan decided (None: decide here,
        fast_path_ok)."""
        dev = logits.device
        if fast is None:
            fast = self.fast_path_ok(seqs)
        bitmask = None
        if any(s.grammar is not None for s in seqs):  # structured outputs: before anything
            bitmask = fill_bitmask([s.grammar for s in seqs], self.vocab_size, dev)
        if fast:  # (the fused op applies the bitmask in its one pass over the logits)
            temps, seeds = self.fast_path_inputs(seqs)
            b = len(seqs)
            host = np.zeros(b + (b + 1) // 2, dtype=np.int64)  # seeds, then float32 temps
            host[:b] = seeds
            host[b:].view(np.float32)[:b] = temps
            packed = to_device(host, torch.int64, dev)  # one copy for both
            temps_d = packed[b:].view(torch.float32)[:b]
            tokens, token_lp = self.ops.sample(logits, temps_d, packed[:b], bitmask=bitmask)
            return PendingSample(tokens, token_lp)
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        logits, raw, log_z = self.process(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = to_device(sampled_rows, torch.long, dev)
            chosen = [seqs[i] for i in sampled_rows]
            tokens[rows] = self.draw(self.probs(logits[rows], chosen), chosen)
        return self.pending(tokens, raw, log_z, seqs)

    def process(
        self, logits: torch.Tensor, seqs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits after penalties and the min_tokens mask [B, V] float32, the raw logits
        the logprobs are read from, their log-normalizer [B])."""
        logits = logits.float()
        raw = logits.clone() if self._needs_raw(seqs) else logits
        log_z = torch.logsumexp(raw, dim=-1)  # [B]
        if any(s.params.has_penalties for s in seqs):
            logits = self._apply_penalties(logits, seqs)
        self._mask_early_stop(logits, seqs)
        return logits, raw, log_z

    def pending(self, tokens, raw, log_z, seqs) -> PendingSample:
        """The chosen tokens with their logprobs (and top-N where asked) from the raw logits."""
        token_lp = raw.gather(1, tokens[:, None]).squeeze(1) - log_z
        return PendingSample(tokens, token_lp, self._top_logprobs(raw, log_z, tokens, seqs))

    def fast_path_inputs(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """The fused kernel's per-row temperatures (float32; 0: greedy) and fresh noise
        seeds (int64)."""
        temps = np.fromiter(map(_temperature, seqs), np.float64, len(seqs))
        temps[temps < GREEDY_BELOW] = 0.0
        return temps.astype(np.float32), self._seed_rng.integers(0, 2**62, len(seqs), np.int64)

    @staticmethod
    def fast_path_ok(seqs: list[Sequence]) -> bool:
        """Whether every row samples on the fused kernel's terms (temperature only: no top-k/
        top-p/min-p, penalties, min_tokens mask, per-request seed or top-N logprobs)."""
        for s in seqs:
            p = s.params
            if (
                not p.temperature_only
                or s.generator is not None
                or (p.min_tokens and s.num_output_tokens + s.num_pending < p.min_tokens)
            ):
                return False
        return True

    @staticmethod
    def _needs_raw(seqs: list[Sequence]) -> bool:
        """Whether logits get modified in place before logprobs are read off the raw ones."""
        return any(s.params.has_penalties or s.params.min_tokens for s in seqs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        b, v = logits.shape
        dev = logits.device
        counts = torch.zeros(b, v, device=dev)  # output-token counts
        seen = torch.zeros(b, v, dtype=torch.bool, device=dev)  # prompt or output
        for i, s in enumerate(seqs):
            if not s.params.has_penalties:
                continue
            out = torch.tensor(s.output_token_ids, dtype=torch.long, device=dev)
            counts[i].index_add_(0, out, torch.ones(len(out), device=dev))
            seen[i, torch.tensor(s.token_ids, dtype=torch.long, device=dev)] = True
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev)[:, None]
        pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)[:, None]
        freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * counts - pres * (counts > 0).float()

    @staticmethod
    def _mask_early_stop(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Before min_tokens are out, EOS and stop_token_ids cannot be drawn."""
        rows, cols = [], []
        for i, s in enumerate(seqs):
            if s.num_output_tokens + s.num_pending < s.params.min_tokens:
                stop = set(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    stop |= s.eos_token_ids
                rows += [i] * len(stop)
                cols += sorted(stop)
        if rows:
            index = to_device([rows, cols], torch.long, logits.device)
            logits[index[0], index[1]] = float("-inf")

    @staticmethod
    def probs(logits: torch.Tensor, seqs) -> torch.Tensor:
        """The distribution each (non-greedy) row samples from: softmax of logits / temperature
        inside its top_k / top_p / min_p; [B, V] float32."""
        dev = logits.device
        temp = to_device([s.params.temperature for s in seqs], torch.float32, dev)[:, None]
        logits = logits / temp
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = [s.params.min_p for s in seqs]
        if any(m > 0 for m in min_p):
            floor = (
                to_device(min_p, torch.float32, dev)[:, None] * probs.max(-1, keepdim=True).values
            )
            probs = probs.masked_fill(probs < floor, 0.0)
            probs /= probs.sum(-1, keepdim=True)
        return probs

    @staticmethod
    def draw(weights: torch.Tensor, seqs) -> torch.Tensor:
        """One token per row in proportion to its (not necessarily normalized) weights [B, V],
        as argmax(w / q), q ~ Exp(1); consumes weights."""
        # Exp(1) noise as -log(U): one draw for every unseeded row (5x faster than
        # exponential_() on CPU, the same on GPU).
        noise = torch.rand_like(weights).log_().neg_()
        for i, s in enumerate(seqs):
            if s.generator is not None:  # seeded rows redraw from their own generator
                noise[i].exponential_(generator=s.generator)
        return weights.div_(noise).argmax(dim=-1)

    @staticmethod
    def _top_logprobs(raw: torch.Tensor, log_z: torch.Tensor, tokens: torch.Tensor, seqs):
        """(rows, wanted, top values, top ids, chosen logprob) on the device, or None."""
        wanted = [s.params.logprobs for s in seqs]
        k = max((w for w in wanted if w is not None), default=None)
        if k is None:
            return None
        rows = [i for i, w in enumerate(wanted) if w is not None]
        index = to_device(rows, torch.long, raw.device)
        logprobs = raw[index] - log_z[index, None]
        vals, ids = logprobs.topk(k, dim=-1) if k else (None, None)
        chosen = logprobs.gather(1, tokens[index][:, None]).squeeze(1)
        return rows, wanted, vals, ids, chosen


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits [B, V] outside each row's top_k and top_p nucleus with -inf."""
    b, v = logits.shape
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = to_device([kk if kk > 0 else v for kk in top_k], torch.long, dev)[:, None]
    rank = torch.arange(v, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    p = to_device(top_p, torch.float32, dev)[:, None]
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > p  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
