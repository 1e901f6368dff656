"""The offline benchmark workload (nano-vllm's): random-token requests of random lengths, and one
timed kiln.LLM run over them. Shared by `kiln bench offline`, `kiln bench ablate` and the
benchmarks/ scripts."""

from __future__ import annotations

import random
import time


def offline_workload(
    num_requests=256, input_len=(100, 1024), output_len=(100, 1024), vocab_size=32000, seed=0
):
    """nano-vllm's workload: (prompt ids, max_tokens) pairs from one seeded RNG."""
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        n_in = rng.randint(*input_len)
        prompt = [rng.randrange(vocab_size) for _ in range(n_in)]
        work.append((prompt, rng.randint(*output_len)))
    return work


def fit_lengths(
    input_len: tuple[int, int], output_len: tuple[int, int], max_model_len: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Both length ranges scaled by one factor so the longest request fits max_model_len tokens
    (prompt and output keep their proportions); unchanged if it already fits."""
    longest = input_len[1] + output_len[1]
    if longest <= max_model_len:
        return input_len, output_len

    def scale(lengths: tuple[int, int]) -> tuple[int, int]:
        # Floors keep the longest request within max_model_len; at least one token each side.
        lo, hi = (max(1, n * max_model_len // longest) for n in lengths)
        return lo, hi

    return scale(input_len), scale(output_len)


def run_offline(llm, workload, temperature: float = 0.6) -> dict:
    """Generate the workload in one batch; output tokens per second and totals."""
    from kiln.engine.sampling_params import SamplingParams

    prompts = [p for p, _ in workload]
    params = [
        SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for _, n in workload
    ]
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "requests": len(workload),
        "input_tokens": sum(len(p) for p in prompts),
        "output_tokens": out_tokens,
        "seconds": elapsed,
        "output_tok_s": out_tokens / elapsed,
    }
