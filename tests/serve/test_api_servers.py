"""`kiln serve --api-server-count 2`: two API processes in front of one engine core."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve.test_cli_drain import free_port, wait_healthy

PROMPT = "the quick brown fox"


class Serve:
    """`kiln serve --api-server-count 2` as a process on a free loopback port."""

    def __init__(self, model_dir, log_path, *args):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(model_dir),
               "--port", str(port), "--served-model-name", "tiny", "--log-level", "warning",
               "--api-server-count", "2", *args]  # fmt: skip
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Serve:
        wait_healthy(self.url, self.proc)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.children():
            os.kill(pid, signal.SIGKILL)

    def children(self, marker: str = "") -> list[int]:
        """Live child processes whose command line holds `marker`."""
        pid = self.proc.pid
        try:
            kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        except OSError:
            return []
        out = []
        for k in kids:
            try:
                cmdline = open(f"/proc/{k}/cmdline").read()
            except OSError:
                continue
            if marker in cmdline:
                out.append(int(k))
        return out

    def stream(self, body: dict, on_first=None) -> list[str]:
        """The data lines of a streamed completion (`on_first()` after the first)."""
        events = []
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1 and on_first is not None:
                        on_first()
        return events


@pytest.fixture(scope="module")
def serve2(chat_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("api_servers") / "serve.log"
    with Serve(chat_model_dir, log, "--max-num-seqs", "16") as s:
        yield s


def test_streamed_completion_equals_offline_greedy(serve2, chat_model_dir):
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = LLM(str(chat_model_dir)).generate([PROMPT], params)[0].outputs[0].text
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    for _ in range(4):  # whichever worker takes each connection
        events = serve2.stream(body)
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == want


def test_concurrent_requests_are_served_by_both_workers(serve2):
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True}

    def one(_):
        with httpx.Client(timeout=60) as c:  # a connection of its own
            r = c.post(f"{serve2.url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        return r.json()["id"].split("-")[1]

    with ThreadPoolExecutor(16) as pool:
        workers = set(pool.map(one, range(48)))
    assert workers == {"w0", "w1"}


def test_embeddings_come_back_to_the_worker_that_asked(serve2):
    body = {"input": [[5, 6, 7], [8, 9]], "encoding_format": "float"}

    def one(_):
        with httpx.Client(timeout=60) as c:
            r = c.post(f"{serve2.url}/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        return [d["embedding"] for d in r.json()["data"]]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r == results[0] for r in results) and len(results[0]) == 2


def test_engine_core_death_fails_in_flight_and_exits_nonzero(chat_model_dir, tmp_path):
    with Serve(chat_model_dir, tmp_path / "serve.log") as s:
        (core,) = s.children("kiln.engine.core_client")
        body = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": True}
        events = s.stream(body, on_first=lambda: os.kill(core, signal.SIGKILL))
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "engine core" in error["message"]
        assert s.proc.wait(timeout=30) != 0
        assert s.children() == []


def test_sigterm_drains_every_worker_then_exits_0(chat_model_dir, tmp_path):
    with Serve(chat_model_dir, tmp_path / "serve.log") as s:
        body = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        events = s.stream(body, on_first=lambda: s.proc.send_signal(signal.SIGTERM))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 40
        assert s.proc.wait(timeout=30) == 0
        assert s.children() == []
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
