"""`kiln bench offline` on a tiny model: both scheduling modes run and print a throughput."""

import pytest

from kiln.cli import main


@pytest.mark.parametrize("extra", [[], ["--lockstep"]], ids=["default", "lockstep"])
def test_bench_offline_prints_throughput(hf_model_dir, capsys, extra):
    path, _ = hf_model_dir("qwen3")
    args = ["bench", "offline", "--model", str(path), "--device", "cpu", "--num-prompts", "6"]
    args += ["--input-len", "4", "20", "--output-len", "2", "6", *extra]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 requests" in out and "output tokens/s" in out


def test_bench_offline_rejects_bad_lengths(hf_model_dir, capsys):
    path, _ = hf_model_dir("qwen3")
    args = ["bench", "offline", "--model", str(path), "--input-len", "9", "3"]
    assert main(args) == 2
    assert "--input-len needs 1 <= MIN <= MAX" in capsys.readouterr().err
