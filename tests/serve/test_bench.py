"""`kiln bench serve` against the live test server: every request completes, metrics add up."""

from __future__ import annotations

import argparse
import json
import math

import pytest


def test_bench_serve_reports_vllm_metrics(server, tmp_path, capsys):
    from kiln.serve import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--base-url", server.url, "--num-prompts", "12", "--request-rate", "inf", "40",
         "--input-len", "16", "--output-len", "6", "--max-token-id", "300",
         "--json", str(out)]
    )  # fmt: skip
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    assert [r["request_rate"] for r in results] == [float("inf"), 40.0]
    for r in results:
        assert r["completed"] == 12 and r["failed"] == 0
        assert r["output_throughput"] > 0
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
        assert r["tpot_ms"]["mean"] > 0 and r["itl_ms"]["p95"] > 0
    assert "output throughput" in capsys.readouterr().out


def test_bench_serve_with_several_client_processes_counts_every_request(server, tmp_path):
    from kiln.serve import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--base-url", server.url, "--num-prompts", "9", "--num-clients", "2",
         "--input-len", "8", "--output-len", "5", "--max-token-id", "300",
         "--warmup-requests", "1", "--json", str(out)]
    )  # fmt: skip
    args.func = lambda a: 0  # as the CLI sets it: must not travel to the client processes
    assert bench.main(args) == 0
    (r,) = json.loads(out.read_text())
    assert r["completed"] == 9 and r["failed"] == 0 and r["num_prompts"] == 9
    assert r["output_throughput"] == pytest.approx(9 * 5 / r["duration_s"])


def test_steady_throughput_leaves_out_the_drain_tail():
    from kiln.serve.bench import RequestResult, steady_throughput

    # 100 requests sent at 10/s, each taking 1 s: the server keeps up with the offered rate,
    # but 100 requests / 10.9 s of wall time reads 8% low
    done = [RequestResult(ok=True, e2e=1.0, sent_at=1000 + i / 10) for i in range(100)]
    assert steady_throughput(done) == pytest.approx(10.0, rel=0.05)
    slow = [RequestResult(ok=True, e2e=1.0 + i / 20, sent_at=1000 + i / 10) for i in range(100)]
    assert steady_throughput(slow) < 8.0  # falling behind: completions lag the arrivals
    at_once = [RequestResult(ok=True, e2e=1.0, sent_at=1000.0) for _ in range(20)]
    assert math.isnan(steady_throughput(at_once))


def test_steady_throughput_is_not_biased_by_latency():
    """Latency long against the arrival window (0.6 s of a 3.6 s run) reads as the offered
    rate, and sends are counted as offered."""
    from kiln.serve.bench import RequestResult, offered_throughput, steady_throughput

    done = [RequestResult(ok=True, e2e=0.6, sent_at=1000 + i / 275) for i in range(1000)]
    assert steady_throughput(done) == pytest.approx(275, rel=0.01)
    assert offered_throughput(done) == pytest.approx(275, rel=0.01)
