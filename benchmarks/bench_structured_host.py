"""Structured outputs' host cost a decode step, on the CPU: what the engine does for a batch of
requests held to bench_structured.py's JSON schema between queuing the forward and queuing the
sampling (each grammar accepts its request's last token, then the batch's bitmask is filled),
with that bench's 151,936-token vocabulary. The GPU runs the forward meanwhile: the step costs
extra only where this host work outlasts it.

No model: each request's next token is drawn uniformly from the tokens its mask allows (near
what a random model at temperature 1 samples; the draw is not timed). The mask's application,
a GPU kernel in the engine, is timed apart on the CPU reference path. `last 32` averages the
steps deepest into the string (a cost that grows with the characters matched shows there).
Each run repeats the same draws; a step's time is its fastest of --repeat (a shared machine).

    PYTHONPATH=src python benchmarks/bench_structured_host.py     # a few minutes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_structured import schema, train_tokenizer

from kiln.engine.structured import (
    GrammarCompiler,
    GrammarState,
    StructuredOutputsParams,
    accept_tokens,
    apply_bitmask,
    fill_bitmask,
    tokenizer_info,
)

VOCAB = 151936  # Qwen3's


def run(compiled, batch: int, tokens: int, seed: int) -> dict[str, list[float]]:
    """Per step seconds of each part, for `batch` requests decoding `tokens` tokens."""
    states = [GrammarState(compiled) for _ in range(batch)]
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {"accept": [], "fill": [], "apply": []}
    sampled = None
    for _ in range(tokens):
        t0 = time.perf_counter()
        if sampled is not None:
            accept_tokens(states, sampled)
        t1 = time.perf_counter()
        bitmask = fill_bitmask(states, VOCAB, torch.device("cpu"))
        t2 = time.perf_counter()
        logits = torch.zeros(batch, VOCAB)
        t3 = time.perf_counter()
        apply_bitmask(logits, bitmask)
        t4 = time.perf_counter()
        noise = torch.rand(batch, VOCAB, generator=gen)  # uniform over the allowed tokens
        sampled = (logits + noise).argmax(dim=-1).tolist()
        times["accept"].append(t1 - t0)
        times["fill"].append(t2 - t1)
        times["apply"].append(t4 - t3)
    assert not any(s.failed or s.matcher.is_terminated() for s in states)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(Path(tmp), VOCAB)
        info = tokenizer_info(tmp, VOCAB, {1})
    t0 = time.perf_counter()
    spec = StructuredOutputsParams(json=schema(args.tokens))
    compiled = GrammarCompiler(info).submit(spec).result()
    compile_ms = 1e3 * (time.perf_counter() - t0)
    print(f"{VOCAB}-token vocabulary, {args.tokens} tokens a request, JSON schema compile "
          f"{compile_ms:.1f} ms; per step means (ms)\n")  # fmt: skip
    print(f"{'batch':>5} {'accept':>8} {'fill':>8} {'host':>8} {'us/req':>8} "
          f"{'host last 32':>12} {'apply (ref)':>11}")  # fmt: skip
    for b in args.batches:
        runs = [run(compiled, b, args.tokens, seed=b) for _ in range(args.repeat)]
        t = {k: [min(r[k][i] for r in runs) for i in range(args.tokens)] for k in runs[0]}
        host = [a + f for a, f in zip(t["accept"], t["fill"])]
        mean = lambda xs: 1e3 * sum(xs) / len(xs)  # noqa: E731
        print(f"{b:>5} {mean(t['accept']):>8.3f} {mean(t['fill']):>8.3f} {mean(host):>8.3f} "
              f"{1e3 * mean(host) / b:>8.1f} {mean(host[-32:]):>12.3f} "
              f"{mean(t['apply']):>11.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
