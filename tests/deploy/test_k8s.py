"""deploy/k8s/: every manifest checked against the Kubernetes API's schema (the `kubernetes`
client's models: unknown fields, wrong types and missing required fields fail; no cluster and
no network), and wired together: probes on /health, the Service and HPA on the Deployment, the
HPA's custom metric served by prometheus-adapter from a series /metrics exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from fake_engine import IDLE_STATS

from deploy.promql import exported_names, metric_names
from kiln.cli import build_parser
from kiln.serve.metrics import ServerMetrics

k8s = pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def check(data, type_name: str, where: str) -> None:
    """`data` (parsed YAML) conforms to the client's model `type_name`: only known fields,
    each of its declared type, recursively."""
    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        assert isinstance(data, list), f"{where}: expected a list"
        for i, item in enumerate(data):
            check(item, m.group(1), f"{where}[{i}]")
    elif m := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        assert isinstance(data, dict), f"{where}: expected a mapping"
        for key, value in data.items():
            check(value, m.group(1) or m.group(2), f"{where}.{key}")
    elif type_name in PRIMITIVES:
        ok = isinstance(data, PRIMITIVES[type_name]) and not (
            type_name != "bool" and isinstance(data, bool)
        )
        assert ok, f"{where}: expected {type_name}, got {data!r}"
    elif type_name in ("object", "datetime", "date", "bytes"):
        return
    else:
        model = getattr(k8s.client.models, type_name)
        assert isinstance(data, dict), f"{where}: expected a {type_name} mapping"
        by_json = {json: attr for attr, json in model.attribute_map.items()}
        unknown = set(data) - set(by_json)
        assert not unknown, f"{where}: {type_name} has no field(s) {sorted(unknown)}"
        for key, value in data.items():
            check(value, model.openapi_types[by_json[key]], f"{where}.{key}")


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def model_name(doc: dict) -> str:
    version = doc["apiVersion"].split("/")[-1]
    return f"{version.capitalize()}{doc['kind']}"


def by_kind(kind: str) -> dict:
    (doc,) = [
        d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] != "adapter-config"
    ]
    return doc


def test_check_catches_unknown_fields_and_wrong_types():
    good = {"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": 80}]}}
    check(good, "V1Service", "svc")
    with pytest.raises(AssertionError, match="no field"):
        check({**good, "spec": {"prots": []}}, "V1Service", "svc")
    with pytest.raises(AssertionError, match="expected int"):
        check({**good, "spec": {"ports": [{"port": "80"}]}}, "V1Service", "svc")
    no_selector = {"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {}}}
    with pytest.raises(Exception, match="selector"):  # a required field
        k8s.client.ApiClient()._ApiClient__deserialize(no_selector, "V1Deployment")


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_the_api_schema(doc):
    name = model_name(doc)
    check(doc, name, f"{doc['kind']}/{doc['metadata']['name']}")
    # the model's own constructor checks required fields and enumerations
    k8s.client.ApiClient()._ApiClient__deserialize(doc, name)


def test_deployment_probes_health_and_serves_kiln_flags():
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["KILN_PORT"]) in ports.values()
    build_parser().parse_args(["serve", "--model", env["KILN_MODEL"], *container["args"]])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["KILN_MODEL"] in mounts
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_hpa_scales_the_deployment_on_the_adapters_queue_metric():
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    adapter_doc = next(d for d in manifests() if d["metadata"]["name"] == "adapter-config")
    (rule,) = yaml.safe_load(adapter_doc["data"]["config.yaml"])["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    exported = exported_names(ServerMetrics(lambda: IDLE_STATS).render().decode())
    series = metric_names(rule["seriesQuery"])
    assert series == {"kiln:num_requests_waiting"} and series <= exported
