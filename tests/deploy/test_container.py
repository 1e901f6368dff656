"""The container without a container (no Docker engine on the CI machine): the entrypoint serves a
mounted model directory and refuses a missing one in one line; the Dockerfile is checked by a
parse of its instructions (and hadolint where installed)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"


def kiln_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has a `kiln` that runs this checkout (as the image's has)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kiln = bin_dir / "kiln"
    kiln.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kiln.cli "$@"\n')
    kiln.chmod(0o755)
    return os.environ | {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mount", ["missing", "empty"])
def test_entrypoint_refuses_a_missing_model_mount_in_one_line(tmp_path, mount):
    model = tmp_path / "model"
    if mount == "empty":
        model.mkdir()
    env = kiln_on_path(tmp_path) | {"KILN_MODEL": str(model)}
    result = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(model) in result.stderr, result.stderr


def test_entrypoint_serves_the_mounted_model(tmp_path, tokenized_model_dir):
    port = free_port()
    env = kiln_on_path(tmp_path) | {
        "KILN_MODEL": str(tokenized_model_dir("llama")), "KILN_HOST": "127.0.0.1",
        "KILN_PORT": str(port), "KILN_MODEL_NAME": "tiny",
    }  # fmt: skip
    cmd = ["bash", str(ENTRYPOINT), "--max-num-seqs", "4"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # what the image's HEALTHCHECK asks
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "no /health in 120 s"
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        out = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                         timeout=60).json()  # fmt: skip
        assert out["usage"]["completion_tokens"] == 4
        assert "kiln:num_requests_running" in httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)  # exec'd: the signal reaches kiln serve itself
        assert proc.wait(timeout=60) == 0


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_the_entrypoint_as_a_non_root_user_with_a_health_check():
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    known = {"ARG", "FROM", "ENV", "RUN", "COPY", "USER", "WORKDIR", "EXPOSE", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "LABEL"}  # fmt: skip
    assert {w for w, _ in steps} <= known
    kinds = [w for w, _ in steps]
    args = dict(s for s in steps if s[0] == "USER")
    assert args["USER"] not in ("root", "0")
    user_at = kinds.index("USER")
    assert "ENTRYPOINT" in kinds[user_at:], "the server must start after USER"
    health = next(a for w, a in steps if w == "HEALTHCHECK")
    assert "/health" in health and "${KILN_PORT}" in health
    assert next(a for w, a in steps if w == "ENTRYPOINT") == '["kiln-entrypoint"]'
    copies = " ".join(a for w, a in steps if w == "COPY")
    assert "deploy/entrypoint.sh" in copies
    for src in re.findall(r"(?:^|\s)((?:src|deploy|pyproject|README)\S*)", copies):
        assert (ROOT / src).exists(), src
    # both variants name a base stage that exists
    stages = {a.split(" AS ")[1] for w, a in steps if w == "FROM" and " AS " in a}
    assert {"base-cuda", "base-cpu"} <= stages
    assert any(w == "FROM" and a == "base-${VARIANT}" for w, a in steps)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_accepts_the_dockerfile():
    result = subprocess.run(["hadolint", "--failure-threshold", "error", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout
