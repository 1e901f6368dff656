"""Hostile and unlucky clients: stalled readers, uploads cut short, slowloris, SIGTERM with a
reader that never reads."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from serve.live_server import read_metrics, wait_all_blocks_free
from serve.test_cli_drain import free_port, wait_healthy

STREAM = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def _request(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return STREAM + b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)


def _stalled_readers(url: str, n: int, body: dict) -> list[socket.socket]:
    """Sockets that send a streaming request and never read a byte of the answer."""
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(_request(body))
        socks.append(s)
    return socks


def test_stalled_readers_do_not_hold_admission_slots(server):
    # each asks for n=8 x 60 tokens; 8 of them would fill the 64-sequence test server
    body = {"prompt": [5, 6, 7], "max_tokens": 60, "n": 8, "temperature": 1.0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    socks = _stalled_readers(server.url, 8, body)
    try:
        wait_all_blocks_free(server.url, timeout=60)  # the engine finished them all
        with httpx.Client(base_url=server.url, timeout=30) as http:
            r = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "n": 64})
            assert r.status_code == 200, r.text  # not 429: nothing is held for the sockets
    finally:
        for s in socks:
            s.close()


def test_client_gone_during_upload_is_a_quiet_disconnect(server, caplog):
    port = int(server.url.rsplit(":", 1)[1])
    errors_before = read_metrics(server.url).get(
        'kiln:request_success_total{finished_reason="error"}'
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(STREAM + b"Content-Length: 100000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
        time.sleep(0.2)
    time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert read_metrics(server.url).get(
        'kiln:request_success_total{finished_reason="error"}') == errors_before  # fmt: skip
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("protocol", ["GuardedH11Protocol", "GuardedHttpToolsProtocol"])
def test_slowloris_connections_are_closed(chat_model_dir, monkeypatch, protocol):
    from kiln.serve import server as srv
    from serve.live_server import ServerThread

    http = getattr(srv, protocol)
    assert http is not None  # httptools is a dependency
    monkeypatch.setattr(http, "header_timeout", 0.5)
    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.api import create_app

    app = create_app(AsyncLLM(str(chat_model_dir), max_num_seqs=4), "tiny")
    with ServerThread(app, http=http) as s:
        port = int(s.url.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        time.sleep(1.5)
        slow.sendall(b"X-More: 1\r\n")
        assert slow.recv(100) == b""  # closed by the server
        slow.close()
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200


def test_sigterm_with_a_stalled_reader_drains_then_exits_zero(chat_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(chat_model_dir),
           "--port", str(port), "--drain-timeout", "2", "--log-level", "warning"]  # fmt: skip
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        body = {"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True, "stream": True,
                "n": 32, "temperature": 1.0}  # fmt: skip
        socks = _stalled_readers(url, 1, body)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
            next(resp.iter_lines())  # a live stream too: the engine is busy for a while
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 1})
            assert busy.status_code == 503 and busy.headers["Retry-After"]
        start = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 15
        for s in socks:
            s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_stream_nobody_reads_is_aborted_after_the_send_timeout(chat_model_dir, caplog):
    from serve.live_server import start_server

    caplog.set_level(logging.INFO, logger="kiln.serve")
    # big chunks (logprobs) so the unread bytes fill the socket buffers and sends block
    body = {"prompt": [5, 6, 7], "max_tokens": 120, "n": 64, "temperature": 1.0,
            "logprobs": 20, "ignore_eos": True, "stream": True}  # fmt: skip
    with start_server(chat_model_dir, max_num_seqs=64, stream_send_timeout=0.5) as s:
        socks = _stalled_readers(s.url, 1, body)
        try:
            deadline = time.monotonic() + 30
            while not any("stopped reading" in r.message for r in caplog.records):
                assert time.monotonic() < deadline, "no stream was given up"
                time.sleep(0.1)
            wait_all_blocks_free(s.url)
            assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
        finally:
            for sock in socks:
                sock.close()


def test_without_a_tokenizer_token_ids_are_served_and_text_is_400(hf_model_dir):
    from serve.live_server import start_server

    path, _ = hf_model_dir("llama")  # config and weights only
    with start_server(path, max_num_seqs=4) as s, httpx.Client(base_url=s.url, timeout=30) as h:
        ok = h.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 0
        assert ok.json()["usage"]["completion_tokens"] == 3
        text = h.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"
        chat = h.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


def test_backlog_capped_by_somaxconn_is_named(tmp_path):
    from kiln.serve.server import backlog_warning

    cap = tmp_path / "somaxconn"
    cap.write_text("128\n")
    warning = backlog_warning(4096, str(cap))
    assert "somaxconn=128" in warning and "sysctl -w net.core.somaxconn=4096" in warning
    assert backlog_warning(128, str(cap)) is None
    assert backlog_warning(4096, str(tmp_path / "absent")) is None


def test_bad_backlog_is_a_one_line_error(capsys):
    from kiln.cli import main

    assert main(["serve", "--model", "nowhere", "--backlog", "0"]) != 0
    assert "--backlog must be >= 1, got 0" in capsys.readouterr().err
