"""`kiln bench serve`: Poisson arrivals against a running server, vLLM's serving metrics.

Each request streams /v1/completions with a random token-id prompt of --input-len tokens and
--output-len generated tokens (ignore_eos). Reported: request throughput, output tokens/s, and
TTFT (time to first token), TPOT (time per output token after the first), ITL (the gaps between
streamed chunks) and end-to-end latency at mean/p50/p95/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import random
import time
from dataclasses import dataclass, field

from kiln.errors import InputError


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    sent_at: float = 0.0  # time.time() when the request went out (comparable across clients)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests/s of the Poisson arrivals (inf: all at once); several run in turn",
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-token-id", type=int, default=1000, help="prompt ids in [10, this)")
    p.add_argument("--warmup-requests", type=int, default=16, help="concurrent, untimed")
    p.add_argument(
        "--num-clients", type=int, default=1,
        help="client processes sharing the load (one Python client parses ~10k streamed "
        "chunks/s: use several past that)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")


def main(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "input_len", "output_len", "warmup_requests", "num_clients"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if any(not r > 0 for r in args.request_rate):
        raise InputError(f"--request-rate must be > 0, got {args.request_rate}")
    results = []
    for i, rate in enumerate(args.request_rate):  # fresh prompts each run: no prefix hits across
        results.append(run_benchmark(args, rate, args.seed + i))
        print(format_summary(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def random_prompts(rng: random.Random, n: int, length: int, max_token_id: int) -> list[list[int]]:
    return [[rng.randrange(10, max_token_id) for _ in range(length)] for _ in range(n)]


def run_benchmark(args: argparse.Namespace, rate: float, seed: int) -> dict:
    """One run at `rate` requests/s: a warm-up burst (so kernel compilation is not timed), then
    --num-prompts Poisson arrivals, sent by --num-clients processes (each a share of the
    prompts at its share of the rate: together still a Poisson process at `rate`)."""
    rng = random.Random(seed)
    prompts = random_prompts(rng, args.num_prompts, args.input_len, args.max_token_id)
    warmup = random_prompts(rng, args.warmup_requests, args.input_len, args.max_token_id)
    model = asyncio.run(_warm_up(args, warmup))
    k = max(1, min(getattr(args, "num_clients", 1), len(prompts)))
    args = argparse.Namespace(**{n: v for n, v in vars(args).items() if not callable(v)})
    shares = [(args, model, prompts[i::k], rate / k, seed * 1000 + i) for i in range(k)]
    if k == 1:
        runs = [_client_process(*shares[0])]
    else:  # each client imports and opens its session, then all start at once
        ctx = multiprocessing.get_context("spawn")
        ready, out = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_client_main, args=(*share, ready, out)) for share in shares]
        for proc in procs:
            proc.start()
        runs = [out.get() for _ in procs]
        for proc in procs:
            proc.join()
    done = [r for results, _, _ in runs for r in results]
    duration = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    return summarize(done, duration, rate, args)


async def _warm_up(args: argparse.Namespace, warmup: list[list[int]]) -> str:
    """The served model's name, after the warm-up requests have all succeeded."""
    async with _client(args) as client:
        model = args.model or (await _get_json(client, "/v1/models"))["data"][0]["id"]
        for warm in await asyncio.gather(
            *(one_request(client, model, p, min(args.output_len, 16)) for p in warmup)
        ):
            if not warm.ok:
                raise InputError(f"warm-up request failed: {warm.error}")
    return model


def _client(args: argparse.Namespace):
    """The HTTP client: aiohttp when it is installed (its C parser reads several times more
    streamed chunks a second than httpx, which otherwise limits what one client measures),
    else httpx."""
    try:
        import aiohttp
    except ImportError:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(None, connect=30.0)
        return httpx.AsyncClient(base_url=args.base_url, headers=_headers(args.api_key),
                                 limits=limits, timeout=timeout)  # fmt: skip
    return aiohttp.ClientSession(
        base_url=args.base_url, headers=_headers(args.api_key),
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(connect=30.0),
    )  # fmt: skip


async def _get_json(client, path: str):
    if not hasattr(client, "ws_connect"):  # httpx
        return (await client.get(path)).json()
    async with client.get(path) as resp:  # aiohttp
        return await resp.json()


@contextlib.asynccontextmanager
async def _stream_lines(client, path: str, body: dict):
    """(status, error body, async iterator of the response's lines) for either client."""
    if hasattr(client, "ws_connect"):  # aiohttp
        async with client.post(path, json=body) as resp:
            error = b"" if resp.status == 200 else await resp.read()

            async def lines():
                async for raw in resp.content:
                    yield raw.decode().rstrip("\r\n")

            yield resp.status, error, lines()
    else:
        async with client.stream("POST", path, json=body) as resp:
            error = b"" if resp.status_code == 200 else await resp.aread()
            yield resp.status_code, error, resp.aiter_lines()


