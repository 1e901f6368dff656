"""kiln on Ray Serve (kiln.serve.ray_serve), on a local Ray cluster with the tiny model: two
replicas behind one endpoint share the load, and a replica killed under load is replaced while
no request is lost beyond those it had in flight."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kiln[ray]')")
serve = pytest.importorskip("ray.serve")

from kiln.serve.ray_serve import build_app, connect  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_ONGOING = 2  # requests a replica takes at once: the most a killed one can lose


def replica_of(response: dict) -> str:
    return response["id"].split("-")[1].removeprefix("r")  # cmpl-r<replica>-<uuid>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(chat_model_dir):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    connect(None, num_cpus=4)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            str(chat_model_dir), "tiny", engine_args={"max_num_seqs": 4}, num_replicas=2,
            num_cpus=0.5, max_ongoing_requests=MAX_ONGOING,
        )  # fmt: skip
        serve.run(app, name="kiln", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(url: str, max_tokens: int = 8) -> dict:
    body = {"prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    return r.json()


def running_replicas() -> set[str]:
    status = serve.status().applications["kiln"].deployments["kiln"]
    if status.replica_states.get("RUNNING", 0) != 2:
        return set()
    return {
        a["name"].rsplit("#", 1)[1]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::kiln#kiln#")
    }


def test_two_replicas_share_the_load(endpoint):
    results = []
    threads = [threading.Thread(target=lambda: results.append(complete(endpoint)))
               for _ in range(12)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and all(r["usage"]["completion_tokens"] == 8 for r in results)
    assert len({replica_of(r) for r in results}) == 2
    assert httpx.get(f"{endpoint}/health", timeout=10).status_code == 200


def test_a_killed_replica_is_replaced_and_only_its_requests_fail(endpoint):
    before = running_replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    ok: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                ok.append(replica_of(complete(endpoint, max_tokens=16)))
            except httpx.HTTPError as e:
                failed.append(repr(e))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while len(ok) < 8:
        assert time.monotonic() < deadline, "no load went through"
        time.sleep(0.05)
    actor = ray.get_actor(f"SERVE_REPLICA::kiln#kiln#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 90
    while not (len(now := running_replicas()) == 2 and victim not in now):
        assert time.monotonic() < deadline, f"no replacement in 90 s: {serve.status()}"
        time.sleep(0.5)
    (replacement,) = now - before
    served_before = len(ok)
    deadline = time.monotonic() + 30
    while replacement not in ok[served_before:]:
        assert time.monotonic() < deadline, "the replacement serves nothing"
        time.sleep(0.1)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    assert len(failed) <= MAX_ONGOING, failed
    assert len(ok) > 16


def test_unreachable_cluster_is_a_one_line_error(chat_model_dir):
    argv = [sys.executable, str(ROOT / "deploy" / "ray" / "serve.py"), "--model",
            str(chat_model_dir), "--address", f"127.0.0.1:{free_port()}"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "cannot reach the Ray cluster" in result.stderr and result.stderr.count("\n") == 1
