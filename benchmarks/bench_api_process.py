"""The API process's CPU per request and per streamed token, against a fake engine core.

The real app (`kiln.serve.server.run_server`: uvicorn, FastAPI, AsyncLLM, the output processor
and detokenizer) runs in a process of its own, attached to a fake engine core that speaks the
core's ZeroMQ protocol: every `--step-ms` it emits one token for each of up to `--max-num-seqs`
live requests (random ids, finishing at max_tokens), so no model compute shares the machine.
A lean aiohttp client (reads each stream whole, parses only its last chunk) sends bursts of
`--num-prompts` streamed /v1/completions at once; the API process's CPU seconds (user + sys,
/proc) over each burst are divided by its requests and tokens:

- per request: a burst with max_tokens 1 (one token each: parse, validate, admit, send to the
  core, one output, the SSE chunks, usage and [DONE]);
- per token: (burst at --output-len  -  burst at max_tokens 1) / (requests * (output_len - 1)).

The least CPU of --repeat bursts each (other work on shared cores only adds to it). Also
printed: the ramp (first to last request the core saw in a burst) and the burst's wall time.
With --baseline-src (or --tree LABEL=SRC, repeatable) the API process is also run from other
source trees (e.g. `git archive` of an older commit), alternating burst by burst.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/bench_api_process.py \
        --tiny /tmp/tiny --num-prompts 1000 --input-len 256 --output-len 64 --repeat 7 \
        [--baseline-src DIR] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


# ---------------------------------------------------------------------- the fake engine core


def fake_core(spec: dict) -> None:
    """Speaks the engine core's protocol (kiln.engine.core_client) to one API process."""
    import msgspec
    import zmq

    from kiln.engine.core_client import (
        POLL_MS,
        Abort,
        AddRequest,
        CoreInput,
        CoreOutputs,
        Embed,
        FinishSeqs,
        Shutdown,
    )
    from kiln.engine.outputs import SeqDelta

    in_addr, out_addr = spec["addrs"]
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)
    outbox.connect(out_addr)
    decode = msgspec.msgpack.Decoder(CoreInput).decode
    encode = msgspec.msgpack.Encoder().encode
    stats = dict.fromkeys(
        ["kv_pool_tokens", "kv_blocks_per_seq_mean", "kv_blocks_per_seq_max",
         "kv_evicted_blocks_total", "num_running", "num_waiting", "kv_cache_usage",
         "num_free_blocks", "num_total_blocks", "prefix_cache_hits", "prefix_cache_queries",
         "prompt_tokens_total", "generation_tokens_total"], 0,
    )  # fmt: skip
    ready = dict(max_model_len=spec["max_model_len"], vocab_size=spec["vocab_size"])
    outbox.send(encode(CoreOutputs(ready=ready, stats=stats)))
    rng = random.Random(0)
    hi = spec["vocab_size"] - 2
    step_s = spec["step_ms"] / 1000
    max_seqs = spec["max_num_seqs"]
    waiting: list[tuple[str, int, int]] = []  # (request_id, index, max_tokens)
    live: dict[tuple[str, int], int] = {}  # (request_id, index) -> tokens left
    adds: list[float] = []
    next_step = time.perf_counter()
    log = open(spec["log"], "a")
    while True:
        busy = bool(live or waiting)
        wait_ms = max(0.0, next_step - time.perf_counter()) * 1000 if busy else POLL_MS
        if inbox.poll(wait_ms):
            while inbox.poll(0):
                msg = decode(inbox.recv())
                if isinstance(msg, AddRequest):
                    adds.append(time.time())
                    for i in range(msg.params.n):
                        waiting.append((msg.request_id, i, msg.params.max_tokens))
                elif isinstance(msg, Abort):
                    gone = set(msg.request_ids)
                    waiting = [w for w in waiting if w[0] not in gone]
                    live = {k: v for k, v in live.items() if k[0] not in gone}
                elif isinstance(msg, FinishSeqs):
                    for rid, index, _ in msg.stops:
                        live.pop((rid, index), None)
                elif isinstance(msg, Embed):
                    outbox.send(encode(CoreOutputs(errors=[(msg.request_id, "no embeddings")])))
                elif isinstance(msg, Shutdown):
                    return
            continue
        if not busy:
            if adds:  # a burst is over: when its requests reached the core
                log.write(json.dumps(dict(adds=len(adds), first=adds[0], last=adds[-1],
                                          end=time.time())) + "\n")  # fmt: skip
                log.flush()
                adds = []
            continue
        while waiting and len(live) < max_seqs:
            rid, index, max_tokens = waiting.pop(0)
            live[(rid, index)] = max_tokens
        deltas = []
        for key, left in list(live.items()):
            left -= 1
            done = left <= 0
            deltas.append(SeqDelta(key[0], key[1], [rng.randrange(10, hi)],
                                   finish_reason="length" if done else None))  # fmt: skip
            if done:
                del live[key]
            else:
                live[key] = left
        outbox.send(encode(CoreOutputs(deltas=deltas)), copy=False)
        next_step = max(next_step + step_s, time.perf_counter())


