"""benchmarks/dashboard_promql.py, the PromQL subset the static dashboard render evaluates:
Prometheus' rate() and histogram_quantile() against hand-computed values, and every target of
deploy/grafana/kiln.json parsed and evaluated (a dashboard edit that needs an unsupported
function fails here, not as a silently empty panel in the render)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kiln.json"
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from dashboard_promql import (  # noqa: E402
    PromQLError,
    SeriesStore,
    bucket_quantile,
    evaluate,
    legend,
    parse,
    query_range,
    substitute,
)
from render_dashboard import evaluate_panels  # noqa: E402

GRAFANA_VARS = {"instance": ".*", "__rate_interval": "8s"}


def store_of(points: dict[str, list[tuple[float, float]]], **labels) -> SeriesStore:
    store = SeriesStore()
    for name, samples in points.items():
        for t, v in samples:
            store.add(t, name, labels, v)
    return store


def only(vec: dict) -> float:
    (value,) = vec.values()
    return value


def test_rate_of_a_steady_counter_is_its_slope():
    # samples at 2, 4, 6, 8 in the window (0, 8]: 30 over 6 s, extrapolated to the window's start
    store = store_of({"c_total": [(0, 0), (2, 10), (4, 20), (6, 30), (8, 40)]})
    assert only(evaluate(parse("rate(c_total[8s])"), store, 8.0)) == pytest.approx(5.0)


def test_rate_extrapolates_at_most_half_a_spacing_past_the_samples():
    # samples at 3, 5, 7 in (0, 10]: the edges are 3 s away (> 1.1 x the 2 s spacing), so the
    # 4 s sampled stretch is extended by 1 s at each end: 30 * (6 / 4) / 10
    store = store_of({"c_total": [(3, 100), (5, 110), (7, 130)]})
    assert only(evaluate(parse("rate(c_total[10s])"), store, 10.0)) == pytest.approx(4.5)


def test_rate_corrects_counter_resets():
    # 5 -> 8, a reset, 2 -> 6: an increase of 3 + 8 + ... = 9 over 3 s, extended 1 s to the
    # window's start: 9 * (4 / 3) / 4
    store = store_of({"c_total": [(1, 5), (2, 8), (3, 2), (4, 6)]})
    assert only(evaluate(parse("rate(c_total[4s])"), store, 4.0)) == pytest.approx(3.0)


def test_rate_needs_two_samples_and_an_instant_selector_looks_back():
    store = store_of({"c_total": [(0, 1)], "g": [(0, 7.0)]})
    assert evaluate(parse("rate(c_total[8s])"), store, 1.0) == {}
    assert only(evaluate(parse("g"), store, 100.0)) == 7.0
    assert evaluate(parse("g"), store, 400.0) == {}  # past the 5 minute lookback


def test_bucket_quantile_interpolates_within_a_bucket():
    buckets = [(0.1, 10), (0.5, 30), (1.0, 40), (math.inf, 40)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.3)  # rank 20: 0.1 + 0.4 * 10/20
    assert bucket_quantile(0.9, buckets) == pytest.approx(0.8)  # rank 36: 0.5 + 0.5 * 6/10
    assert bucket_quantile(0.05, buckets) == pytest.approx(0.02)  # rank 2 of the first 10
    assert bucket_quantile(1.0, buckets) == pytest.approx(1.0)
    # a rank in the +Inf bucket: the largest finite bound
    assert bucket_quantile(0.99, [(0.1, 10), (1.0, 40), (math.inf, 50)]) == 1.0
    assert math.isnan(bucket_quantile(0.5, [(0.1, 0), (math.inf, 0)]))  # no observations
    assert math.isnan(bucket_quantile(0.5, [(0.1, 3), (1.0, 4)]))  # no +Inf bucket


def histogram_text(name: str, counts: dict[str, float]) -> str:
    lines = [f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {c}' for le, c in counts.items()]
    lines += [f"{name}_count {counts['+Inf']}", f"{name}_sum 0"]
    return "\n".join(lines) + "\n"


def test_histogram_quantile_of_summed_rates_over_two_instances():
    # every 2 s each instance observes 1 value <= 0.1, 2 in (0.1, 0.5], 1 in (0.5, 1]
    store = SeriesStore()
    step = {"0.1": 1, "0.5": 3, "1.0": 4, "+Inf": 4}
    for i in range(6):
        for instance in ("a:8000", "b:8000"):
            text = histogram_text("lat_seconds", {le: i * c for le, c in step.items()})
            store.add_scrape(2.0 * i, text, instance)
    expr = "histogram_quantile(0.5, sum by (le) (rate(lat_seconds_bucket[8s])))"
    (labels, values), = query_range(expr, store, [10.0]).items()  # fmt: skip
    assert labels == frozenset()  # `le` is consumed; nothing else was kept by `sum by (le)`
    assert values[0] == pytest.approx(0.3)  # rank 2 of cumulative 1, 3, 4: 0.1 + 0.4 * 1/2
    expr = 'sum by (instance) (rate(lat_seconds_count{instance=~"a.*"}[8s]))'
    assert evaluate(parse(expr), store, 10.0) == {frozenset({("instance", "a:8000")}): 2.0}


def test_ratio_of_sums_and_by_label_groups():
    store = SeriesStore()
    for i in range(5):
        text = (
            f"# TYPE hits counter\nhits_total {3 * i}\n# TYPE queries counter\n"
            f"queries_total {4 * i}\n# TYPE errs counter\n"
            f'errs_total{{status="400"}} {i}\nerrs_total{{status="429"}} {2 * i}\n'
        )
        store.add_scrape(2.0 * i, text, "k:1")
    ratio = "sum(rate(hits_total[8s])) / sum(rate(queries_total[8s]))"
    assert only(evaluate(parse(ratio), store, 8.0)) == pytest.approx(0.75)
    by = evaluate(parse("sum by (status) (rate(errs_total[8s]))"), store, 8.0)
    assert {dict(k)["status"]: v for k, v in by.items()} == pytest.approx({"400": 0.5, "429": 1.0})
    assert legend("HTTP {{status}}", next(iter(by))) in ("HTTP 400", "HTTP 429")
    assert only(evaluate(parse("2 * sum(hits_total) - 1"), store, 8.0)) == 23.0


@pytest.mark.parametrize(
    "expr",
    ["irate(x[5m])", "avg(x)", "sum without (a) (x)", "x offset 5m", "x > 1", "x and y",
     "rate(x)", "rate(x[5m:1m])", "topk(3, x)", "x{a=~\"b\"", "label_values(x, instance)"],
)  # fmt: skip
def test_unsupported_promql_is_an_error(expr):
    with pytest.raises(PromQLError):
        parse(expr)


def test_an_unknown_dashboard_variable_is_an_error():
    with pytest.raises(PromQLError, match=r"\$job"):
        substitute('up{job="$job"}', GRAFANA_VARS)
    assert substitute("x[$__rate_interval]", GRAFANA_VARS) == "x[8s]"


def test_every_dashboard_target_parses():
    dash = json.loads(DASHBOARD.read_text())
    targets = [t for p in dash["panels"] for t in p["targets"]]
    assert len(targets) >= 9
    for t in targets:
        parse(substitute(t["expr"], GRAFANA_VARS))


def kiln_metrics_text(i: int) -> str:
    """kiln's own /metrics exposition (kiln.serve.metrics) after i steps of fake traffic."""
    from kiln.serve.metrics import ServerMetrics

    stats = {"num_running": 3, "num_waiting": 1, "kv_cache_usage": 0.25, "num_free_blocks": 48,
             "num_total_blocks": 64, "kv_pool_tokens": 1024, "kv_blocks_per_seq_mean": 4,
             "kv_blocks_per_seq_max": 8, "prefix_cache_queries": 100 * i,
             "prefix_cache_hits": 40 * i, "prompt_tokens_total": 100 * i,
             "generation_tokens_total": 50 * i, "kv_evicted_blocks_total": 0}  # fmt: skip
    m = ServerMetrics(lambda: stats)
    for _ in range(i):
        m.observe_request(0.0, 0.05, 1.2, 20)
        m.finished.labels("length").inc()
        m.rejected.labels("queue_full").inc()
        m.errors.labels("400").inc()
    return m.render().decode()


