"""`kiln bench ablate`: what each of the engine's optimizations buys, measured by switching it
off, one at a time, on fixed workloads.

Workloads (greedy, ignore_eos; sizes are flags, scaled down to fit a short context):
  latency     one request: a prompt of P tokens, N new tokens (end-to-end seconds)
  throughput  nano-vllm's offline workload (kiln.eval.workload.offline_workload), all at once
  prefix      R requests sharing a long prefix, each with its own short suffix, all at once
  memory      KV slots reserved but holding no token, paged blocks vs contiguous preallocation

Rows ("without X": everything else as in kiln's defaults):
  engine switches (EngineConfig): enable_prefix_caching, enable_chunked_prefill, use_cuda_graph,
    attention_backend="torch" (every Triton kernel replaced by its torch reference),
    gemv_max_batch=0 (cuBLAS for batch-1 decode), async_scheduling, fuse_weights;
    CUDA-only ones are reported n/a on CPU. When on in the run: a quantized checkpoint (row:
    quantization="none", dequantized at load), --speculative-config (row: off), an fp8 KV
    cache (row: the model's dtype).
  KV cache: a recompute-everything loop (every whole sequence through the model again for each
    new token) against the same plain loop with a contiguous KV cache (kiln.generate's), on a
    batch of same-length prompts (--kv-batch x --kv-prompt, --kv-tokens new), the same model; both
    loops are outside the engine, so only the cache differs.
  paged KV: contiguous preallocation reserves max_model_len slots a sequence up front, so the
    same KV pool holds pool_tokens // max_model_len sequences at once: the engine run with
    max_num_seqs capped at that (throughput), and the slots each scheme leaves empty (memory).
  continuous batching: static batching: the requests in arrival order in batches of
    max_num_seqs, each batch running until its longest request is done (every request's
    max_tokens raised to its batch's longest; only the requested tokens count as output).
Speedup = the variant's seconds / kiln's seconds on the same workload ("all on" is 1.00).
Every row also says whether its batch-1 greedy tokens equal kiln's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

ENGINE_VARIANTS = [  # (row, engine overrides, needs CUDA to mean anything)
    ("prefix caching", {"enable_prefix_caching": False}, False),
    ("chunked prefill", {"enable_chunked_prefill": False}, False),
    ("CUDA graphs", {"use_cuda_graph": False}, True),
    ("Triton kernels", {"attention_backend": "torch"}, True),
    ("fused GEMV", {"gemv_max_batch": 0}, True),
    ("async scheduling", {"async_scheduling": False}, True),
    ("fused weights", {"fuse_weights": False}, False),
]
BASELINES = ["KV cache", "paged KV", "continuous batching"]
OPTIONAL = ["quantization", "speculative decoding", "fp8 KV cache"]


def optional_variants(model: str, engine_args: dict) -> list[tuple[str, dict, bool]]:
    """Rows for what this run has on beyond the defaults: a quantized checkpoint kept packed
    (row: dequantized at load), speculative decoding (row: off), an fp8 KV cache (row: the
    model's dtype, where EngineConfig has kv_cache_dtype)."""
    from dataclasses import fields

    from kiln.engine.config import EngineConfig

    config = json.loads((Path(model) / "config.json").read_text())
    out = []
    if config.get("quantization_config") and engine_args.get("quantization") != "none":
        out.append(("quantization", {"quantization": "none"}, False))
    if engine_args.get("speculative_config"):
        out.append(("speculative decoding", {"speculative_config": None}, False))
    has_kv_dtype = any(f.name == "kv_cache_dtype" for f in fields(EngineConfig))
    if has_kv_dtype and engine_args.get("kv_cache_dtype") not in (None, "auto"):
        out.append(("fp8 KV cache", {"kv_cache_dtype": "auto"}, False))
    return out


WORKLOADS = ["latency", "throughput", "prefix"]


@dataclass
class Workloads:
    latency_prompt: int = 128
    latency_tokens: int = 128
    num_prompts: int = 128
    input_len: tuple[int, int] = (100, 512)
    output_len: tuple[int, int] = (100, 512)
    prefix_len: int = 1024
    prefix_requests: int = 64
    suffix_len: int = 32
    prefix_output: int = 32
    vocab: int = 1000
    kv_prompt: int = 512  # the KV-cache row: plain loops, a batch of same-length prompts
    kv_tokens: int = 256
    kv_batch: int = 8
    seed: int = 0
    repeat: int = 2  # each timing is the fastest of this many runs (other tokens each time)

    def fit(self, context: int) -> None:
        """Shrink every request to fit a model of `context` tokens."""
        from kiln.eval.workload import fit_lengths

        self.input_len, self.output_len = fit_lengths(self.input_len, self.output_len, context)
        (self.latency_prompt, _), (self.latency_tokens, _) = fit_lengths(
            (self.latency_prompt,) * 2, (self.latency_tokens,) * 2, context
        )
        (self.kv_prompt, _), (self.kv_tokens, _) = fit_lengths(
            (self.kv_prompt,) * 2, (self.kv_tokens,) * 2, context
        )
        longest = self.prefix_len + self.suffix_len + self.prefix_output
        if longest > context:
            f = context / longest
            self.prefix_len = max(1, int(self.prefix_len * f))
            self.suffix_len = max(1, int(self.suffix_len * f))
            self.prefix_output = max(1, context - self.prefix_len - self.suffix_len)

    def _shift(self, ids: list[int], rep: int) -> list[int]:
        """Repeat `rep` of a workload: the same lengths, other tokens (no prefix-cache hits
        from the repeats before it)."""
        return [(t + 7919 * rep) % self.vocab for t in ids]

    def kv(self, rep: int = 0) -> list[list[int]]:
        rng = random.Random(self.seed + 3)
        return [
            self._shift([rng.randrange(self.vocab) for _ in range(self.kv_prompt)], rep)
            for _ in range(self.kv_batch)
        ]

    def latency(self, rep: int = 0) -> list[int]:
        rng = random.Random(self.seed + 1)
        return self._shift([rng.randrange(self.vocab) for _ in range(self.latency_prompt)], rep)

    def throughput(self, rep: int = 0) -> list[tuple[list[int], int]]:
        from kiln.eval.workload import offline_workload

        work = offline_workload(
            self.num_prompts, self.input_len, self.output_len, self.vocab, self.seed
        )
        return [(self._shift(p, rep), n) for p, n in work]

    def prefix(self, rep: int = 0) -> tuple[list[int], list[list[int]]]:
        """The shared prefix, and the requests (prefix + own suffix)."""
        rng = random.Random(self.seed + 2)
        shared = [rng.randrange(self.vocab) for _ in range(self.prefix_len)]
        reqs = [
            shared + [rng.randrange(self.vocab) for _ in range(self.suffix_len)]
            for _ in range(self.prefix_requests)
        ]
        return self._shift(shared, rep), [self._shift(r, rep) for r in reqs]


def _params(max_tokens: int):
    from kiln.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _timed(fn):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_latency(llm, w: Workloads, rep: int = 0) -> tuple[float, list[int]]:
    params = _params(w.latency_tokens)
    secs, outs = _timed(
        lambda: llm.generate(prompt_token_ids=[w.latency(rep)], sampling_params=params)
    )
    return secs, outs[0].outputs[0].token_ids


def run_throughput(llm, work) -> tuple[float, int]:
    prompts = [p for p, _ in work]
    params = [_params(n) for _, n in work]
    secs, outs = _timed(lambda: llm.generate(prompt_token_ids=prompts, sampling_params=params))
    return secs, sum(len(o.outputs[0].token_ids) for o in outs)


def run_static(llm, work, batch: int) -> tuple[float, int]:
    """Static batching: batches of `batch` requests, each running to its longest request."""
    secs, useful = 0.0, 0
    for i in range(0, len(work), batch):
        chunk = work[i : i + batch]
        longest = max(n for _, n in chunk)
        s, _ = run_throughput(llm, [(p, longest) for p, _ in chunk])
        secs += s
        useful += sum(n for _, n in chunk)
    return secs, useful


def run_prefix(llm, w: Workloads, rep: int = 0) -> float:
    """A warm shared prefix (one request with it alone runs first, untimed: a system prompt
    already served), then the requests that share it, all at once."""
    shared, reqs = w.prefix(rep)
    llm.generate(prompt_token_ids=[shared], sampling_params=_params(1))
    secs, _ = _timed(
        lambda: llm.generate(prompt_token_ids=reqs, sampling_params=_params(w.prefix_output))
    )
    return secs


def best(w: Workloads, run) -> tuple[float, object]:
    """The fastest of w.repeat runs of run(rep) -> (seconds, output), with repeat 0's output."""
    runs = [run(rep) for rep in range(w.repeat)]
    return min(s for s, _ in runs), runs[0][1]


def loop_latency(model, w: Workloads, kv_cache: bool, rep: int = 0) -> tuple[float, list]:
    """Greedy tokens [kv_batch][kv_tokens] from a plain loop over the model: with a contiguous
    KV cache (kiln.generate's loop: kiln.model.attention.ContiguousKVCache, each step feeds the
    new token only) or without one (every whole sequence through the model again for each new
    token)."""
    import torch

    from kiln.model.attention import ContiguousKVCache

    device = next(model.parameters()).device
    ids = torch.tensor(w.kv(rep), device=device)
    b, t = ids.shape

    def recompute():
        seq = ids
        for _ in range(w.kv_tokens):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        return seq[:, t:].tolist()

    def cached():
        dtype = next(model.parameters()).dtype
        cache = ContiguousKVCache(model.config, b, t + w.kv_tokens, dtype, device)
        tokens, out = ids, []
        for _ in range(w.kv_tokens):
            positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=device)
            hidden = model.hidden_states(tokens, positions.expand(b, -1), cache)
            cache.advance(tokens.shape[1])
            tokens = model.compute_logits(hidden[:, -1]).argmax(-1, keepdim=True)
            out.append(tokens)
        return torch.cat(out, 1).tolist()

    with torch.inference_mode():
        return _timed(cached if kv_cache else recompute)


