"""Served vs offline throughput on one workload, and a sweep of Poisson request rates.

One run: `kiln.LLM` offline on N random-token prompts (input/output lengths fixed, greedy,
ignore_eos), then `kiln serve` on the same model measured by `kiln bench serve` at rate inf on
the same prompts, then (optionally) at each --rates value. Each engine runs in a process of
its own, one after the other. With --baseline-src, the offline and served runs are repeated
with another source tree (e.g. a worktree of an older commit) for a before/after table; with
--variant, the served runs are repeated with other `kiln serve` arguments (one offline run).
Writes results.json, a markdown table and sweep.png (throughput and TTFT/TPOT p50/p99 against
the offered rate) under --out.

    # GPU: the Qwen3-0.6B-shaped random bf16 model
    PYTHONPATH=src python3 benchmarks/bench_serve_vs_offline.py --random-qwen3 /tmp/q3 \
        --num-prompts 1000 --rates 100 150 200 250 --out /tmp/sweep
    # one vs two API processes in front of the engine core, same offline run
    ... --variant 'api1=' --variant 'api2=--api-server-count 2'
    # CPU: a tiny random model, before (an older tree) and after
    PYTHONPATH=src python3 benchmarks/bench_serve_vs_offline.py --tiny /tmp/tiny \
        --num-prompts 200 --input-len 32 --output-len 64 --baseline-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

OFFLINE = """
import json, random, sys, time
from kiln.engine import LLM, SamplingParams
spec = json.loads(sys.argv[1])
llm = LLM(spec["model"], **spec["engine_args"])
rng = random.Random(spec["seed"])
def prompts(n):
    return [[rng.randrange(10, spec["max_token_id"]) for _ in range(spec["input_len"])]
            for _ in range(n)]
warm = prompts(spec["warmup"])
work = prompts(spec["num_prompts"])
params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
llm.generate(prompt_token_ids=warm, sampling_params=params)
runs = []
for _ in range(spec["repeat"]):
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=work, sampling_params=params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    runs.append(dict(output_throughput=tokens / elapsed, request_throughput=len(outs) / elapsed,
                     duration_s=elapsed, tokens=tokens, window=[start, start + elapsed]))
median = sorted(runs, key=lambda r: r["output_throughput"])[len(runs) // 2]
print("RESULT " + json.dumps({**median, "runs": [r["output_throughput"] for r in runs]}))
"""


def build_tiny(out: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a synthetic byte-level tokenizer."""
    if not (out / "tokenizer.json").is_file():
        import torch
        from bench_serve import save_synthetic_tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, eos_token_id=4095)  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(out)
        save_synthetic_tokenizer(out, cfg.vocab_size)
    return out


