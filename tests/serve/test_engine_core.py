"""The server over an engine core in its own process: streamed text equals kiln.LLM's offline
output, and the core dying fails what is in flight (500-class), /health turns 503, and
`kiln serve` exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kiln.engine import LLM, SamplingParams
from serve.live_server import start_server
from serve.test_cli_drain import free_port, wait_healthy

PROMPTS = [[5, 6, 7], [9, 3, 4, 11, 12], [30, 31]]


def _stream_text(http: httpx.Client, body: dict) -> tuple[str, list[dict]]:
    events = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), events


def test_streamed_text_equals_offline_generation(chat_model_dir, server, http):
    bodies = [
        {"prompt": p, "max_tokens": 16, "temperature": 0.8, "seed": 7 + i, "ignore_eos": True}
        for i, p in enumerate(PROMPTS)
    ] + [{"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "ignore_eos": True}]
    served = [_stream_text(http, b)[0] for b in bodies]
    llm = LLM(str(chat_model_dir), device="cpu")
    params = [
        SamplingParams(max_tokens=16, temperature=b["temperature"], seed=b.get("seed"),
                       ignore_eos=True) for b in bodies
    ]  # fmt: skip
    offline = llm.generate(prompt_token_ids=[b["prompt"] for b in bodies], sampling_params=params)
    assert served == [o.outputs[0].text for o in offline]
    assert all(served)


def test_engine_core_killed_mid_stream(chat_model_dir):
    with (
        start_server(chat_model_dir, max_num_seqs=8) as s,
        httpx.Client(base_url=s.url, timeout=30) as http,
    ):
        assert http.get("/health").status_code == 200
        body = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": True}
        events = []
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        os.kill(s.engine.client.proc.pid, signal.SIGKILL)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "engine core" in error["message"]
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 after the core died"
            time.sleep(0.05)
        r = http.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
        assert r.status_code in (500, 503) and r.json()["error"]["message"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_kiln_serve_exits_nonzero_when_the_engine_core_dies(chat_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(chat_model_dir),
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        (core,) = _children(proc.pid)
        os.kill(core, signal.SIGKILL)
        assert proc.wait(timeout=30) not in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log = (tmp_path / "serve.log").read_text()
    assert "engine core process died" in log and "Traceback" not in log


def test_engine_core_threads_one_on_a_gpu_all_but_one_on_the_cpu(monkeypatch):
    """A GPU engine core's host work gains nothing from torch's spinning intra-op threads
    (they took 9-10 of an H100 host's cores beside the API processes); a CPU one runs the
    model on them and leaves one core for its API process."""
    from kiln.engine.core_client import core_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert core_threads("cuda") == core_threads("cuda:1") == 1
    assert core_threads("cpu") == 15
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert core_threads("cpu") == 1