def memory_waste(work, block_size: int, max_model_len: int) -> dict:
    """Fraction of the KV slots reserved for the workload's sequences (at their full length)
    that hold no token: paged (whole blocks, allocated as the sequence grows) vs contiguous
    (max_model_len slots reserved per sequence up front)."""
    lengths = [len(p) + n for p, n in work]
    used = sum(lengths)
    paged = sum(math.ceil(n / block_size) * block_size for n in lengths)
    return {
        "paged_waste": 1 - used / paged,
        "contiguous_waste": 1 - used / (len(lengths) * max_model_len),
    }


def _free(*objs) -> None:
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ablation(
    model: str,
    w: Workloads,
    dtype=None,
    device=None,
    engine_args=None,
    only: list[str] | None = None,
    progress=True,
) -> dict:
    """{"rows": [{"row", "latency_s", "throughput_s", "prefix_s", "output_tokens",
    "greedy_same", "note"}], "memory": {...}, "device": ...}; rows[0] is kiln with everything on."""
    import torch
    from tqdm import tqdm

    from kiln.engine.llm import LLM
    from kiln.model.loader import load_model

    engine_args = dict(engine_args or {})
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    variants = ENGINE_VARIANTS + optional_variants(model, engine_args)
    names = only or [n for n, _, _ in variants] + BASELINES
    bar = tqdm(total=1 + len(names), desc="ablate", unit="row", disable=not progress)

    def engine(**over):
        return LLM(model, dtype=dtype, device=device, **{**engine_args, **over})

    def warm(llm):
        small = Workloads(num_prompts=8, input_len=(8, 64), output_len=(2, 8), vocab=w.vocab)
        run_throughput(llm, small.throughput(rep=99))
        run_latency(llm, w, rep=99)

    def measure(llm, row: str, note: str, workloads=WORKLOADS) -> dict:
        warm(llm)
        r = {"row": row, "note": note}
        if "latency" in workloads:
            r["latency_s"], toks = best(w, lambda rep: run_latency(llm, w, rep))
            r["greedy_same"] = toks == rows[0]["tokens"] if rows else True
            r["tokens"] = toks
        if "throughput" in workloads:
            r["throughput_s"], r["output_tokens"] = best(
                w, lambda rep: run_throughput(llm, w.throughput(rep))
            )
        if "prefix" in workloads:
            r["prefix_s"], _ = best(w, lambda rep: (run_prefix(llm, w, rep), None))
        return r

    rows: list[dict] = []
    llm = engine()
    w.fit(llm.engine.max_model_len)
    rows.append(measure(llm, "kiln (all on)", ""))
    cfg = llm.engine.config
    pool_tokens = llm.engine.core.block_manager.num_blocks * cfg.block_size
    max_len, block_size, max_seqs = llm.engine.max_model_len, cfg.block_size, cfg.max_num_seqs
    bar.update()
    if "continuous batching" in names:  # the same engine, fed in static batches
        secs, useful = best(w, lambda rep: run_static(llm, w.throughput(rep), max_seqs))
        static = {
            "row": "without continuous batching",
            "throughput_s": secs,
            "output_tokens": useful,
            "note": f"static batches of {max_seqs}, each run to its longest request",
        }
    _free(llm)
    llm = None

    present = {n for n, _, _ in variants}
    for name in names:
        if name in OPTIONAL and name not in present:
            rows.append({"row": f"without {name}", "note": "n/a: not on in this run"})
            bar.update()
    for name, over, needs_cuda in variants:
        if name not in names:
            continue
        if needs_cuda and not cuda:
            rows.append({"row": f"without {name}", "note": "n/a: needs CUDA"})
        else:
            llm = engine(**over)
            note = ", ".join(f"{k}={v}" for k, v in over.items())
            if over.get("attention_backend") == "torch":
                note += " (eager too: only the Triton ops are captured in CUDA graphs)"
            rows.append(measure(llm, f"without {name}", note))
            _free(llm)
            llm = None
        bar.update()
    if "continuous batching" in names:
        rows.append(static)
        bar.update()
    if "paged KV" in names:
        cap = max(1, pool_tokens // max_len)
        note = (
            f"max_num_seqs={min(cap, max_seqs)}: {pool_tokens} KV slots / max_model_len "
            f"{max_len}" + (" (no fewer than paged at this pool size)" if cap >= max_seqs else "")
        )
        llm = engine(max_num_seqs=min(cap, max_seqs))
        rows.append(measure(llm, "without paged KV", note, ["throughput"]))
        _free(llm)
        llm = None
        bar.update()
    if "KV cache" in names:
        net = load_model(model, dtype=dtype, device=device)
        short = replace(w, kv_tokens=2)
        loop_latency(net, short, kv_cache=True, rep=99)  # warm up both loops
        loop_latency(net, short, kv_cache=False, rep=99)
        cached, cached_toks = best(w, lambda rep: loop_latency(net, w, True, rep))
        recompute, toks = best(w, lambda rep: loop_latency(net, w, False, rep))
        rows.append(
            {
                "row": "without KV cache",
                "latency_speedup": recompute / cached,
                "greedy_same": toks == cached_toks,
                "note": f"{w.kv_batch} x ({w.kv_prompt} prompt + {w.kv_tokens} new): "
                f"recompute-everything loop {recompute:.3f} s / contiguous-KV loop "
                f"{cached:.3f} s",
            }
        )
        _free(net)
        bar.update()
    bar.close()
    for r in rows:
        r.pop("tokens", None)
        for k in WORKLOADS:
            if f"{k}_s" in r and f"{k}_speedup" not in r:
                r[f"{k}_speedup"] = r[f"{k}_s"] / rows[0][f"{k}_s"]
    memory = {
        **memory_waste(w.throughput(), block_size, max_len),
        "pool_tokens": pool_tokens,
        "max_model_len": max_len,
        "block_size": block_size,
        "paged_max_seqs": max_seqs,
        "contiguous_max_seqs": max(1, pool_tokens // max_len),
    }
    dev = torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else "cpu"
    return {
        "rows": rows,
        "memory": memory,
        "device": dev,
        "workloads": {
            "latency": f"1 request, {w.latency_prompt} prompt + {w.latency_tokens} new tokens",
            "throughput": f"{w.num_prompts} requests, input U{list(w.input_len)}, "
            f"output U{list(w.output_len)}",
            "prefix": f"{w.prefix_requests} requests, {w.prefix_len}-token shared prefix + "
            f"{w.suffix_len} own, {w.prefix_output} new",
        },
    }


def table(result: dict) -> str:
    """Markdown: seconds of kiln with everything on, then each row's slowdown (x) per
    workload."""
    head = "| | latency | offline throughput | shared prefix | greedy same | how |"
    lines = [
        f"device: {result['device']}",
        *(f"- {k}: {v}" for k, v in result["workloads"].items()),
        "",
        head,
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["rows"]):
        cells = []
        for k in WORKLOADS:
            if i == 0:
                cells.append(f"{r[f'{k}_s']:.3f} s")
            elif f"{k}_speedup" in r:
                cells.append(f"{r[f'{k}_speedup']:.2f}x")
            else:
                cells.append("-")
        same = "-" if "greedy_same" not in r else ("yes" if r["greedy_same"] else "no")
        lines.append(f"| {r['row']} | {' | '.join(cells)} | {same} | {r['note']} |")
    m = result["memory"]
    lines += [
        "",
        "speedup = the row's seconds / kiln's (how much the optimization buys)",
        "",
        f"KV memory reserved but empty on the throughput workload: paged "
        f"{m['paged_waste']:.1%} (block {m['block_size']}), contiguous "
        f"{m['contiguous_waste']:.1%} (max_model_len {m['max_model_len']}); a pool of "
        f"{m['pool_tokens']} tokens runs {m['contiguous_max_seqs']} contiguous sequences "
        f"at once (paged: up to max_num_seqs {m['paged_max_seqs']})",
    ]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"][1:] if any(f"{k}_speedup" in r for k in WORKLOADS)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    width = 0.8 / len(WORKLOADS)
    for j, k in enumerate(WORKLOADS):
        xs = [i + j * width for i, r in enumerate(rows) if f"{k}_speedup" in r]
        ys = [r[f"{k}_speedup"] for r in rows if f"{k}_speedup" in r]
        ax.bar(xs, ys, width, label=k)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("slowdown without it (x)")
    ax.set_xticks(
        [i + width for i in range(len(rows))],
        [r["row"].removeprefix("without ") for r in rows],
        rotation=30,
        ha="right",
    )
    ax.set_title(f"kiln: what each optimization buys ({result['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kiln.engine.config import EngineConfig

    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="rows to run: "
        + ", ".join([n for n, _, _ in ENGINE_VARIANTS] + BASELINES + OPTIONAL)
        + " (the last three only when on: a quantized checkpoint, --speculative-config, "
        "an fp8 --kv-cache-dtype)",
    )
    d = Workloads()
    p.add_argument("--latency-prompt", type=int, default=d.latency_prompt)
    p.add_argument("--latency-tokens", type=int, default=d.latency_tokens)
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--input-len", type=int, nargs=2, default=list(d.input_len))
    p.add_argument("--output-len", type=int, nargs=2, default=list(d.output_len))
    p.add_argument("--prefix-len", type=int, default=d.prefix_len)
    p.add_argument("--prefix-requests", type=int, default=d.prefix_requests)
    p.add_argument("--suffix-len", type=int, default=d.suffix_len)
    p.add_argument("--prefix-output", type=int, default=d.prefix_output)
    p.add_argument("--kv-prompt", type=int, default=d.kv_prompt, help="KV-cache row")
    p.add_argument("--kv-tokens", type=int, default=d.kv_tokens, help="KV-cache row")
    p.add_argument("--kv-batch", type=int, default=d.kv_batch, help="KV-cache row")
    p.add_argument("--repeat", type=int, default=d.repeat, help="timings: fastest of N runs")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--plot", default=None, metavar="FILE", help="bar chart (PNG)")
    EngineConfig.add_arguments(p)


def main(args: argparse.Namespace) -> None:
    from kiln.config import ModelConfig
    from kiln.engine.config import EngineConfig
    from kiln.errors import InputError

    known = [n for n, _, _ in ENGINE_VARIANTS] + BASELINES + OPTIONAL
    for n in args.only or ():
        if n not in known:
            raise InputError(f"--only: unknown row {n!r} (one of {', '.join(known)})")
    if args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            raise InputError(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
    vocab = ModelConfig.from_dir(Path(args.model)).vocab_size
    w = Workloads(
        args.latency_prompt,
        args.latency_tokens,
        args.num_prompts,
        tuple(args.input_len),
        tuple(args.output_len),
        args.prefix_len,
        args.prefix_requests,
        args.suffix_len,
        args.prefix_output,
        vocab,
        args.kv_prompt,
        args.kv_tokens,
        args.kv_batch,
        repeat=args.repeat,
    )
    result = run_ablation(
        args.model, w, args.dtype, args.device, EngineConfig.args_from(args), args.only
    )
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
