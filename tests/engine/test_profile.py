"""`kiln profile`: a Chrome trace of engine steps and the ops that took the most time."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.engine.profile import profile_engine


def test_profile_traces_every_engine_step(hf_model_dir, tmp_path):
    model, _ = hf_model_dir("llama")
    r = profile_engine(str(model), batch=3, steps=5, prompt_len=20, out=tmp_path, max_num_seqs=4)
    events = json.loads(r["trace"].read_text())["traceEvents"]
    step_ranges = {e["name"] for e in events if e.get("name", "").startswith("engine_step_")}
    assert len(step_ranges) == r["steps"] >= 6  # a prefill step and 5 decode steps at least
    names = [op["name"] for op in r["ops"]]
    assert "aten::mm" in names or "aten::addmm" in names
    assert not any(n.startswith("engine_step_") for n in names)
    selfs = [op["self_us"] for op in r["ops"]]
    assert selfs == sorted(selfs, reverse=True) and selfs[0] > 0
    assert sum(op["share"] for op in r["ops"]) == pytest.approx(1.0)


def test_profile_mixed_steps_prefill_one_arrival_beside_the_decodes(hf_model_dir, tmp_path):
    """--mixed: after the batch's prefill, every profiled step carries the batch's decodes
    and one arriving request's whole prompt (it ends after its first token)."""
    model, _ = hf_model_dir("llama")
    plain = profile_engine(str(model), batch=3, steps=4, prompt_len=12, out=tmp_path,
                           max_num_seqs=4)  # fmt: skip
    r = profile_engine(str(model), batch=3, steps=4, prompt_len=12, out=tmp_path,
                       max_num_seqs=4, mixed=True)  # fmt: skip
    kinds = {k: v for k, v in r["graphs"].items() if k != "with prefill"}
    assert r["steps"] == plain["steps"] and sum(kinds.values()) == r["steps"]
    assert r["graphs"]["with prefill"] == 4 and "with prefill" not in plain["graphs"]
    assert "one 12-token request arriving a step" in r["summary"]
    events = json.loads(r["trace"].read_text())["traceEvents"]
    assert (
        len({e["name"] for e in events if e.get("name", "").startswith("engine_step_")})
        == (r["steps"])
    )
    with pytest.raises(Exception, match="arriving"):
        profile_engine(str(model), batch=4, steps=2, prompt_len=8, out=tmp_path,
                       max_num_seqs=4, mixed=True)  # fmt: skip


def test_profile_cli_prints_the_top_ops(tokenized_model_dir, tmp_path, capsys):
    model = tokenized_model_dir("llama")
    argv = ["profile", "--model", str(model), "--batch", "2", "--steps", "3", "--prompt-len", "8",
            "--top", "5", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "top 5 ops by self CPU time" in out
    table = out.split("us/call\n")[1].split("\nChrome trace")[0].splitlines()
    assert len(table) == 5
    assert (tmp_path / "trace.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [(["--steps", "0"], "--steps must be >= 1"),
     (["--prompt-len", "100000"], "exceeds the context")],
)  # fmt: skip
def test_profile_refuses_bad_sizes_in_one_line(hf_model_dir, tmp_path, capsys, flags, message):
    model, _ = hf_model_dir("llama")
    assert main(["profile", "--model", str(model), "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.gpu
def test_profile_on_cuda_reports_kernel_time(hf_model_dir, tmp_path):
    model, _ = hf_model_dir("llama")
    r = profile_engine(str(model), batch=4, steps=8, prompt_len=32, out=tmp_path, device="cuda")
    assert r["device_kind"] == "cuda" and r["ops"] and r["ops"][0]["self_us"] > 0


def test_step_times_give_each_step_the_kernels_it_launched():
    """Kernels go to the step whose range holds their launch (matched by correlation id),
    even when they run after the next step began (async scheduling); a graph launch's
    kernels all go to its step."""
    from kiln.engine.profile import format_step_times, step_times

    def step(i, ts, dur):
        return {"ph": "X", "cat": "user_annotation", "name": f"engine_step_{i}", "ts": ts,
                "dur": dur}  # fmt: skip

    def launch(corr, ts, name="cudaLaunchKernel"):
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": 1,
                "args": {"correlation": corr}}  # fmt: skip

    def kernel(corr, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur,
                "args": {"correlation": corr}}  # fmt: skip

    events = [
        step(0, 0, 1000), step(1, 1000, 500), step(2, 1500, 700),
        launch(1, 100), kernel(1, 150, 300),  # step 0's, run inside it
        launch(2, 900), kernel(2, 1100, 2000),  # step 0's, run during step 1
        launch(3, 1200, "cudaGraphLaunch"), kernel(3, 3100, 400), kernel(3, 3500, 600),
        launch(4, 1600), kernel(4, 4100, 250),
    ]  # fmt: skip
    got = step_times({"traceEvents": events}, ["eager", "mixed", "mixed"])
    assert got["eager"] == {"steps": 1, "cpu_ms": 1.0, "gpu_ms": 2.3}
    assert got["mixed"]["steps"] == 2
    assert got["mixed"]["gpu_ms"] == pytest.approx((1.0 + 0.25) / 2)
    assert got["mixed"]["cpu_ms"] == pytest.approx(0.6)
    line = format_step_times(got, on_device=True)
    assert "eager x1: CPU 1.00 / GPU kernels 2.30" in line and "mixed x2" in line
    assert "GPU" not in format_step_times(got, on_device=False)


def test_profile_reports_each_kind_of_step(hf_model_dir, tmp_path):
    model, _ = hf_model_dir("llama")
    r = profile_engine(str(model), batch=2, steps=3, prompt_len=8, out=tmp_path, max_num_seqs=4)
    assert sum(v["steps"] for v in r["step_times"].values()) == r["steps"]
    assert all(v["cpu_ms"] > 0 for v in r["step_times"].values())
    assert "median ms a step by kind: " in r["summary"]
