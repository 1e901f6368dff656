"""kiln.eval.perplexity against the transformers documentation's sliding-window loop run on the
Hugging Face model itself, and `kiln eval ppl` end to end."""

import json
import math

import pytest
import torch
from tiny_models import VOCAB

import kiln
from kiln.cli import main
from kiln.eval import perplexity


def docs_perplexity(model, input_ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of "Perplexity of fixed-length models" (transformers docs), line for line, but
    for one count: the docs subtract batch_size from every window's labelled tokens (the label
    shift), which is right only where the window's first token is labelled; here the count is the
    labels left after the shift, so each window's mean loss is multiplied back exactly."""
    seq_len = input_ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return torch.exp(nll_sum / n_tokens).item()


@pytest.fixture(scope="module")
def llama(hf_model_dir):
    path, hf = hf_model_dir("llama")
    return kiln.load_model(path, dtype="float32", device="cpu"), hf.float().eval()


@pytest.mark.parametrize("max_len,stride", [(64, 24), (64, 64), (256, 100)])
def test_perplexity_matches_transformers_docs_loop(llama, max_len, stride):
    model, hf = llama
    ids = torch.randint(0, VOCAB, (1, 203), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids[0].tolist(), max_len=max_len, stride=stride, progress=False)
    assert r["tokens"] == 203 - (1 if stride < max_len else -(-203 // stride))
    assert r["perplexity"] == pytest.approx(docs_perplexity(hf, ids, max_len, stride), rel=1e-5)


def test_perplexity_rejects_bad_windows(llama):
    model, _ = llama
    with pytest.raises(kiln.errors.InputError, match="stride"):
        perplexity(model, [1, 2, 3], max_len=8, stride=9, progress=False)
    with pytest.raises(kiln.errors.InputError, match="context"):
        perplexity(model, [1, 2, 3], max_len=257, stride=8, progress=False)
    with pytest.raises(kiln.errors.InputError, match="2 tokens"):
        perplexity(model, [1], max_len=8, stride=8, progress=False)


@pytest.fixture(scope="module")
def model_dir(tokenized_model_dir):
    return tokenized_model_dir("llama")


def test_eval_ppl_cli_writes_json(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", "--model", str(model_dir), "--text", str(text)]
    assert main([*argv, "--max-len", "32", "--stride", "16", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) == {"task", "perplexity", "bits_per_byte", "tokens"} and r["perplexity"] > 1
    assert f"{r['perplexity']:.4f}" in capsys.readouterr().out
    ids = kiln.load_tokenizer(model_dir).encode(text.read_text())
    model = kiln.load_model(model_dir, dtype="float32", device="cpu")
    want = perplexity(model, ids, max_len=32, stride=16, progress=False)
    nats = want["nll"] * want["tokens"]
    assert r == {"task": "ppl", "perplexity": pytest.approx(want["perplexity"]),
                 "bits_per_byte": pytest.approx(nats / math.log(2) / len(text.read_bytes())),
                 "tokens": want["tokens"]}  # fmt: skip


@pytest.mark.parametrize(
    "extra,text,message",
    [
        ([], None, "no such file"),
        ([], "", "empty"),
        (["--stride", "0"], "hello there", "stride"),
        (["--max-len", "16", "--stride", "17"], "hello there", "stride"),
        (["--max-len", "257"], "hello there", "context"),
    ],
)
def test_eval_ppl_cli_bad_input_is_one_line(model_dir, tmp_path, capsys, extra, text, message):
    path = tmp_path / "t.txt"
    if text is not None:
        path.write_text(text)
    assert main(["eval", "ppl", "--model", str(model_dir), "--text", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
