"""`kiln bench ablate` at tiny sizes on CPU: every row runs, the baselines give kiln's greedy
tokens, and the memory numbers follow from the workload."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.eval.ablate import BASELINES, ENGINE_VARIANTS, memory_waste

TINY = ["--latency-prompt", "12", "--latency-tokens", "6", "--num-prompts", "6",
        "--input-len", "4", "40", "--output-len", "2", "12", "--prefix-len", "40",
        "--prefix-requests", "4", "--suffix-len", "4", "--prefix-output", "3",
        "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "4",
        "--repeat", "1", "--kv-prompt", "12", "--kv-tokens", "5", "--kv-batch", "3"]  # fmt: skip


def test_memory_waste():
    work = [([1] * 10, 6), ([1] * 3, 1)]  # 16 and 4 tokens
    m = memory_waste(work, block_size=8, max_model_len=64)
    assert m["paged_waste"] == pytest.approx(1 - 20 / 24)
    assert m["contiguous_waste"] == pytest.approx(1 - 20 / 128)


def test_ablate_cli_on_cpu(hf_model_dir, tmp_path, capsys):
    path, _ = hf_model_dir("llama")
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    assert main(["bench", "ablate", "--model", str(path), *TINY, "--json", str(out),
                 "--plot", str(png)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    rows = {row["row"]: row for row in r["rows"]}
    names = [n for n, _, _ in ENGINE_VARIANTS] + BASELINES
    want = {"kiln (all on)"} | {f"without {n}" for n in names}
    assert set(rows) == want
    for name, _, needs_cuda in ENGINE_VARIANTS:
        row = rows[f"without {name}"]
        if needs_cuda:
            assert row["note"] == "n/a: needs CUDA" and "latency_s" not in row
        else:
            assert row["greedy_same"] and row["throughput_speedup"] > 0
    assert rows["without KV cache"]["greedy_same"] and rows["without KV cache"]["latency_speedup"]
    assert rows["without paged KV"]["throughput_speedup"] > 0
    static = rows["without continuous batching"]
    assert static["output_tokens"] == rows["kiln (all on)"]["output_tokens"]
    assert 0 <= r["memory"]["paged_waste"] < r["memory"]["contiguous_waste"] < 1
    text = capsys.readouterr().out
    assert "| without prefix caching |" in text and "contiguous" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_ablate_rejects_unknown_rows(hf_model_dir, capsys):
    path, _ = hf_model_dir("llama")
    assert main(["bench", "ablate", "--model", str(path), "--only", "warp drive"]) == 2
    assert "unknown row 'warp drive'" in capsys.readouterr().err


def test_ablate_speculative_decoding_row(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    out = tmp_path / "a.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 2}'
    argv = ["bench", "ablate", "--model", str(path), *TINY, "--speculative-config", spec,
            "--only", "speculative decoding", "quantization", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["without speculative decoding"]["greedy_same"]  # speculation is lossless
    assert rows["without quantization"]["note"] == "n/a: not on in this run"


def test_workloads_shrink_to_the_context():
    from kiln.eval.ablate import Workloads

    w = Workloads()
    w.fit(200)
    assert w.latency_prompt + w.latency_tokens <= 200 and w.latency_prompt == w.latency_tokens
    assert w.kv_prompt + w.kv_tokens <= 200 and w.kv_prompt > w.kv_tokens
    assert w.input_len[1] + w.output_len[1] <= 200
    assert w.prefix_len + w.suffix_len + w.prefix_output <= 200
    shared, reqs = w.prefix(rep=1)
    assert all(r[: len(shared)] == shared for r in reqs) and shared != w.prefix(rep=0)[0]


def test_kv_loops_match_kiln_generate(hf_model_dir):
    import torch

    import kiln
    from kiln.eval.ablate import Workloads, loop_latency
    from kiln.generate import generate

    path, _ = hf_model_dir("llama")
    model = kiln.load_model(path, dtype="float32", device="cpu")
    w = Workloads(kv_prompt=10, kv_tokens=6, kv_batch=2, vocab=200)
    _, cached = loop_latency(model, w, kv_cache=True, rep=1)
    _, recompute = loop_latency(model, w, kv_cache=False, rep=1)
    want = generate(model, torch.tensor(w.kv(1)), 6)[:, 10:].tolist()
    assert cached == recompute == want
