"""A static render of the Grafana dashboard (deploy/grafana/kiln.json) from a real run: no
Grafana, no Prometheus.

Starts `kiln serve` on a tiny random model (or uses --url), drives a minute or two of load
through it at changing request rates (shared-prefix prompts, so the prefix cache hits; a few
malformed requests, so the Errors panel has data; one burst past --max-queue, so requests are
rejected), scrapes /metrics every --scrape-interval seconds, evaluates every panel's PromQL on
the scraped samples (benchmarks/dashboard_promql.py: exactly the functions the dashboard uses,
an error on anything else) and draws the panels in the dashboard's grid, Grafana-dark, to a PNG.

    PYTHONPATH=src:benchmarks python benchmarks/render_dashboard.py \\
        --out notes/figures/grafana_dashboard.png
    PYTHONPATH=src:benchmarks python benchmarks/render_dashboard.py \\
        --replay out/dashboard/scrapes.jsonl

The scrapes are saved (--scrapes) so that the drawing can be redone with --replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from dashboard_promql import PromQLError, SeriesStore, legend, query_range, substitute  # noqa: E402

# (seconds, requests/s) of the default 100 s run, scaled to --seconds; "burst" sends BURST
# requests at once, past --max-num-seqs + --max-queue. Two bursts: a labelled counter's series
# starts at its first increment, and rate() sees no increase in a series' first sample (as in
# Prometheus), so the first burst's rejections create kiln:request_rejected_total{reason=...}
# and the second's show.
PHASES = [(6, 0.0), (18, 2.0), (2, "burst"), (20, 6.0), (20, 12.0), (2, "burst"), (18, 3.0),
          (14, 0.0)]  # fmt: skip
BURST = 40
SHARED_PREFIXES = 3  # system prompts that shared-prefix requests start with
PREFIX_LEN = 48  # tokens: three KV blocks of 16
MALFORMED = [
    ("/v1/completions", b'{"prompt": [1, 2, 3], "max_tokens": -1}'),
    ("/v1/completions", b'{"prompt": "x",'),
    ("/v1/chat/completions", b'{"messages": "not a list"}'),
    ("/v1/completions", b'{"prompt": [1, 2], "temperature": "hot"}'),
]

# Grafana's dark theme
BG, PANEL, BORDER, GRID = "#111217", "#181b1f", "#2c3235", "#24272b"
TEXT, DIM = "#ccccdc", "#8e8e8e"
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0"]
UNITS = ("reqps", "short", "percentunit", "s")


# --- load and scrapes ------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, rng: random.Random, prefixes, stats) -> None:
    x = rng.random()
    try:
        if x < 0.06:
            route, body = rng.choice(MALFORMED)
            r = await client.post(route, content=body,
                                  headers={"Content-Type": "application/json"})  # fmt: skip
            stats[f"malformed -> {r.status_code}"] += 1
            return
        if x < 0.55:
            tail = [rng.randrange(10, 3000) for _ in range(rng.randint(4, 24))]
            prompt = rng.choice(prefixes) + tail
        else:
            prompt = [rng.randrange(10, 3000) for _ in range(rng.randint(16, 96))]
        body = {"prompt": prompt, "max_tokens": rng.randint(16, 128), "ignore_eos": True,
                "temperature": rng.choice([0.0, 0.8])}  # fmt: skip
        if rng.random() < 0.3:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    pass
        else:
            r = await client.post("/v1/completions", json=body)
        stats[f"http {r.status_code}"] += 1
    except httpx.HTTPError as e:
        stats[f"client error {type(e).__name__}"] += 1


async def drive(url: str, phases, seed: int, stats: Counter) -> None:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, 3000) for _ in range(PREFIX_LEN)]
                for _ in range(SHARED_PREFIXES)]  # fmt: skip
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    tasks = set()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
        for seconds, rate in phases:
            end = time.monotonic() + seconds
            if rate == "burst":
                for _ in range(BURST):
                    tasks.add(asyncio.create_task(one_request(client, rng, prefixes, stats)))
            while rate != "burst" and time.monotonic() < end:
                if rate == 0:
                    await asyncio.sleep(end - time.monotonic())
                    break
                await asyncio.sleep(min(rng.expovariate(rate), max(0.0, end - time.monotonic())))
                if time.monotonic() < end:
                    tasks.add(asyncio.create_task(one_request(client, rng, prefixes, stats)))
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            tasks = {t for t in tasks if not t.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=120)


async def scrape_loop(url: str, interval: float, out: list, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=10.0) as client:
        while True:
            t = time.time()
            r = await client.get(f"{url}/metrics")
            r.raise_for_status()
            out.append({"t": t, "text": r.text})
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, interval - (time.time() - t)))
                return
            except TimeoutError:
                pass


async def run_load(url: str, args) -> tuple[list[dict], Counter]:
    scale = args.seconds / sum(s for s, _ in PHASES)
    phases = [(s * scale, r) for s, r in PHASES]
    scrapes: list[dict] = []
    stats: Counter = Counter()
    stop = asyncio.Event()
    scraper = asyncio.create_task(scrape_loop(url, args.scrape_interval, scrapes, stop))
    await drive(url, phases, args.seed, stats)
    await asyncio.sleep(args.scrape_interval)
    stop.set()
    await scraper
    return scrapes, stats


def start_server(args):
    from bench_serve import free_port, wait_healthy
    from bench_serve_vs_offline import build_tiny, env_for

    model = build_tiny(args.model)
    port = free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--max-num-seqs", str(args.max_num_seqs), "--max-queue",
           str(args.max_queue), "--num-kv-blocks", str(args.num_kv_blocks),
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env_for(ROOT / "src"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
    except BaseException:
        proc.kill()
        raise
    return proc, url


# --- evaluation and drawing ------------------------------------------------------------------


def evaluate_panels(dashboard: dict, store: SeriesStore, times: list[float], rate_interval: float):
    """[(panel, [(label, values, refId)])] for every panel; PromQLError on what is unsupported,
    and ValueError for a panel that has no data at all."""
    variables = {"__rate_interval": f"{round(rate_interval * 1000)}ms", "instance": ".*"}
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") != "timeseries":
            raise PromQLError(f"panel {panel['title']!r}: type {panel.get('type')!r} not drawn")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if unit not in UNITS:
            raise PromQLError(f"panel {panel['title']!r}: unit {unit!r} not supported")
        lines = []
        for target in panel["targets"]:
            result = query_range(substitute(target["expr"], variables), store, times)
            for labels, values in sorted(result.items(), key=lambda kv: sorted(kv[0])):
                lines.append((legend(target.get("legendFormat"), labels), values, target["refId"]))
        if not any(not math.isnan(v) for _, values, _ in lines for v in values):
            raise ValueError(f"panel {panel['title']!r} has no data")
        out.append((panel, lines))
    return out


def fmt_value(v: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{v * 100:.0f}%"
    if unit == "s":
        if v == 0:
            return "0 s"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if abs(v) < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    suffix = " req/s" if unit == "reqps" else ""
    for scale, letter in ((1e9, " B"), (1e6, " Mil"), (1e3, " K")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{letter}{suffix}"
    return f"{v:.3g}{suffix}"


def draw(panels, times: list[float], dashboard: dict, out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    width, unit_h, gap, header = 1920, 34, 8, 56  # pixels: Grafana's 24-column grid
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p, _ in panels)
    height = header + rows * unit_h + gap
    col_w = (width - gap) / 24
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=BG)

    def frac(x, y, w, h):  # pixels from the top-left -> figure fractions
        return [x / width, 1 - (y + h) / height, w / width, h / height]

    fig.text(gap * 2 / width, 1 - 28 / height, f"Dashboards  ›  {dashboard['title']}", color=TEXT,
             fontsize=15, va="center", weight="bold")  # fmt: skip
    fig.text(1 - gap * 2 / width, 1 - 28 / height, subtitle, color=DIM, fontsize=10,
             va="center", ha="right")  # fmt: skip
    ts = [datetime.fromtimestamp(t) for t in times]
    for panel, lines in panels:
        g = panel["gridPos"]
        px, py = gap + g["x"] * col_w, header + g["y"] * unit_h
        pw, ph = g["w"] * col_w - gap, g["h"] * unit_h - gap
        fig.patches.append(Rectangle(frac(px, py, pw, ph)[:2], pw / width, ph / height,
                                     transform=fig.transFigure, facecolor=PANEL, edgecolor=BORDER,
                                     linewidth=1, zorder=-1))  # fmt: skip
        fig.text((px + 10) / width, 1 - (py + 16) / height, panel["title"], color=TEXT,
                 fontsize=11, va="center", weight="bold")  # fmt: skip
        legend_rows = math.ceil(len(lines) / 3)
        left, top, right, bottom = 62, 32, 14, 26 + 18 * legend_rows
        ax = fig.add_axes(frac(px + left, py + top, pw - left - right, ph - top - bottom))
        ax.set_facecolor(PANEL)
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        for i, (label, values, _) in enumerate(lines):
            color = PALETTE[i % len(PALETTE)]
            ax.plot(ts, values, color=color, linewidth=1.4, label=label)
        finite = [v for _, values, _ in lines for v in values if not math.isnan(v)]
        top_v = max(finite) if finite else 1.0
        ax.set_ylim(0, top_v * 1.1 if top_v > 0 else 1.0)
        ax.set_xlim(ts[0], ts[-1])
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: fmt_value(v, u)))
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(colors=DIM, labelsize=8, length=0)
        ax.tick_params(axis="x", pad=7)
        ax.grid(True, color=GRID, linewidth=0.8)
        for spine in ax.spines.values():
            spine.set_visible(False)
        leg = ax.legend(loc="upper left", bbox_to_anchor=(-0.02, -0.09), ncol=3,
                        frameon=False, fontsize=8.5, handlelength=1.2, columnspacing=1.5,
                        labelcolor=TEXT)  # fmt: skip
        for handle in leg.legend_handles:
            handle.set_linewidth(4)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor=BG)
    plt.close(fig)


def summary(panels) -> str:
    """Per series: its mean and its largest value over the run."""
    rows = []
    for panel, lines in panels:
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        for label, values, _ in lines:
            finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
            if finite:
                mean, peak = sum(finite) / len(finite), max(finite)
                rows.append(f"| {panel['title']} | {label} | {fmt_value(mean, unit)} | "
                            f"{fmt_value(peak, unit)} |")  # fmt: skip
            else:
                rows.append(f"| {panel['title']} | {label} | no data | no data |")
    return "\n".join(["| panel | series | mean | max |", "|---|---|---|---|", *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running kiln server (else one is started on a tiny model)")
    p.add_argument("--model", type=Path, default=Path("/tmp/kiln_dashboard_model"))
    p.add_argument("--seconds", type=float, default=100.0, help="the load's length")
    p.add_argument("--scrape-interval", type=float, default=2.0)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dashboard", type=Path, default=ROOT / "deploy" / "grafana" / "kiln.json")
    p.add_argument("--scrapes", type=Path, default=Path("out/dashboard/scrapes.jsonl"))
    p.add_argument("--replay", type=Path, help="draw from saved scrapes; no server, no load")
    p.add_argument("--out", type=Path, default=Path("out/dashboard/grafana_dashboard.png"))
    args = p.parse_args()
    dashboard = json.loads(args.dashboard.read_text())

    if args.replay:
        scrapes = [json.loads(line) for line in args.replay.read_text().splitlines()]
        instance = scrapes[0].get("instance", "kiln:8000")
    else:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(args)
        try:
            scrapes, stats = asyncio.run(run_load(url, args))
        finally:
            if proc is not None:
                from bench_serve import stop_server

                stop_server(proc)
        instance = url.split("//", 1)[-1]
        print("client side:", dict(sorted(stats.items())))
        args.scrapes.parent.mkdir(parents=True, exist_ok=True)
        with args.scrapes.open("w") as f:
            for s in scrapes:
                f.write(json.dumps({**s, "instance": instance}) + "\n")

    store = SeriesStore()
    for s in scrapes:
        store.add_scrape(s["t"], s["text"], instance)
    interval = (scrapes[-1]["t"] - scrapes[0]["t"]) / max(1, len(scrapes) - 1)
    # Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), with
    # $__interval (the query step) at the scrape interval here
    step = interval
    rate_interval = max(step + interval, 4 * interval)
    times = [scrapes[0]["t"] + i * step for i in range(len(scrapes))]
    panels = evaluate_panels(dashboard, store, times, rate_interval)
    start = datetime.fromtimestamp(times[0]).strftime("%Y-%m-%d %H:%M:%S")
    subtitle = (f"{start} + {times[-1] - times[0]:.0f} s   ·   {len(scrapes)} scrapes every "
                f"{interval:.1f} s   ·   $__rate_interval {rate_interval:.0f}s   ·   "
                f"instance {instance}")  # fmt: skip
    draw(panels, times, dashboard, args.out, subtitle)
    print(summary(panels))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
