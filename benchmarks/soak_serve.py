"""Soak test: minutes of mixed traffic against `kiln serve` on a tiny model (not CI).

Traffic (closed loop, --concurrency workers): 80% ordinary requests (streamed or not, random
n / max_tokens / stop / logprobs), 10% stalled readers (a streaming request on a raw socket
that is never read, held open for a while), 5% clients that disconnect mid-stream, 5%
malformed requests. Checked: no 5xx, every KV block free at the end, and the RSS of the API
and engine-core processes over time (table + rss.png). Loopback only; bounded by --minutes.

    PYTHONPATH=src python3 benchmarks/soak_serve.py --minutes 10 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent

MALFORMED = [
    b'{"prompt": "x",',
    b'{"prompt": [1, -1], "max_tokens": 2}',
    b'{"prompt": "x", "temperature": "hot"}',
    b'{"prompt": "x", "n": 100000}',
    b'{"messages": "not a list"}',
    b'{"prompt": "x", "stop": ["' + b'", "'.join([b"s"] * 50) + b'"]}',
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def ordinary(client: httpx.AsyncClient, rng: random.Random, stats: Counter) -> None:
    body = {"prompt": [rng.randrange(10, 1000) for _ in range(rng.randint(4, 64))],
            "max_tokens": rng.randint(1, 48), "n": rng.choice([1, 1, 1, 2, 4]),
            "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5}  # fmt: skip
    if rng.random() < 0.2:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.2:
        body["stop"] = ["ab"]
    if rng.random() < 0.5:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            stats[f"http {r.status_code}"] += 1
            async for line in r.aiter_lines():
                if '"error"' in line and '"server_error"' in line:
                    stats["5xx in stream"] += 1
    else:
        r = await client.post("/v1/completions", json=body)
        stats[f"http {r.status_code}"] += 1


async def disconnect(client: httpx.AsyncClient, rng: random.Random, stats: Counter) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 64, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        stats[f"http {r.status_code}"] += 1
        n = rng.randint(1, 5)
        async for _ in r.aiter_lines():
            n -= 1
            if n == 0:
                break  # leaving the block closes the connection mid-stream
    stats["disconnects"] += 1


async def malformed(client: httpx.AsyncClient, rng: random.Random, stats: Counter) -> None:
    route = rng.choice(["/v1/completions", "/v1/chat/completions"])
    r = await client.post(route, content=rng.choice(MALFORMED),
                          headers={"Content-Type": "application/json"})  # fmt: skip
    stats[f"http {r.status_code}"] += 1
    stats["malformed"] += 1


async def stalled(port: int, rng: random.Random, stats: Counter) -> None:
    """A streaming request whose answer is never read; the socket is held, then dropped."""
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 120, "n": 4, "temperature": 1.0,
                       "ignore_eos": True, "stream": True}).encode()  # fmt: skip
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    await writer.drain()
    await asyncio.sleep(rng.uniform(5, 30))
    writer.close()
    stats["stalled readers"] += 1


async def soak(args, port: int, pids: dict[str, int]) -> tuple[Counter, list]:
    stats: Counter = Counter()
    samples = []
    deadline = time.monotonic() + args.minutes * 60
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                 timeout=httpx.Timeout(120.0)) as client:  # fmt: skip

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                x = rng.random()
                try:
                    if x < 0.10:
                        await stalled(port, rng, stats)
                    elif x < 0.15:
                        await disconnect(client, rng, stats)
                    elif x < 0.20:
                        await malformed(client, rng, stats)
                    else:
                        await ordinary(client, rng, stats)
                except httpx.HTTPError as e:
                    stats[f"client error {type(e).__name__}"] += 1

        async def sampler() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - start,
                                *(rss_mb(p) for p in pids.values())))  # fmt: skip
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *(worker(i) for i in range(args.concurrency)))
    return stats, samples


def main() -> None:
    sys.path.insert(0, str(HERE))
    from bench_serve import free_port, wait_healthy
    from bench_serve_vs_offline import _children, build_tiny

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", type=Path, default=Path("/tmp/kiln_soak_model"))
    p.add_argument("--out", type=Path, default=Path("out/soak"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_tiny(args.model)
    port = free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--max-num-seqs", "32", "--log-level", "warning"]  # fmt: skip
    log = open(args.out / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=300)
        pids = {"api": proc.pid, "core": _children(proc.pid)[0]}
        stats, samples = asyncio.run(soak(args, port, pids))
        time.sleep(3)  # the last aborts land
    finally:
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    free = total = None
    for line in metrics.splitlines():
        if line.startswith("kiln:kv_cache_free_blocks "):
            free = float(line.split()[1])
        if line.startswith("kiln:kv_cache_total_blocks "):
            total = float(line.split()[1])
    fivexx = sum(v for k, v in stats.items() if k.startswith("http 5")) + stats["5xx in stream"]
    lines = [f"soak: {args.minutes:g} min, {args.concurrency} workers, exit {proc.returncode}",
             "| what | count |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in sorted(stats.items())]
    lines += [f"| 5xx (total) | {fivexx} |",
              f"| KV blocks free at the end | {free:.0f} / {total:.0f} |",
              "", "| t (s) | API RSS MB | core RSS MB |", "|---|---|---|"]  # fmt: skip
    step = max(1, len(samples) // 12)
    lines += [f"| {t:.0f} | {a:.0f} | {c:.0f} |" for t, a, c in samples[::step]]
    table = "\n".join(lines)
    (args.out / "soak.md").write_text(table + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ts = [s[0] for s in samples]
    ax.plot(ts, [s[1] for s in samples], label="API process")
    ax.plot(ts, [s[2] for s in samples], label="engine core")
    ax.set(xlabel="s", ylabel="RSS (MB)", title="kiln serve under mixed traffic", ylim=(0, None))
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "rss.png", dpi=120)


if __name__ == "__main__":
    main()
