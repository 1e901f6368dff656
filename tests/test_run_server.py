"""run_server.sh: a thin wrapper that hands its arguments to `kiln serve`."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_server_help_is_kiln_serve_usage(tmp_path):
    # a PATH without kiln and a python that imports this checkout: the last fallback runs
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        ["bash", str(ROOT / "run_server.sh"), "--help"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: kiln serve" in result.stdout and "--model" in result.stdout
    assert os.access(ROOT / "run_server.sh", os.X_OK)