# ---------------------------------------------------------------------- the API process


def api_process(spec: dict) -> None:
    """The real app over an AsyncLLM attached to the fake core."""
    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.server import run_server

    attach = dict(addrs=spec["addrs"], index=0, core_pid=spec["core_pid"])
    engine = AsyncLLM(spec["model"], attach=attach, max_num_seqs=spec["max_num_seqs"])
    run_server(
        engine, served_model_name="tiny", api_key=None, max_queue=spec["max_queue"],
        log_level="warning", drain_timeout=5.0, max_connections=8192, http="auto",
        loop="auto", public_metrics=True, stream_send_timeout=60.0, host="127.0.0.1",
        port=spec["port"], backlog=4096,
    )  # fmt: skip


# ---------------------------------------------------------------------- the bench


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def burst(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[int, int]:
    """All prompts streamed at once; (requests that got every token, tokens streamed)."""
    import aiohttp

    async def one(session, prompt) -> int:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        async with session.post("/v1/completions", json=body) as resp:
            data = await resp.read()
        if resp.status != 200:
            return 0
        events = data.split(b"\n\n")
        assert events[-2] == b"data: [DONE]", events[-3:]
        return json.loads(events[-3][6:])["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(connect=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        got = await asyncio.gather(*(one(session, p) for p in prompts))
    return sum(g == max_tokens for g in got), sum(got)


class Server:
    """The fake core and the API process (from `src`), started and warmed up."""

    def __init__(self, src: Path, args, label: str):
        from bench_serve import free_port, wait_healthy

        from kiln.engine.core_client import core_addresses

        self.label, self.args = label, args
        self.tmp = Path(tempfile.mkdtemp(prefix="kiln-apibench-"))
        addrs = core_addresses(1)[0]
        cfg = json.loads((args.tiny / "config.json").read_text())
        core_spec = dict(
            addrs=addrs,
            max_model_len=cfg["max_position_embeddings"],
            vocab_size=cfg["vocab_size"],
            step_ms=args.step_ms,
            max_num_seqs=args.max_num_seqs,
            log=str(self.tmp / "core.jsonl"),
        )
        # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # the API process binds the sockets; the core connects (ZeroMQ waits for the bind)
        api_spec = dict(addrs=addrs, model=str(args.tiny), max_num_seqs=args.max_num_seqs,
                        max_queue=args.num_prompts * 2, port=port)  # fmt: skip
        me = str(Path(__file__).resolve())
        self.core = subprocess.Popen([sys.executable, me, "--role", "core", json.dumps(core_spec)],
                                     env=dict(env, PYTHONPATH=f"{SRC}:{HERE}"))  # fmt: skip
        api_spec["core_pid"] = self.core.pid
        self.api = subprocess.Popen([sys.executable, me, "--role", "api", json.dumps(api_spec)],
                                    env=dict(env, PYTHONPATH=f"{src}:{HERE}"),
                                    stdout=open(self.tmp / "api.log", "w"),
                                    stderr=subprocess.STDOUT)  # fmt: skip
        self.spy = None
        self.rng = random.Random(args.seed)
        wait_healthy(self.url, self.api, timeout=120)
        asyncio.run(burst(self.url, self.prompts(64), 8))  # warm-up
        if args.py_spy is not None:  # collapsed stacks of the API process over the bursts
            args.py_spy.mkdir(parents=True, exist_ok=True)
            self.spy = subprocess.Popen(["py-spy", "record", "--pid", str(self.api.pid),
                                         "--rate", "250", "--format", "raw", "--nonblocking",
                                         "-o", str(args.py_spy / f"{label}.txt")])  # fmt: skip
            time.sleep(1.0)

    def prompts(self, n: int) -> list[list[int]]:
        length = self.args.input_len
        return [[self.rng.randrange(10, 1000) for _ in range(length)] for _ in range(n)]

    def run(self, rep: int, max_tokens: int) -> dict:
        """One burst: its numbers."""
        work = self.prompts(self.args.num_prompts)
        log = self.tmp / "core.jsonl"
        time.sleep(0.3)
        lines = log.read_text().count("\n")
        cpu0, t0 = cpu_seconds(self.api.pid), time.perf_counter()
        ok, tokens = asyncio.run(burst(self.url, work, max_tokens))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(self.api.pid) - cpu0
        time.sleep(0.5)  # the core writes its burst's line once idle
        spans = [json.loads(line) for line in log.read_text().splitlines()[lines:]]
        ramp_ms = (max(x["last"] for x in spans) - min(x["first"] for x in spans)) * 1e3
        row = dict(label=self.label, rep=rep, max_tokens=max_tokens, ok=ok, tokens=tokens)
        print(f"  {self.label} rep {rep} max_tokens {max_tokens:4d}: ok {ok}/{len(work)}, "
              f"{tokens} tokens, wall {wall:.2f} s, API CPU {cpu:.2f} s "
              f"({cpu / len(work) * 1e6:.0f} us/request), ramp {ramp_ms:.0f} ms",
              flush=True)  # fmt: skip
        return dict(row, wall_s=wall, api_cpu_s=cpu, ramp_ms=ramp_ms)

    def stop(self) -> None:
        if self.spy is not None:
            self.spy.send_signal(2)
            self.spy.wait(timeout=60)
        self.api.terminate()
        try:
            self.api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.api.kill()
        self.core.kill()
        self.core.wait()


def summarize(rows: list[dict], n: int, output_len: int) -> dict:
    # the least CPU of the repeats: what other work on the machine adds (cache, scheduling)
    # only ever adds to it, so the minimum is the steadiest estimate on shared cores
    one = [r["api_cpu_s"] for r in rows if r["max_tokens"] == 1]
    many = [r["api_cpu_s"] for r in rows if r["max_tokens"] == output_len]
    per_req = min(one) / n
    per_tok = (min(many) - min(one)) / (n * (output_len - 1))
    ramp = statistics.median(r["ramp_ms"] or 0 for r in rows if r["max_tokens"] == 1)
    walls = [r["wall_s"] for r in rows if r["max_tokens"] == output_len]
    return dict(us_per_request=per_req * 1e6, us_per_token=per_tok * 1e6, ramp_ms=ramp,
                stream_wall_s=statistics.median(walls), runs_1=one, runs_n=many)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["bench", "core", "api"], default="bench")
    p.add_argument("spec", nargs="?")
    p.add_argument("--tiny", type=Path, default=Path("/tmp/tiny"), help="model dir (built "
                   "as bench_serve_vs_offline's tiny model when missing)")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=8.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-src", type=Path, default=None)
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=SRC",
                   help="another source tree to run alternately (repeatable)")  # fmt: skip
    p.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy the API process over the bursts (DIR/<tree>.txt, collapsed)",
    )
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = p.parse_args()
    if args.role == "core":
        return fake_core(json.loads(args.spec))
    if args.role == "api":
        return api_process(json.loads(args.spec))
    from bench_serve_vs_offline import build_tiny

    build_tiny(args.tiny)
    trees = [("this", SRC)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    trees += [(t.split("=", 1)[0], Path(t.split("=", 1)[1])) for t in args.tree]
    rows: dict[str, list] = {label: [] for label, _ in trees}
    servers = []
    try:
        for label, src in trees:
            print(f"{label}: {src}", flush=True)
            servers.append(Server(src, args, label))
        for rep in range(args.repeat):  # the trees alternate: a busy spell hits both
            for server in servers:
                for max_tokens in (1, args.output_len):
                    rows[server.label].append(server.run(rep, max_tokens))
    finally:
        for server in servers:
            server.stop()
    results = {label: summarize(r, args.num_prompts, args.output_len) for label, r in rows.items()}
    print(f"\n{args.num_prompts} streamed requests at once, {args.input_len}-token prompts, "
          f"{args.output_len} tokens, fake core {args.step_ms} ms steps; least API CPU "
          f"of {args.repeat} bursts each (ramp, wall: medians)")  # fmt: skip
    print("| tree | API CPU us/request | API CPU us/token | ramp ms | burst wall s |")
    print("|---|---|---|---|---|")
    for label, s in results.items():
        print(f"| {label} | {s['us_per_request']:.0f} | {s['us_per_token']:.1f} | "
              f"{s['ramp_ms']:.0f} | {s['stream_wall_s']:.2f} |")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps(dict(results=results, rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