def _client_process(args, model, prompts, rate, seed, ready=None):
    """One client's share: its requests' results, when it started and when it finished
    (time.time())."""
    return asyncio.run(_send(args, model, prompts, rate, random.Random(seed), ready))


def _client_main(args, model, prompts, rate, seed, ready, out) -> None:
    """A client process: its share's results, through `out`."""
    out.put(_client_process(args, model, prompts, rate, seed, ready))


async def _send(args, model, prompts, rate, rng, ready=None):
    async with _client(args) as client:
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def limited(prompt: list[int]) -> RequestResult:
            async with gate:
                return await one_request(client, model, prompt, args.output_len)

        if ready is not None:
            ready.wait()  # every client process is up: start together
        start = time.time()
        tasks = []
        # Arrival times are drawn ahead and slept to, not slept between: a loop busy reading
        # streams would otherwise stretch every gap and offer less than `rate`.
        due = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(rate):
                due += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
        done = await asyncio.gather(*tasks)
    return done, start, time.time()


async def one_request(client, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    """Stream one completion, timing every chunk that carries tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False)
    start = last = time.perf_counter()
    result.sent_at = time.time()
    try:
        async with _stream_lines(client, "/v1/completions", body) as (status, error, lines):
            if status != 200:
                result.error = f"HTTP {status}: {error[:200]!r}"
                return result
            async for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk["choices"]:
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a benchmark reports failures, it does not stop at one
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


def _percentiles(values: list[float]) -> dict[str, float]:
    """mean/p50/p95/p99 in milliseconds."""
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p95": math.nan, "p99": math.nan}
    v = sorted(values)

    def q(p: float) -> float:  # linear interpolation, as numpy.percentile
        x = (len(v) - 1) * p
        lo, hi = math.floor(x), math.ceil(x)
        return v[lo] + (v[hi] - v[lo]) * (x - lo)

    return {
        "mean": 1e3 * sum(v) / len(v),
        "p50": 1e3 * q(0.5),
        "p95": 1e3 * q(0.95),
        "p99": 1e3 * q(0.99),
    }


def steady_throughput(ok: list[RequestResult]) -> float:
    """Requests finished per second in steady state: the middle 80% of the completions over
    the time they took (the ramp and the drain tail left out). A server that keeps up finishes
    requests as fast as they arrive, so this reads as the offered rate (up to Poisson noise);
    one that falls behind finishes them at its own pace. NaN when all arrive at once."""
    if len(ok) < 10:
        return math.nan
    sent = sorted(r.sent_at for r in ok)
    if sent[-len(sent) // 10 - 1] - sent[len(sent) // 10] < 1e-3:  # all at once: no steady state
        return math.nan
    done = sorted(r.sent_at + r.e2e for r in ok)
    lo, hi = len(done) // 10, len(done) - len(done) // 10 - 1
    return (hi - lo) / (done[hi] - done[lo])


def offered_throughput(ok: list[RequestResult]) -> float:
    """Requests sent per second over the middle 80% of the sends (what the clients managed
    to offer)."""
    if len(ok) < 10:
        return math.nan
    sent = sorted(r.sent_at for r in ok)
    lo, hi = len(sent) // 10, len(sent) - len(sent) // 10 - 1
    return (hi - lo) / (sent[hi] - sent[lo]) if sent[hi] > sent[lo] else math.nan


def summarize(results: list[RequestResult], duration: float, rate: float, args) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "steady_request_throughput": steady_throughput(ok),
        "offered_request_throughput": offered_throughput(ok),
        "request_rate": rate,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (output + prompt) / duration,
        "ttft_ms": _percentiles([r.ttft for r in ok]),
        "tpot_ms": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": _percentiles([r.e2e for r in ok]),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"==== request rate {s['request_rate']} req/s: {s['completed']}/{s['num_prompts']} "
        f"completed in {s['duration_s']:.1f} s (input {s['input_len']}, output "
        f"{s['output_len']} tokens)",
        f"  request throughput   {s['request_throughput']:10.2f} req/s",
        f"  output throughput    {s['output_throughput']:10.1f} tok/s",
        f"  total throughput     {s['total_token_throughput']:10.1f} tok/s",
        f"  {'(ms)':<8}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for key in ("ttft", "tpot", "itl", "e2e"):
        p = s[f"{key}_ms"]
        lines.append(
            f"  {key.upper():<8}{p['mean']:10.2f}{p['p50']:10.2f}{p['p95']:10.2f}{p['p99']:10.2f}"
        )
    if s["failed"]:
        lines.append(f"  failed: {s['failed']} (first: {s['first_error']})")
    return "\n".join(lines)
