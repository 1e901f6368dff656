"""Summarize engine step traces (KILN_STEP_TRACE=DIR, see kiln.engine.core.StepTrace).

For each window of steps: how many ran eager vs as a CUDA graph, their median host time, the
tokens and sequences a step carried, and the time the core spent with no step running (gaps
between steps: waiting for requests or for the other side). Used by bench_serve_vs_offline
--trace to say where a served run loses time against the offline one.

    python benchmarks/step_trace_report.py out/serve_vs_offline/trace/served-after
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    """Every step of every steps-*.jsonl under `path` (a file or a directory), by start."""
    files = [path] if path.is_file() else sorted(path.glob("steps-*.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    return sorted(rows, key=lambda r: r["start"])


def summarize(steps: list[dict], start: float | None = None, end: float | None = None) -> dict:
    """The steps that started inside [start, end] (perf_counter seconds; None: all)."""
    steps = [s for s in steps if (start is None or s["start"] >= start)
             and (end is None or s["start"] <= end)]  # fmt: skip
    if not steps:
        return {"steps": 0}
    ran = [s for s in steps if s.get("seqs")]
    eager = [s for s in ran if s["graph"] is None]
    graph = [s for s in ran if s["graph"] is not None]
    mixed = [s for s in ran if s["decodes"] < s["seqs"]]
    mixed_graph = [s for s in graph if s["graph"][0] == "mixed"]
    span = steps[-1]["end"] - steps[0]["start"]
    busy = sum(s["end"] - s["start"] for s in steps)

    def med(rows, f):
        return statistics.median(f(r) for r in rows) if rows else float("nan")

    return {
        "steps": len(steps),
        "span_s": span,
        "idle_s": span - busy,
        "eager": len(eager),
        "graph": len(graph),
        "mixed": len(mixed),
        "mixed_graph": len(mixed_graph),
        "eager_ms_p50": 1e3 * med(eager, lambda r: r["end"] - r["start"]),
        "graph_ms_p50": 1e3 * med(graph, lambda r: r["end"] - r["start"]),
        "mixed_ms_p50": 1e3 * med(mixed_graph, lambda r: r["end"] - r["start"]),
        "mixed_wait_ms_p50": 1e3 * med(mixed_graph, lambda r: r.get("gpu_wait", float("nan"))),
        "graph_wait_ms_p50": 1e3 * med(graph, lambda r: r.get("gpu_wait", float("nan"))),
        "eager_time_s": sum(s["end"] - s["start"] for s in eager),
        "graph_time_s": sum(s["end"] - s["start"] for s in graph),
        "tokens_p50": med(ran, lambda r: r["tokens"]),
        "seqs_p50": med(ran, lambda r: r["seqs"]),
        "eager_tokens_p50": med(eager, lambda r: r["tokens"]),
        "deltas_total": sum(s["deltas"] for s in steps),
    }


def format_row(name: str, s: dict) -> str:
    if not s["steps"]:
        return f"| {name} | 0 | | | | | | | |"
    return (
        f"| {name} | {s['steps']} | {s['span_s']:.2f} | {s['idle_s']:.2f} | "
        f"{s['graph']} ({s['mixed_graph']} mixed) / {s['graph_ms_p50']:.2f} / "
        f"{s['graph_time_s']:.2f} | "
        f"{s['mixed_ms_p50']:.2f} / {s['mixed_wait_ms_p50']:.2f} / {s['graph_wait_ms_p50']:.2f} | "
        f"{s['eager']} / {s['eager_ms_p50']:.2f} / {s['eager_time_s']:.2f} | "
        f"{s['tokens_p50']:.0f} / {s['seqs_p50']:.0f} | {s['eager_tokens_p50']:.0f} |"
    )


HEADER = (
    "| run | steps | span s | idle s | graph steps (with prefill) / p50 ms / total s | "
    "mixed graph step p50 ms / its GPU wait / any graph step's GPU wait | "
    "eager steps / p50 ms / total s | tokens / seqs p50 | eager tokens p50 |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    for arg in sys.argv[1:]:
        print(HEADER)
        print(format_row(arg, summarize(load(Path(arg)))))


if __name__ == "__main__":
    main()
