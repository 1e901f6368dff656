"""Structured outputs: grammars that constrain what a request may generate (xgrammar).

A request's `SamplingParams.structured_outputs` (vLLM's `StructuredOutputsParams`: a JSON
schema, any JSON object, a regex, a list of choices or an EBNF grammar) is compiled once per
distinct spec against the engine's tokenizer, off the step loop (a thread; the request waits,
the others run). Each of its sequences then holds a `GrammarState` (an xgrammar matcher that
accepts every sampled token); before sampling, the sampler turns the batch's states into a
token bitmask and masks the logits outside the CUDA graphs. Masks are filled on the host while
the GPU runs the step's forward. When the grammar is complete only EOS remains allowed; one
that cannot finish within max_tokens ends by length like any other request.

xgrammar over llguidance: benchmarks/bench_grammar_libs.py (notes/BENCHMARKS.md) measured a
per-token mask 5x faster on a 32k vocabulary (3 us vs 16 us; the step's host cost grows with
the batch), for a compile of a few ms that is cached per schema anyway.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import InputError
from kiln.kernels.sample import unpack_bitmask

MAX_WHITESPACE = 8  # whitespace characters a JSON grammar allows between tokens (no loops)
CACHE_SIZE = 256  # compiled grammars kept, by spec


@dataclass
class StructuredOutputsParams:
    """What a request's output must match (vLLM's names): exactly one of `json` (a JSON
    schema, dict or string), `json_object` (any JSON object), `regex`, `choice` (one of these
    strings) or `grammar` (xgrammar's EBNF)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False  # JSON: no whitespace beyond json.dumps's separators

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InputError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar (got {', '.join(given) or 'none'})", "structured_outputs"
            )  # fmt: skip
        if isinstance(self.json, dict):  # canonical text: the cache key
            self.json = json.dumps(self.json)
        if self.choice is not None:
            ok = self.choice and all(isinstance(c, str) and c for c in self.choice)
            if not ok:
                raise InputError("choice must be a non-empty list of non-empty strings",
                                 "structured_outputs.choice")  # fmt: skip

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k)
                    is not None) if not self.json_object else "json_object"  # fmt: skip

    def key(self) -> tuple:
        """What identifies the compiled grammar."""
        spec = getattr(self, self.kind)
        return self.kind, tuple(spec) if isinstance(spec, list) else spec, self.any_whitespace

    @property
    def any_whitespace(self) -> bool:
        return not self.disable_any_whitespace


def grammar_of(p: StructuredOutputsParams):
    """The spec as an xgrammar Grammar (no tokenizer needed: the cheap validity check);
    InputError naming the field when it is invalid or unsupported."""
    import xgrammar as xgr

    param = f"structured_outputs.{p.kind}"
    try:
        if p.kind == "json":
            return _json_grammar(p.json, p)
        if p.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', **_json_format(p))
        if p.kind == "regex":
            return xgr.Grammar.from_regex(p.regex)
        if p.kind == "choice":
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in p.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alts}")
        return xgr.Grammar.from_ebnf(p.grammar)
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with the reason
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"invalid or unsupported {p.kind}: {why}", param) from None


# xgrammar (0.2.9) spells a length-bounded string (minLength / maxLength) as a repetition of a
# rule of this character class, which admits raw control characters (strict JSON parsers refuse
# them); kiln narrows the rule to the characters its plain and pattern strings allow.
_LENGTH_CHARS = r"_characters ::= (([^\"\\\r\n]))"
_STRICT_CHARS = r"_characters ::= (([^\0-\x1f\"\\]))"


def _json_grammar(schema: str, p: StructuredOutputsParams):
    """xgrammar's grammar of a JSON schema, with no raw control character in its length-bounded
    strings.

    Not the equivalent pattern (^.{min,max}$): xgrammar matches a pattern string with a regex
    whose mask and accept cost grow with the characters matched (about 1.5 ms a token by the
    1,000th character on a 152k vocabulary), where a repeated character class costs the same
    few microseconds at every position.
    """
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, **_json_format(p))
    ebnf = str(grammar)
    strict = ebnf.replace(_LENGTH_CHARS, _STRICT_CHARS)
    return grammar if strict == ebnf else xgr.Grammar.from_ebnf(strict)


