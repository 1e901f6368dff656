"""`kiln profile --model DIR`: the torch profiler over engine steps.

A batch of random prompts is generated once to warm up (Triton compiles, CUDA graphs captured),
then again under `torch.profiler`: the prefill step(s) and `--steps` decode steps, each step a
`record_function` range. Writes a Chrome trace (chrome://tracing, Perfetto) and prints the ops
(CUDA kernels on a GPU, CPU ops on the CPU) that took the most time, by their self time.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import random
import statistics
import time
from pathlib import Path

from kiln.engine.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="profile engine steps with the torch profiler (Chrome trace + top kernels)",
        description="Run --batch requests of --prompt-len random tokens through the engine, "
        "profile their prefill and --steps decode steps, write a Chrome trace and print the "
        "kernels (ops) that took the most time.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--batch", type=int, default=8, help="requests run together")
    p.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens a request")
    p.add_argument("--top", type=int, default=20, help="ops printed")
    p.add_argument("--out", default="runs/profile", help="directory for trace.json")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed", action="store_true",
                   help="a served run's steady state: each profiled step also prefills one "
                   "new --prompt-len request (it ends after its first token), so every step "
                   "is a mixed step of --batch decodes and one prefill")  # fmt: skip
    EngineConfig.add_arguments(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    from kiln.errors import InputError

    for name in ("batch", "steps", "prompt_len", "top"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    result = profile_engine(
        args.model, args.batch, args.steps, args.prompt_len, Path(args.out), args.seed,
        mixed=args.mixed, dtype=args.dtype, device=args.device, **EngineConfig.args_from(args),
    )  # fmt: skip
    print(result["summary"])
    print(format_top_ops(result["ops"][: args.top], result["device_kind"]))
    print(f"Chrome trace: {result['trace']}")


def profile_engine(
    model: str, batch: int, steps: int, prompt_len: int, out: Path, seed: int = 0,
    mixed: bool = False, **engine_args,
) -> dict:  # fmt: skip
    """Profile `batch` requests' prefill and `steps` decode steps; the trace's path, a summary
    line, and the ops sorted by self time (dicts: name, calls, self_us, share). `mixed`:
    before each step after the batch's prefill, one more request of `prompt_len` tokens
    arrives and ends after its first token, as under a steady stream of requests (each such
    step is a mixed step; "graphs" counts the CUDA graphs the steps ran)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from kiln.engine.llm_engine import LLMEngine
    from kiln.engine.sampling_params import SamplingParams
    from kiln.errors import InputError

    engine = LLMEngine(model, **engine_args)
    if prompt_len + steps + 1 > engine.max_model_len:
        raise InputError(
            f"--prompt-len {prompt_len} + --steps {steps} exceeds the context "
            f"(max_model_len {engine.max_model_len})"
        )
    if batch + mixed > engine.config.max_num_seqs:
        raise InputError(
            f"--batch {batch}{' (+1 arriving: --mixed)' if mixed else ''} exceeds "
            f"--max-num-seqs {engine.config.max_num_seqs}"
        )
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    arriving = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def prompt() -> list[int]:  # fresh tokens each time: no prefix-cache hits
        return [rng.randrange(vocab) for _ in range(prompt_len)]

    def run(tag: str) -> tuple[list[str], int]:
        """Every step's kind ("decode" / "mixed" graph, "eager"), and how many steps ran
        decodes beside a prefill."""
        for i in range(batch):
            engine.add_request(f"{tag}-{i}", prompt_token_ids=prompt(), params=params)
        kinds, with_prefill = [], 0
        while engine.has_unfinished():
            n = len(kinds)
            if mixed and 1 <= n <= steps:  # after the batch's prefill step
                engine.add_request(f"{tag}-arrival-{n}", prompt_token_ids=prompt(),
                                   params=arriving)  # fmt: skip
            engine.runner.last_plan = None
            with record_function(f"engine_step_{n}"):
                engine.step()
            plan = engine.runner.last_plan
            kinds.append(plan.graph[0] if plan is not None and plan.graph is not None else "eager")
            if plan is not None:  # decodes beside a prefill
                decodes = sum(1 for q in plan.metadata.query_lens if q == 1)
                with_prefill += 0 < decodes < plan.metadata.num_seqs
        return kinds, with_prefill

    run("warmup")
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        kinds, with_prefill = run("profile")
        if cuda:
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    ops = top_ops(prof.key_averages(), cuda)
    per_kind = step_times(json.loads(trace.read_text()), kinds)
    num_steps, graphs = len(kinds), dict(collections.Counter(kinds))
    if with_prefill:
        graphs["with prefill"] = with_prefill
    tokens = batch * (steps + 1)
    summary = (
        f"{engine.device}: {batch} requests x ({prompt_len} prompt + {steps + 1} generated) "
        f"tokens{f', one {prompt_len}-token request arriving a step' if mixed else ''} in "
        f"{num_steps} engine steps ({', '.join(f'{v} {k}' for k, v in graphs.items())}), "
        f"{seconds:.3f} s under the profiler "
        f"({tokens / seconds:.0f} generated tokens/s, {seconds / num_steps * 1e3:.2f} ms/step)"
        f"\n{format_step_times(per_kind, cuda)}"
    )
    return {"trace": trace, "summary": summary, "ops": ops, "steps": num_steps,
            "graphs": graphs, "step_times": per_kind,
            "device_kind": "cuda" if cuda else "cpu"}  # fmt: skip


