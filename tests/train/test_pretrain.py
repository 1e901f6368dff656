"""Pretraining: the shared loop, checkpoints, configs, data and the HF export (CPU, seconds)."""

import json
import math
import os
import subprocess

import pytest
import torch
from train.pretrain_helpers import make_corpus, tiny_model, token_file, train_config, windows

from kiln.cli import main as kiln_main
from kiln.errors import CheckpointError, ConfigError, InputError
from kiln.train import checkpoint
from kiln.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_checkpoint
from kiln.train.config import load_config
from kiln.train.data import TokenWindows, split_documents
from kiln.train.loop import lr_at, make_optimizer, train
from kiln.train.pretrain import lm_loss, run_pretrain


def losses(out_dir) -> dict[int, float]:
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


class Crash(Exception):
    pass


def crashing(batch_fn, at: int):
    """A batch function that dies at micro-step `at`, as a killed run would."""

    def get(i):
        if i >= at:
            raise Crash
        return batch_fn(i)

    return get


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    data = token_file(tmp_path / "tokens.bin")
    cfg = train_config(tmp_path / "full")
    train(tiny_model(dropout=0.1), cfg, windows(data, 4), lm_loss, windows(data, 4, seed=1))

    cut = train_config(tmp_path / "cut")
    with pytest.raises(Crash):
        train(tiny_model(dropout=0.1), cut, crashing(windows(data, 4), at=4), lm_loss)
    assert read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)[1]["step"] == "3"
    model = tiny_model(seed=123, dropout=0.1)  # different init: all of it must come from the ckpt
    train(model, cut, windows(data, 4), lm_loss, windows(data, 4, seed=1), resume=True)

    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]  # bitwise
    a, _ = read_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    b, _ = read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Accumulating micro-batches i*2, i*2+1 equals one batch holding the same rows."""
    data = token_file(tmp_path / "tokens.bin")
    small = windows(data, 2)

    def doubled(i):
        (x1, y1), (x2, y2) = small(2 * i), small(2 * i + 1)
        return torch.cat([x1, x2]), torch.cat([y1, y2])

    train(tiny_model(), train_config(tmp_path / "a", grad_accum=2, batch_size=2), small, lm_loss)
    train(tiny_model(), train_config(tmp_path / "b", batch_size=4), doubled, lm_loss)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for s in la:
        assert math.isclose(la[s], lb[s], rel_tol=1e-5), s


def test_a_write_killed_midway_leaves_the_last_checkpoint_usable(tmp_path, monkeypatch):
    model = tiny_model()
    opt = make_optimizer(model, train_config(tmp_path), torch.device("cpu"))
    path = tmp_path / CHECKPOINT_NAME
    checkpoint.save_checkpoint(path, model, opt, step=3)
    good = path.read_bytes()

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(checkpoint, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, model, opt, step=6)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left
    (tmp_path / f"{CHECKPOINT_NAME}.tmp999").write_bytes(b"left by kill -9")
    fresh = tiny_model(seed=1)
    opt = make_optimizer(fresh, train_config(tmp_path), torch.device("cpu"))
    assert load_checkpoint(path, fresh, opt)[0] == 3
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_a_run_removes_the_temp_files_of_killed_writes(tmp_path):
    data = token_file(tmp_path / "tokens.bin")
    run = tmp_path / "run"
    train(tiny_model(), train_config(run, max_steps=3), windows(data, 4), lm_loss)
    dead = subprocess.Popen(["true"])
    dead.wait()
    temps = {
        pid: run / f"{CHECKPOINT_NAME}.tmp{pid}" for pid in (dead.pid, os.getpid(), os.getppid())
    }
    not_ours = run / f"{CHECKPOINT_NAME}.tmp-notes"
    for p in [*temps.values(), not_ours]:
        p.write_bytes(b"half a checkpoint")
    train(tiny_model(), train_config(run, max_steps=4), windows(data, 4), lm_loss, resume=True)
    assert not temps[dead.pid].exists()  # its writer died: kill -9 mid-write
    assert not temps[os.getpid()].exists()  # an earlier process with this pid
    assert temps[os.getppid()].exists()  # a live process may be writing it
    assert not_ours.exists()
    assert read_checkpoint(run / CHECKPOINT_NAME)[1]["step"] == "4"


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    data = token_file(tmp_path / "tokens.bin")
    cfg = train_config(tmp_path / "run", max_steps=3)
    train(tiny_model(), cfg, windows(data, 4), lm_loss)
    ckpt = tmp_path / "run" / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="corrupt") as e:
        train(tiny_model(), cfg, windows(data, 4), lm_loss, resume=True)
    assert "\n" not in str(e.value)


def test_resume_into_another_shape_fails_and_keeps_the_checkpoint(tmp_path):
    data = token_file(tmp_path / "tokens.bin")
    cfg = train_config(tmp_path / "run", max_steps=3)
    train(tiny_model(), cfg, windows(data, 4), lm_loss)
    ckpt = tmp_path / "run" / CHECKPOINT_NAME
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="shape"):
        train(tiny_model(hidden_size=64), cfg, windows(data, 4), lm_loss, resume=True)
    with pytest.raises(CheckpointError, match="already exists"):
        train(tiny_model(), cfg, windows(data, 4), lm_loss)  # a fresh run over it
    assert ckpt.read_bytes() == before


def test_only_trainable_parameters_are_checkpointed(tmp_path):
    data = token_file(tmp_path / "tokens.bin")
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("layers.1.")
    frozen = model.embed_tokens.weight.clone()
    train(model, train_config(tmp_path / "run", max_steps=2), windows(data, 4), lm_loss)
    tensors, _ = read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    saved = {k.split(".", 1)[1] for k in tensors if k.startswith("model.")}
    assert saved and all(k.startswith("layers.1.") for k in saved)
    assert torch.equal(model.embed_tokens.weight, frozen)


def test_lr_warms_up_then_decays_to_min_lr(tmp_path):
    cfg = train_config(tmp_path, max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_batches_are_a_function_of_their_index(tmp_path):
    data = token_file(tmp_path / "tokens.bin")
    a, b = windows(data, 4)(7), windows(data, 4)(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # y is x shifted by one


def test_documents_go_whole_to_one_side(tmp_path):
    files = [tmp_path / f"d{i}.txt" for i in range(10)]
    train_docs, val_docs = split_documents(files, 0.2, seed=0)
    assert len(val_docs) == 2 and set(train_docs) | set(val_docs) == set(files)
    assert not set(train_docs) & set(val_docs)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nnum_layers = 3\n[train]\nout_dir = "x"\nmax_steps = 5\n')
    cfg = load_config(path, {"max_steps": "7", "train.lr": "1e-3", "compile": "true"})
    assert (cfg.model.num_layers, cfg.train.max_steps, cfg.train.lr) == (3, 7, 1e-3)
    assert cfg.train.compile is True and cfg.train.out_dir == "x"


def test_unknown_config_field_is_named(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmax_stepz = 5\n")
    with pytest.raises(ConfigError, match="'max_stepz'"):
        load_config(path)
    assert kiln_main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_stepz" in err and "\n" not in err
    with pytest.raises(ConfigError, match="'nope'"):
        load_config(None, {"nope": "1"})
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, {"max_steps": "many"})


def test_corpus_too_small_for_one_batch(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be.")
    cfg = load_config(None, {"corpus": str(corpus), "tokenizer": "char",
                             "out_dir": str(tmp_path / "run"), "block_size": 64})  # fmt: skip
    with pytest.raises(InputError, match="too few for one batch"):
        run_pretrain(cfg)
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_token_windows_refuse_a_file_shorter_than_a_window(tmp_path):
    data = token_file(tmp_path / "t.bin", n=10)
    with pytest.raises(InputError, match="block_size"):
        TokenWindows(data, "uint16", block_size=16, batch_size=1)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    import kiln

    make_corpus(tmp_path / "corpus")
    overrides = dict(
        corpus=str(tmp_path / "corpus"), tokenizer="bpe", vocab_size="300",
        out_dir=str(tmp_path / "run"), model_type=model_type, num_layers="2", num_heads="2",
        hidden_size="32", block_size="32", max_steps="4", batch_size="4", eval_interval="2",
        eval_steps="1", log_interval="2", ckpt_interval="2", device="cpu", dropout="0.1",
    )  # fmt: skip
    result = run_pretrain(load_config(None, overrides))
    out = tmp_path / "run" / "model"
    assert result["export"] == str(out) and math.isfinite(result["val_loss"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0

    ours = kiln.load_model(out, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = kiln.load_tokenizer(out)
    ids = torch.tensor([tok.encode("The king is dead. Long live the queen!")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("Fair is foul")["input_ids"] == tok.encode("Fair is foul")


@pytest.mark.parametrize("tokenizer", ["bpe", "char"])
def test_chatml_turn_markers_are_single_special_tokens_and_stop_generation(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    import kiln

    make_corpus(tmp_path / "corpus")
    overrides = dict(
        corpus=str(tmp_path / "corpus"), tokenizer=tokenizer, vocab_size="300",
        chat_template="chatml", out_dir=str(tmp_path / "run"), num_layers="1", num_heads="2",
        hidden_size="32", block_size="32", max_steps="1", batch_size="2", eval_steps="1",
        device="cpu",
    )  # fmt: skip
    run_pretrain(load_config(None, overrides))
    out = tmp_path / "run" / "model"
    tok = kiln.load_tokenizer(out)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": "Fair is foul"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|im_start|>user\nFair is foul<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids.count(start) == 2 and ids.count(end) == 1
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nFair is foul\nassistant\n"
    if tokenizer == "bpe":
        assert tok.vocab_size == 300  # the markers come out of the vocabulary budget
    assert {tok.eos_token_id, end} == tok.eos_token_ids  # a turn's end stops generation
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [
        tok.eos_token_id,
        end,
    ]


def test_unknown_chat_template_is_refused(tmp_path):
    make_corpus(tmp_path / "corpus")
    overrides = dict(corpus=str(tmp_path / "corpus"), out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="chat_template must be"):
        run_pretrain(load_config(None, overrides | {"chat_template": "llama2"}))