def _json_format(p: StructuredOutputsParams) -> dict[str, Any]:
    if p.any_whitespace:
        return dict(any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
    return dict(any_whitespace=False)


def check_structured_outputs(p: StructuredOutputsParams | None) -> None:
    """InputError (naming the field) unless the spec compiles to a grammar (a spec seen
    before is not checked again)."""
    if p is not None:
        _check_key(p.key())


@lru_cache(maxsize=CACHE_SIZE)  # (an InputError is not cached: a bad spec is checked anew)
def _check_key(key: tuple) -> None:
    kind, spec, any_whitespace = key
    value = True if kind == "json_object" else list(spec) if kind == "choice" else spec
    grammar_of(StructuredOutputsParams(**{kind: value}, disable_any_whitespace=not any_whitespace))


def tokenizer_info(model_dir: str | Path, vocab_size: int, eos_token_ids):
    """xgrammar's view of the model's tokenizer: the tokenizer's ids, rounded up to a whole
    bitmask word (at most the model's vocab_size).

    Not padded to vocab_size: xgrammar counts each padded id as a special token, and its
    accept_token scans them all (bench_structured.py's BPE fills 46,848 of 151,936 ids: 20 us
    a token); the model's ids past the tokenizer's are never allowed (GrammarState.fill)."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    from kiln.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer)
    ids = max([*hf.get_vocab().values(), *eos_token_ids]) + 1
    return xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=min(vocab_size, -(-ids // 32) * 32), stop_token_ids=sorted(eos_token_ids)
    )


class GrammarCompiler:
    """Compiles specs on a background thread, each distinct spec once (an LRU of futures:
    requests with the same schema share one compile, in flight or done)."""

    def __init__(self, info, threads: int = 1):
        import xgrammar as xgr

        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="kiln-grammar")
        self.cache: OrderedDict[tuple, Future] = OrderedDict()
        self.lock = threading.Lock()

    def submit(self, p: StructuredOutputsParams) -> Future:
        """A future of the CompiledGrammar (its exception: InputError naming the field)."""
        key = p.key()
        with self.lock:
            fut = self.cache.get(key)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self.cache[key] = self.pool.submit(self._compile, p)
            self.cache.move_to_end(key)
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return fut

    def _compile(self, p: StructuredOutputsParams):
        return self.compiler.compile_grammar(grammar_of(p))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One sequence's place in its grammar: the tokens it has accepted."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)
        self.words = (compiled.tokenizer_info.vocab_size + 31) // 32  # of a bitmask row it fills
        self.num_accepted = 0  # output tokens fed to the matcher
        self.failed = False  # a token outside the grammar came: only EOS is allowed now

    def fork(self) -> GrammarState:
        """A fresh state for a sibling (forks happen before any output token)."""
        assert self.num_accepted == 0
        return GrammarState(self.compiled)

    def accept(self, token: int) -> None:
        """Advance by the sampled token (a terminated grammar ignores what follows it: a
        token computed in flight after EOS is dropped by the engine anyway). A token the
        grammar refuses comes only from a dead end, a mask that allowed no token (the
        vocabulary cannot spell what the grammar needs): the sequence is then ended."""
        if not self.matcher.is_terminated() and not self.failed:
            self.failed = not self.matcher.accept_token(token)
        self.num_accepted += 1

    def catch_up(self, output_token_ids: list[int]) -> None:
        """Accept the output tokens not accepted yet."""
        for t in output_token_ids[self.num_accepted :]:
            self.accept(t)

    def live(self) -> bool:
        """Whether the matcher decides the next token (not terminated, not failed)."""
        return not self.failed and not self.matcher.is_terminated()

    def fill(self, row: np.ndarray) -> None:
        """Write the tokens allowed next into a bitmask row (int32 [ceil(V / 32)], every word)."""
        if self.matcher.is_terminated():
            row[:] = -1  # nothing to constrain: this row's token is dropped
        elif self.failed:
            row[:] = 0
            for t in self.compiled.tokenizer_info.stop_token_ids:
                row.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
        else:
            self.matcher.fill_next_token_bitmask(row[: self.words])
            row[self.words :] = 0  # the model's ids past the tokenizer's


# From this many live rows a step's masks are filled by xgrammar's BatchGrammarMatcher, on its
# threads (half the host's cores), instead of one after another on the engine's thread.
BATCH_FILL_MIN_ROWS = 4


def accept_tokens(states: list[GrammarState], tokens: list[int]) -> None:
    """states[i].accept(tokens[i]) for every i: from BATCH_FILL_MIN_ROWS live states in one
    call to xgrammar's BatchGrammarMatcher (its threads, the GIL released), as fill_bitmask."""
    live = [i for i, state in enumerate(states) if state.live()]
    if len(live) < BATCH_FILL_MIN_ROWS:
        for state, token in zip(states, tokens):
            state.accept(token)
        return
    matchers = [states[i].matcher for i in live]
    accepted = _batch_matcher().batch_accept_token(matchers, [tokens[i] for i in live])
    for i, ok in zip(live, accepted):
        states[i].failed = not ok
    for state in states:
        state.num_accepted += 1


@functools.cache
def _batch_matcher():
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher("auto")


def fill_bitmask(
    states: list[GrammarState | None], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[B, ceil(V / 32)] int32 on `device`: bit v of row i set when token v is allowed; rows
    without a grammar allow everything. Filled on the host (pinned memory for a GPU: the
    copy queues behind the step's forward, which the filling overlaps); the live rows of a
    batch in parallel (BATCH_FILL_MIN_ROWS)."""
    words = (vocab_size + 31) // 32
    pin = device.type == "cuda"
    bitmask = torch.empty((len(states), words), dtype=torch.int32, pin_memory=pin)
    rows = bitmask.numpy()  # the same memory (numpy's row views cost a tenth of torch's)
    live: dict[int, list[int]] = {}  # a tokenizer's words -> the rows its matchers fill
    for i, state in enumerate(states):
        if state is None:
            rows[i] = -1
        elif state.live():
            live.setdefault(state.words, []).append(i)
        else:
            state.fill(rows[i])
    for width, idx in live.items():
        if len(idx) < BATCH_FILL_MIN_ROWS:
            for i in idx:
                states[i].fill(rows[i])
            continue
        # xgrammar writes rows of exactly `width` words, contiguous (a strided view of the
        # wider bitmask comes out wrong, silently): fill a block of its own, then copy it in.
        block = np.empty((len(idx), width), dtype=np.int32)
        _batch_matcher().batch_fill_next_token_bitmask([states[i].matcher for i in idx], block)
        rows[idx, :width] = block
        rows[idx, width:] = 0  # the model's ids past the tokenizer's
    return bitmask.to(device, non_blocking=True) if pin else bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits [B, V] of tokens whose bit is clear in bitmask [B, ceil(V / 32)] to -inf:
    on a GPU xgrammar's kernel (one pass, no unpacked mask), else `apply_bitmask_ref`."""
    if logits.is_cuda:
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask)
    else:
        apply_bitmask_ref(logits, bitmask)


def apply_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """apply_bitmask in plain torch (the reference)."""
    logits.masked_fill_(~unpack_bitmask(bitmask, logits.shape[1]), float("-inf"))
