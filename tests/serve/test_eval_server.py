"""`kiln eval` against a live kiln server (--base-url): the same numbers as in process."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.eval import tasks
from kiln.eval.backends import LocalBackend, OpenAIBackend
from kiln.eval.score import run_mc, run_ppl


@pytest.fixture(scope="module")
def local(chat_model_dir):
    return LocalBackend(str(chat_model_dir), dtype="float32", device="cpu")


def test_mc_through_the_server_equals_in_process(server, local):
    rows = tasks.load(tasks.BUNDLED_DIR / "shakespeare_next_line.jsonl", "mc")[:4]
    remote = OpenAIBackend(server.url)  # tokenized by the server's /tokenize
    assert remote.max_len == local.max_len
    got, want = run_mc(remote, rows, progress=False), run_mc(local, rows, progress=False)
    assert got["acc"] == want["acc"] and got["acc_norm"] == want["acc_norm"]
    for g, w in zip(got["loglikelihoods"], want["loglikelihoods"]):
        assert g == pytest.approx(w, abs=1e-4)


def test_ppl_through_the_server_equals_in_process(server, chat_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 6)
    out_remote, out_local = tmp_path / "r.json", tmp_path / "l.json"
    argv = ["eval", "ppl", "--text", str(text), "--max-len", "48", "--stride", "20"]
    assert main([*argv, "--base-url", f"{server.url}/v1", "--json", str(out_remote)]) == 0
    assert main([*argv, "--model", str(chat_model_dir), "--json", str(out_local)]) == 0
    remote, local_ = (json.loads(p.read_text()) for p in (out_remote, out_local))
    assert remote["tokens"] == local_["tokens"]
    assert remote["perplexity"] == pytest.approx(local_["perplexity"], rel=1e-4)
    assert remote["bits_per_byte"] == pytest.approx(local_["bits_per_byte"], rel=1e-4)


def test_run_ppl_matches_kiln_eval_perplexity(local):
    import kiln
    from kiln.eval.ppl import perplexity

    text = "So foul and fair a day I have not seen. " * 5
    r = run_ppl(local, text, 40, 16, progress=False)
    model = kiln.load_model(local.path, dtype="float32", device="cpu")
    want = perplexity(model, local.encode(text, special=True), 40, 16, progress=False)
    assert r["tokens"] == want["tokens"]
    assert r["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)


def test_gen_through_the_server_equals_in_process(server, local):
    from kiln.eval.score import run_gen

    rows = tasks.load(tasks.BUNDLED_DIR / "shakespeare_continue.jsonl", "gen")[:3]
    kw = dict(metrics=("exact_match", "rouge_l"), max_tokens=8, progress=False)
    got, want = run_gen(OpenAIBackend(server.url), rows, **kw), run_gen(local, rows, **kw)
    assert got["outputs"] == want["outputs"] and any(want["outputs"])
    assert got["rouge_l"] == want["rouge_l"]
