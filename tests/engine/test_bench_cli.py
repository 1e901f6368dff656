"""`kiln bench offline` on a tiny model: both scheduling modes run and print a throughput."""

import json

import pytest

from kiln.cli import main
from kiln.eval.workload import fit_lengths


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


def test_bench_offline_fits_the_workload_to_a_short_context(hf_model_dir, capsys):
    """nano-vllm's default lengths (up to 2048 tokens) on a 64-token context: scaled, noted, run."""
    path, _ = hf_model_dir("qwen3")
    args = ["bench", "offline", "--model", str(path), "--device", "cpu", "--num-prompts", "4"]
    assert main([*args, "--max-model-len", "64"]) == 0
    out = capsys.readouterr().out
    note = "note: requests of up to 2048 tokens exceed max_model_len 64: input lengths scaled to "
    assert note + "U[3, 32], output to U[3, 32]" in out
    assert "4 requests" in out and "output tokens/s" in out


def test_bench_offline_fits_the_warmup_silently(hf_model_dir, capsys):
    """A workload that fits runs as asked, even where the warm-up's own lengths would not."""
    path, _ = hf_model_dir("qwen3")
    args = ["bench", "offline", "--model", str(path), "--device", "cpu", "--num-prompts", "4"]
    args += ["--input-len", "4", "20", "--output-len", "2", "6", "--max-model-len", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "4 requests" in out


def test_fit_lengths_keeps_the_longest_request_within_the_context():
    assert fit_lengths((100, 1024), (100, 1024), 4096) == ((100, 1024), (100, 1024))
    assert fit_lengths((100, 1024), (100, 1024), 128) == ((6, 64), (6, 64))
    assert fit_lengths((1, 3), (1, 1000), 2) == ((1, 1), (1, 1))
    for context in range(2, 300):
        (_, in_hi), (_, out_hi) = fit_lengths((16, 200), (4, 16), context)
        assert in_hi + out_hi <= context, context


def test_bench_offline_prints_speculative_acceptance(hf_model_dir, capsys):
    path, _ = hf_model_dir("qwen3")
    spec = json.dumps({"model": str(path), "num_speculative_tokens": 3})  # drafts for itself
    args = ["bench", "offline", "--model", str(path), "--device", "cpu", "--num-prompts", "3"]
    args += ["--input-len", "4", "20", "--output-len", "8", "12", "--speculative-config", spec]
    assert main([*args, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "speculative decoding:" in out
    assert "acceptance rate 1.000, mean acceptance length" in out and "by position [1.00," in out