def step_times(trace: dict, kinds: list[str]) -> dict[str, dict]:
    """Per kind of step ("decode", "mixed", "eager"; kinds[i] is step i's): the steps, and
    the median ms of a step's CPU range and of the GPU kernels it launched, from a Chrome
    trace of `engine_step_<i>` ranges. A kernel belongs to the step whose range holds the
    launch (a cudaLaunchKernel / cudaGraphLaunch with the kernel's correlation id), not the
    one it ran under: with async scheduling a step's kernels run during the next step's
    host work. (The profiler's clock: CPU ranges carry its per-op overhead, kernels do not.)"""
    events = trace.get("traceEvents", [])
    steps = sorted(
        (e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith(
            "engine_step_") and e.get("cat") == "user_annotation"),
        key=lambda e: e["ts"],
    )  # fmt: skip
    starts = [e["ts"] for e in steps]
    launches = {  # correlation id -> launch time
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    gpu = [0.0] * len(steps)
    for e in events:
        if e.get("cat") != "kernel":
            continue
        at = launches.get(e.get("args", {}).get("correlation"), e["ts"])
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0 and at <= steps[i]["ts"] + steps[i]["dur"]:
            gpu[i] += e["dur"]
    table: dict[str, dict] = {}
    for i, step in enumerate(steps):
        kind = kinds[i] if i < len(kinds) else "?"
        row = table.setdefault(kind, {"steps": 0, "cpu": [], "gpu": []})
        row["steps"] += 1
        row["cpu"].append(step["dur"] / 1e3)
        row["gpu"].append(gpu[i] / 1e3)
    return {
        kind: {"steps": r["steps"], "cpu_ms": statistics.median(r["cpu"]),
               "gpu_ms": statistics.median(r["gpu"])}
        for kind, r in table.items()
    }  # fmt: skip


def format_step_times(per_kind: dict[str, dict], on_device: bool) -> str:
    """One line: each kind of step's count and median ms (CPU range, and GPU kernels)."""
    parts = []
    for kind, r in per_kind.items():
        gpu = f" / GPU kernels {r['gpu_ms']:.2f}" if on_device else ""
        parts.append(f"{kind} x{r['steps']}: CPU {r['cpu_ms']:.2f}{gpu}")
    return "median ms a step by kind: " + "; ".join(parts)


def top_ops(averages, on_device: bool) -> list[dict]:
    """Ops sorted by self time: device (kernel) time on a GPU, else CPU time; the profiler's
    own step ranges left out."""
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = [
        {"name": e.key, "calls": e.count, "self_us": float(getattr(e, key))}
        for e in averages
        if not e.key.startswith("engine_step_") and getattr(e, key) > 0
    ]
    rows.sort(key=lambda r: r["self_us"], reverse=True)
    total = sum(r["self_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["self_us"] / total
    return rows


def format_top_ops(ops: list[dict], device_kind: str) -> str:
    """A table of ops: self time, share of all ops' self time, calls, mean time per call."""
    clock = "GPU kernel" if device_kind == "cuda" else "CPU"
    width = max([len("op")] + [min(len(r["name"]), 70) for r in ops])
    lines = [
        f"top {len(ops)} ops by self {clock} time",
        f"{'op':<{width}}  {'self ms':>9}  {'share':>6}  {'calls':>6}  {'us/call':>9}",
    ]
    for r in ops:
        name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
        lines.append(
            f"{name:<{width}}  {r['self_us'] / 1e3:>9.3f}  {r['share']:>6.1%}  "
            f"{r['calls']:>6}  {r['self_us'] / r['calls']:>9.1f}"
        )
    return "\n".join(lines)
