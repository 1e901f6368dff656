"""kiln distill: a student with fewer layers and a smaller width gets closer to its teacher, on
the fly or from the top-k cache; the KL and the layer map; one-line errors."""

import json

import pytest
import torch
from tiny_models import save_permutation_model
from train.pretrain_helpers import make_corpus

from kiln.cli import main
from kiln.compress.config import DistillConfig, TextData
from kiln.compress.distill import distill, kl_to_teacher, layer_map, student_config
from kiln.config import ModelConfig
from kiln.model.loader import load_model
from kiln.model.transformer import Transformer
from kiln.train.config import FinetuneConfig

SMALL = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


@pytest.fixture(scope="module")
def teacher_dir(tokenized_model_dir, tmp_path_factory):
    """A decisive teacher: the tiny llama trained to follow a token permutation."""
    return save_permutation_model(tokenized_model_dir("llama"), tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("text") / "corpus")


def run(steps: int, out) -> FinetuneConfig:
    return FinetuneConfig(out_dir=str(out), max_steps=steps, batch_size=4, lr=1e-2,
                          warmup_steps=2, eval_interval=steps, eval_steps=1, log_interval=1,
                          device="cpu")  # fmt: skip


def probe(corpus, tok, n: int = 64) -> torch.Tensor:
    text = (corpus / "doc0.txt").read_text()
    return torch.tensor([tok.encode(text, add_special_tokens=False)[:n]])


def kl(teacher, student, ids) -> float:
    with torch.no_grad():
        return kl_to_teacher(student(ids), teacher(ids), 1.0).item()


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=1.0),
        dict(alpha=0.5, hidden_weight=1.0),  # a learned projection 32 -> 64 per matched layer
        dict(alpha=1.0, top_k=384),  # top-k cache (with teacher_cache, set below)
    ],
    ids=["on-the-fly", "hidden-states", "cached"],
)
def test_distillation_lowers_kl_to_the_teacher(teacher_dir, corpus, tmp_path, options):
    import kiln

    if "top_k" in options:
        options = options | {"teacher_cache": str(tmp_path / "cache")}
    teacher = load_model(teacher_dir, device="cpu")
    config, weights = student_config(teacher.config, json.dumps(SMALL))
    assert weights is None and (config.num_layers, config.hidden_size) == (1, 32)
    torch.manual_seed(0)
    fresh = Transformer(config)
    fresh.init_weights()
    out = tmp_path / "student"
    result = distill(teacher_dir, json.dumps(SMALL), out, DistillConfig(**options),
                     run(30, tmp_path / "run"), TextData(str(corpus), seq_len=32))  # fmt: skip
    student = load_model(out, device="cpu")
    ids = probe(corpus, kiln.load_tokenizer(out))
    assert kl(teacher, student, ids) < 0.5 * kl(teacher, fresh, ids)
    assert student.num_parameters() < teacher.num_parameters()
    assert "val_loss" in result and (out / "tokenizer.json").is_file()
    if "teacher_cache" in options:
        assert (tmp_path / "cache" / "train" / "values.npy").is_file()


def test_kl_from_a_full_top_k_cache_equals_the_kl_on_the_fly():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 50, generator=gen), 3 * torch.randn(2, 5, 50, generator=gen)
    top = torch.topk(t, 50, dim=-1)
    full = kl_to_teacher(s, t, 2.0)
    torch.testing.assert_close(kl_to_teacher(s, (top.values, top.indices), 2.0), full)
    assert kl_to_teacher(t, t, 2.0).abs() < 1e-6


def test_student_layers_are_matched_to_evenly_spaced_teacher_layers():
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(3, 12) == [3, 7, 11]
    assert layer_map(4, 4) == [0, 1, 2, 3]


def test_a_student_directory_starts_from_its_weights(teacher_dir, corpus, tmp_path):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_dir), "--student", str(teacher_dir),
                 "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--corpus", str(corpus), "--device", "cpu"]) == 0  # fmt: skip
    teacher = load_model(teacher_dir, device="cpu")
    student = load_model(out, device="cpu")
    w0, w1 = teacher.layers[0].mlp.up_proj.weight, student.layers[0].mlp.up_proj.weight
    assert 0 < (w1 - w0).abs().max() < 0.05  # moved a little from the teacher's weights


def test_a_student_config_overrides_the_teachers(tmp_path):
    teacher = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 384, "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 4,
                                   "num_attention_heads": 4, "head_dim": 16})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2}))
    config, _ = student_config(teacher, str(tmp_path))
    assert (config.hidden_size, config.head_dim, config.num_layers) == (32, 8, 2)
    assert config.intermediate_size == 128 and config.vocab_size == 384


@pytest.mark.parametrize(
    "student, args, message",
    [
        ('{"vocab_size": 512}', [], "student vocab_size 512 differs from the teacher's 384"),
        ("no/such/dir", [], "not a model directory, a JSON config file or JSON"),
        ("{}", ["--alpha", "1.5"], "--alpha 1.5 must be in [0, 1]"),
        ("{}", ["--temperature", "0"], "--temperature 0.0 must be > 0"),
        ("{}", ["--hidden-weight", "1", "--teacher-cache", "c"], "needs the teacher on the fly"),
    ],
)
def test_bad_input_is_a_one_line_error(teacher_dir, tmp_path, capsys, student, args, message):
    out = tmp_path / "bad"
    argv = ["distill", "--teacher", str(teacher_dir), "--student", student, "--out", str(out)]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
