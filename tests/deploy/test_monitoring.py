"""deploy/: the Grafana dashboard and the Prometheus alert rules select only series that a live
kiln server's /metrics exports, and their files parse."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from serve.live_server import start_server

from deploy.promql import PROMETHEUS_SERIES, exported_names, metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "kiln.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


@pytest.fixture(scope="module")
def exported(tokenized_model_dir) -> set[str]:
    with start_server(tokenized_model_dir("llama")) as server:
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                   timeout=60).raise_for_status()  # fmt: skip
        bad = httpx.post(f"{server.url}/v1/completions", json={"max_tokens": -1}, timeout=60)
        assert bad.status_code == 400
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'kiln:request_errors_total{status="400"} 1.0' in text
    return exported_names(text)


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_metric_names_reads_promql():
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(kiln:ttft_bucket{a=~"x|y"}[5m])))'
        " / on(instance) kiln:b > 0.5 and up == 0"
    )
    assert metric_names(expr) == {"kiln:ttft_bucket", "kiln:b", "up"}
    assert metric_names("label_values(kiln:num_requests_running, instance)") == {
        "kiln:num_requests_running", "instance"
    }  # fmt: skip


def test_dashboard_selects_only_exported_metrics(exported):
    exprs = dashboard_exprs()
    used = set().union(*(metric_names(e) for e in exprs)) - {"instance"}  # label_values' label
    assert used, "the dashboard queries nothing"
    assert used - exported == set(), f"not exported by /metrics: {sorted(used - exported)}"
    wanted = {"kiln:request_success_total", "kiln:num_requests_running",
              "kiln:num_requests_waiting", "kiln:kv_cache_usage_perc",
              "kiln:prefix_cache_hits_total", "kiln:time_to_first_token_seconds_bucket",
              "kiln:time_per_output_token_seconds_bucket",
              "kiln:e2e_request_latency_seconds_bucket", "kiln:generation_tokens_total",
              "kiln:request_errors_total"}  # fmt: skip
    assert wanted <= used, f"panels missing for {sorted(wanted - used)}"


def test_dashboard_panels_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "kiln"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["title"] and p["targets"] and p["datasource"]["uid"] == "prometheus"
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"][
            "w"
        ] <= 24
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_alert_rules_parse_and_select_exported_metrics(exported):
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {"KilnQueueDeep", "KilnTTFTHigh", "KilnErrorRate", "KilnKVCacheExhausted"} <= names
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        missing = metric_names(rule["expr"]) - exported - PROMETHEUS_SERIES
        assert not missing, f"{rule['alert']}: not exported by /metrics: {sorted(missing)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_checks_rules_and_config():
    for args in (["check", "rules", str(ALERTS)], ["check", "config", "--syntax-only",
                 str(DEPLOY / "prometheus" / "prometheus.yml")]):  # fmt: skip
        result = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_kiln_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kiln", "prometheus", "grafana"}
    assert any(v.endswith(":/model:ro") for v in services["kiln"]["volumes"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [
        "kiln:8000"
    ]
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for f in ("prometheus.yml", "alerts.yml", "provisioning", "kiln.json"):
        assert f in mounts
        path = next(m.split(":")[0] for m in mounts.split() if f in m)
        assert (DEPLOY / path).exists(), path
