"""scripts/profile_kernel.sh and the launcher it runs under Nsight Compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "benchmarks" / "kernel_launch.py"
KERNELS = ["paged_decode_attention", "varlen_prefill_attention", "rmsnorm", "silu_and_mul",
           "rope", "store_kvcache"]  # fmt: skip


@pytest.mark.parametrize("kernel", KERNELS)
def test_launcher_runs_each_kernel_against_its_reference(kernel):
    result = subprocess.run(
        [sys.executable, str(LAUNCH), kernel, "--batch", "2", "--ctx", "20", "--launches", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "output matches the reference" in result.stdout


def test_profile_kernel_without_ncu_says_so_in_one_line(tmp_path):
    env = os.environ | {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    env.pop("NCU", None)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "profile_kernel.sh"), "rmsnorm"],
                            capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert "ncu" in result.stderr and result.stderr.count("\n") == 1