def env_for(src: Path, trace: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if trace is not None:  # the engine writes a step trace there (kiln.engine.core.StepTrace)
        env["KILN_STEP_TRACE"] = str(trace)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(src), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def run_offline(src: Path, model: Path, args, engine_args: dict, label: str) -> dict:
    spec = dict(model=str(model), engine_args=engine_args, seed=args.seed,
                max_token_id=args.max_token_id, input_len=args.input_len,
                output_len=args.output_len, num_prompts=args.num_prompts,
                warmup=args.warmup, repeat=args.repeat)  # fmt: skip
    trace = args.out / "trace" / label if args.trace else None
    out = subprocess.run([sys.executable, "-c", OFFLINE, json.dumps(spec)],
                         env=env_for(src, trace), capture_output=True, text=True,
                         check=False)  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"offline run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def triton_cache_entries() -> set[str] | None:
    """Kernels in TRITON_CACHE_DIR (when set), by directory: more after serving = compiled at
    request time."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    return set(os.listdir(cache)) if cache and os.path.isdir(cache) else None


def kernel_names(entries: set[str]) -> list[str]:
    """The kernel names (from each cache entry's metadata json) of some cache entries."""
    names = []
    for entry in sorted(entries):
        for meta in Path(os.environ["TRITON_CACHE_DIR"], entry).glob("*.json"):
            if not meta.name.startswith("__grp__"):
                names.append(json.loads(meta.read_text()).get("name", meta.stem))
    return names


def listen_drops() -> int | None:
    """TcpExt ListenDrops so far (Linux /proc/net/netstat): connections the kernel dropped
    because a listen queue was full (the client's TCP retries them 1 s later)."""
    try:
        lines = [x.split() for x in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names[0] == "TcpExt:" and "ListenDrops" in names:
            return int(values[names.index("ListenDrops")])
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def server_pids(pid: int) -> dict[str, int]:
    """The server's processes by role: the API process (or the supervisor of several, then
    each API worker too) and the engine core."""
    pids = {"api": pid}
    workers = 0
    for kid in _children(pid):
        cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        if b"core_client" in cmdline:
            pids["core"] = kid
        elif b"spawn_main" in cmdline:  # an API worker (not the resource tracker)
            workers += 1
            pids[f"api{workers}"] = kid
    return pids


def api_server_count(serve_args: list[str]) -> int:
    """The --api-server-count among kiln serve's arguments (1 when absent)."""
    for i, a in enumerate(serve_args):
        if a == "--api-server-count":
            return int(serve_args[i + 1])
        if a.startswith("--api-server-count="):
            return int(a.partition("=")[2])
    return 1


def run_served(
    src: Path, model: Path, args, serve_args: list[str], rates: list[float], label: str
) -> list:
    """Start kiln serve from `src`; kiln bench serve (this tree's client) at each rate."""
    from bench_serve import free_port, stop_server, wait_healthy

    from kiln.serve.bench import run_benchmark

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # None refused: with --api-server-count N each API process admits 1/N of --max-queue, and
    # the kernel spreads connections over them unevenly (3,000 prompts over 4 processes refused
    # some at a queue of exactly the prompt count), so every process may queue them all.
    queue = (args.num_prompts + args.warmup) * api_server_count(serve_args)
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-queue", str(queue), "--log-level", "warning", *serve_args]  # fmt: skip
    log = open(args.out / f"serve_{label}.log", "w")
    trace = args.out / "trace" / f"served-{label}" if args.trace else None
    proc = subprocess.Popen(cmd, env=env_for(src, trace), stdout=log, stderr=subprocess.STDOUT)
    results = []
    try:
        wait_healthy(url, proc, timeout=900)
        compiled_at_start = triton_cache_entries()
        bench = argparse.Namespace(base_url=url, api_key=None, model=None,
                                   num_prompts=args.num_prompts, input_len=args.input_len,
                                   output_len=args.output_len, max_token_id=args.max_token_id,
                                   warmup_requests=args.warmup, max_concurrency=None,
                                   num_clients=1)  # fmt: skip
        pids = server_pids(proc.pid)
        runs = [(rate, args.clients) for rate in rates]
        if args.clients > 1:  # what one client process alone measures, for comparison
            runs.append((math.inf, 1))
        for rate, clients in runs:
            before = {k: cpu_seconds(v) for k, v in pids.items()}
            drops = listen_drops()
            client_before, start = time.process_time(), time.perf_counter()
            bench.num_clients = clients
            s = run_benchmark(bench, rate, args.seed)
            wall = time.perf_counter() - start
            s["cpu_share"] = {k: (cpu_seconds(v) - before[k]) / wall for k, v in pids.items()}
            s["cpu_share"]["client"] = (time.process_time() - client_before) / wall
            s["clients"] = clients
            s["window"] = [start, start + wall]
            after = listen_drops()
            s["listen_drops"] = None if drops is None or after is None else after - drops
            print(f"  served rate {rate} ({clients} client): {s['request_throughput']:.1f} req/s, "
                  f"{s['output_throughput']:.0f} tok/s, TTFT p99 {s['ttft_ms']['p99']:.0f} ms, "
                  f"failed {s['failed']} {s['first_error'][:80]}; listen drops "
                  f"{s['listen_drops']}; CPU busy "
                  + ", ".join(f"{k} {v:.0%}" for k, v in s["cpu_share"].items()),
                  flush=True)  # fmt: skip
            results.append(s)
        if compiled_at_start is not None:
            late = triton_cache_entries() - compiled_at_start
            print(f"  Triton kernels compiled after start-up: {len(late)} "
                  f"{kernel_names(late)}", flush=True)  # fmt: skip
    finally:
        stop_server(proc)
        log.close()
    return results


def trace_table(report: dict, out: Path) -> str:
    """Each run's engine steps (from the --trace step traces) as one markdown table."""
    from step_trace_report import HEADER, format_row, load, summarize

    lines = [HEADER]
    for name, r in report["trees"].items():
        steps = load(out / "trace" / f"offline-{report['srcs'][name]}")
        lines.append(format_row(f"{name} offline", summarize(steps, *r["offline"]["window"])))
        steps = load(out / "trace" / f"served-{name.replace(' ', '-')}")
        for s in r["served"]:
            label = f"{name} served rate {s['request_rate']} x{s['clients']}"
            lines.append(format_row(label, summarize(steps, *s["window"])))
    return "\n".join(lines)


def median_run(runs: list[dict]) -> dict:
    """The run with the median output throughput (the upper one of an even count)."""
    return sorted(runs, key=lambda s: s["output_throughput"])[len(runs) // 2]


def sustained(s: dict, slack: float = 0.05, ttft_p99_ms: float = 1000.0) -> bool:
    """Steady-state request throughput (arrival ramp and drain tail left out) within `slack`
    of the offered rate, and TTFT p99 under the bound."""
    rate = s.get("steady_request_throughput", math.nan)
    rate = s["request_throughput"] if math.isnan(rate) else rate
    ok = s["failed"] == 0 and rate >= (1 - slack) * s["request_rate"]
    return ok and s["ttft_ms"]["p99"] < ttft_p99_ms


def plot(sweep: list[dict], offline_rps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [s["request_rate"] for s in sweep]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].plot(
        rates,
        [s["request_throughput"] for s in sweep],
        "o-",
        label="served (all, drain tail included)",
    )
    ax[0].plot(rates, [s["steady_request_throughput"] for s in sweep], "s-",
               label="served, steady (middle 80% of completions)")  # fmt: skip
    ax[0].plot(rates, rates, ":", color="gray", label="offered")
    ax[0].axhline(offline_rps, ls="--", color="k", label="offline engine")
    ax[0].set(xlabel="offered rate (req/s)", ylabel="req/s", title="request throughput")
    for i, key in ((1, "ttft_ms"), (2, "tpot_ms")):
        for q in ("p50", "p99"):
            ax[i].plot(rates, [s[key][q] for s in sweep], "o-", label=q)
        ax[i].set(xlabel="offered rate (req/s)", ylabel="ms", title=key[:4].upper(), yscale="log")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path)
    src.add_argument("--random-qwen3", type=Path, metavar="DIR")
    src.add_argument("--tiny", type=Path, metavar="DIR")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-token-id", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--rates", type=float, nargs="*", default=[])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--baseline-src", type=Path, default=None, help="a 'before' source tree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=1,
                   help="client processes sending the load (then also one rate-inf run from "
                   "a single client, for comparison)")  # fmt: skip
    p.add_argument("--serve-arg", action="append", default=[], help="passed to kiln serve")
    p.add_argument("--repeat", type=int, default=1,
                   help="offline and rate-inf served runs each repeated this many times; the "
                   "table quotes the median (runs on one GPU vary by several percent)")  # fmt: skip
    p.add_argument(
        "--trace",
        action="store_true",
        help="record engine step traces and print where each run spent its steps",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="serve this tree again with these extra kiln serve arguments (repeatable; the "
        "offline run is shared), e.g. --variant 'api2=--api-server-count 2'",
    )
    p.add_argument("--out", type=Path, default=Path("out/serve_vs_offline"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.random_qwen3:
        from bench_serve import build_random_qwen3

        model = build_random_qwen3(args.random_qwen3)
    else:
        model = build_tiny(args.tiny) if args.tiny else args.model
    engine_args = {"max_num_seqs": args.max_num_seqs}
    serve_args = ["--max-num-seqs", str(args.max_num_seqs), *args.serve_arg]
    if args.tiny:
        engine_args["device"] = "cpu"
    trees = [("after", SRC)] + ([("before", args.baseline_src)] if args.baseline_src else [])
    variants = [v.partition("=")[::2] for v in args.variant] or [("", "")]
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "trees": {},
                    "srcs": {}}  # fmt: skip
    for name, tree in trees:
        print(f"== {name} ({tree})", flush=True)
        off = run_offline(tree, model, args, engine_args, f"offline-{name}")
        print(f"  offline: {off['output_throughput']:.0f} tok/s, "
              f"{off['request_throughput']:.1f} req/s", flush=True)  # fmt: skip
        for vname, vargs in variants:
            label = f"{name} {vname}".strip()
            print(f"== served: {label} {vargs}", flush=True)
            rates = [math.inf] * args.repeat + (args.rates if name == "after" else [])
            served = run_served(tree, model, args, serve_args + shlex.split(vargs), rates,
                                label.replace(" ", "-"))  # fmt: skip
            report["trees"][label] = {"offline": off, "served": served}
            report["srcs"][label] = name
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| tree | offline tok/s | served tok/s (rate inf) | served / offline | "
        "offline req/s | served req/s | TTFT p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["trees"].items():
        off, inf = r["offline"], median_run(r["served"][: args.repeat])
        lines.append(f"| {name} | {off['output_throughput']:,.0f} | "
                     f"{inf['output_throughput']:,.0f} | "
                     f"{inf['output_throughput'] / off['output_throughput']:.1%} | "
                     f"{off['request_throughput']:.1f} | {inf['request_throughput']:.1f} | "
                     f"{inf['ttft_ms']['p50']:.0f} / {inf['ttft_ms']['p99']:.0f} |")  # fmt: skip
        if args.repeat > 1:
            every = ", ".join(f"{s['output_throughput']:,.0f}" for s in r["served"][: args.repeat])
            offs = ", ".join(f"{x:,.0f}" for x in off["runs"])
            lines.append(f"| ({name}: offline runs {offs}; served runs {every}) | | | | | | |")
    first = next(iter(report["trees"]))
    after = report["trees"][first]
    sweep = [s for s in after["served"][args.repeat :] if s["clients"] == args.clients]
    if sweep:
        offline_rps = after["offline"]["request_throughput"]
        lines += ["", "| offered req/s (sent) | served req/s (steady) | out tok/s | "
                  "TTFT p50 / p99 ms | TPOT p50 / p99 ms | sustained |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for s in sweep:
            ttft, tpot = s["ttft_ms"], s["tpot_ms"]
            ok = "yes" if sustained(s) else "no"
            lines.append(f"| {s['request_rate']:.0f} ({s['offered_request_throughput']:.1f}) | "
                         f"{s['request_throughput']:.1f} "
                         f"({s['steady_request_throughput']:.1f}) | "
                         f"{s['output_throughput']:,.0f} | {ttft['p50']:.0f} / {ttft['p99']:.0f}"
                         f" | {tpot['p50']:.1f} / {tpot['p99']:.1f} | {ok} |")  # fmt: skip
        best = max((s["request_rate"] for s in sweep if sustained(s)), default=0.0)
        lines.append(f"\nhighest sustained rate: {best:.0f} req/s = {best / offline_rps:.0%} "
                     f"of offline {offline_rps:.1f} req/s")  # fmt: skip
        plot(sweep, offline_rps, args.out / "sweep.png")
    if args.trace:
        lines += ["", trace_table(report, args.out)]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
