"""KILN_STEP_TRACE: one line per engine step, read back by benchmarks/step_trace_report.py."""

import json
import sys
from pathlib import Path

from kiln.engine import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from step_trace_report import load, summarize  # noqa: E402


def test_step_trace_records_every_step(hf_model_dir, random_prompts, tmp_path, monkeypatch):
    path, _ = hf_model_dir("llama")
    monkeypatch.setenv("KILN_STEP_TRACE", str(tmp_path))
    llm = LLM(str(path), device="cpu", max_num_batched_tokens=40)
    prompts = random_prompts((30, 20, 5))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts, sampling_params=params)
    trace = llm.engine.core.trace
    trace.write()
    (f,) = tmp_path.glob("steps-*.jsonl")
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    ran = [r for r in rows if r.get("seqs")]
    # every prompt token was scheduled once, then one token per generated token but the last
    assert sum(r["tokens"] for r in ran) == 55 + 3 * 5
    assert sum(r["deltas"] for r in rows) == 3 * 6
    assert all(r["graph"] is None for r in ran)  # CPU: eager
    assert any(r["decodes"] < r["seqs"] for r in ran)  # the 40-token budget mixes steps
    s = summarize(load(tmp_path))
    assert s["steps"] == len(rows) and s["eager"] == len(ran) and s["graph"] == 0
    assert s["span_s"] >= s["idle_s"] >= 0
    # the time blocked on a step's tokens is part of the step (none on the CPU: no event)
    assert all(0 <= r["gpu_wait"] <= r["end"] - r["start"] for r in rows)
