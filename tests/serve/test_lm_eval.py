"""lm-evaluation-harness against a live server: its `local-completions` model must score a
local multiple-choice task (and generate for a local generation task) exactly as its `hf`
model does on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "lm_eval_task"


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """The tasks of lm_eval_task/ with their data file's absolute path filled in."""
    from lm_eval.tasks import TaskManager

    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for src in TASKS.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        cfg["dataset_kwargs"]["data_files"]["test"] = str(TASKS / "tiny_mc.json")
        (out / src.name).write_text(yaml.safe_dump(cfg))
    return TaskManager(include_path=str(out), include_defaults=False)


def evaluate(model: str, model_args: dict, task: str, task_manager):
    """lm-eval's results for `task` and its per-document responses."""
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=task_manager,
        log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    )  # fmt: skip
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


@pytest.fixture(scope="module")
def hf_args(chat_model_dir):
    return {"pretrained": str(chat_model_dir), "dtype": "float32", "device": "cpu"}


@pytest.mark.parametrize("tokenizer", ["huggingface", "remote"])
def test_local_completions_log_likelihoods_match_hf(
    server, chat_model_dir, task_manager, hf_args, tokenizer
):
    args = {"base_url": f"{server.url}/v1/completions", "model": "tiny",
            "tokenizer_backend": tokenizer, "tokenized_requests": True,
            "max_retries": 1}  # fmt: skip
    if tokenizer == "huggingface":  # the checkpoint's tokenizer; "remote": the server's /tokenize
        args["tokenizer"] = str(chat_model_dir)
    served, served_samples = evaluate("local-completions", args, "kiln_tiny_mc", task_manager)
    ref, ref_samples = evaluate("hf", hf_args, "kiln_tiny_mc", task_manager)
    assert served["acc,none"] == ref["acc,none"]
    assert len(served_samples) == len(ref_samples) == 8
    for got, want in zip(served_samples, ref_samples):
        assert len(got["resps"]) == len(want["resps"]) == 4  # one (logprob, is_greedy) a choice
        for [(lp, greedy)], [(ref_lp, ref_greedy)] in zip(got["resps"], want["resps"]):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert greedy == ref_greedy


def test_local_completions_generations_match_hf(server, chat_model_dir, task_manager, hf_args):
    args = {"base_url": f"{server.url}/v1/completions", "model": "tiny",
            "tokenizer_backend": "huggingface", "tokenizer": str(chat_model_dir),
            "tokenized_requests": False, "max_retries": 1}  # fmt: skip
    served, served_samples = evaluate("local-completions", args, "kiln_tiny_gen", task_manager)
    ref, ref_samples = evaluate("hf", hf_args, "kiln_tiny_gen", task_manager)
    got = [s["resps"][0][0] for s in served_samples]
    want = [s["resps"][0][0] for s in ref_samples]
    assert got == want and any(got)
    assert served["exact_match,none"] == ref["exact_match,none"]