def test_every_panel_evaluates_on_kiln_metrics():
    dash = json.loads(DASHBOARD.read_text())
    store = SeriesStore()
    for i in range(6):
        store.add_scrape(2.0 * i, kiln_metrics_text(i), "127.0.0.1:8000")
    panels = evaluate_panels(dash, store, [8.0, 10.0], rate_interval=8.0)
    assert [p["title"] for p, _ in panels] == [p["title"] for p in dash["panels"]]
    got = {(p["title"], label): values[-1] for p, lines in panels for label, values, _ in lines}
    assert got[("Request rate", "finished: length")] == pytest.approx(0.5)
    assert got[("Request rate", "rejected: queue_full")] == pytest.approx(0.5)
    assert got[("Errors", "HTTP 400")] == pytest.approx(0.5)
    assert got[("Running / waiting", "running")] == 3
    assert got[("KV cache usage", "127.0.0.1:8000")] == 0.25
    assert got[("Prefix cache hit rate", "over the window")] == pytest.approx(0.4)
    assert got[("Tokens / s", "generated")] == pytest.approx(25.0)
    # every observation is 50 ms to the first token: in the (0.04, 0.06] bucket
    assert 0.04 < got[("Time to first token", "p50")] <= 0.06
    assert 1.0 < got[("End-to-end latency", "p99")] <= 1.5


def test_a_panel_with_an_unsupported_function_fails_the_render():
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"][0]["targets"][0]["expr"] = "avg(kiln:num_requests_running)"
    store = SeriesStore()
    store.add_scrape(0.0, kiln_metrics_text(1), "k:1")
    with pytest.raises(PromQLError, match="avg"):
        evaluate_panels(dash, store, [0.0], rate_interval=8.0)
