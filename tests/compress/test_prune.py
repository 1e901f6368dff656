"""kiln prune (unstructured and N:M): masks of the asked sparsity and pattern, Wanda's per-row
comparison, SparseGPT's update, the recovery fine-tune, and one-line errors."""

import pytest
import torch
from train.pretrain_helpers import make_corpus

from kiln.cli import main
from kiln.compress.config import PruneConfig, TextData
from kiln.compress.prune import prune, prune_mask
from kiln.compress.sparsegpt import sparsegpt
from kiln.model.loader import load_model
from kiln.quant.gptq import Hessian
from kiln.quant.quantize import linears
from kiln.train.config import FinetuneConfig

CALIB = dict(calib_samples=4, calib_len=64)


@pytest.fixture(scope="module")
def model_dir(tokenized_model_dir):
    return tokenized_model_dir("llama")


def decoder_weights(model_dir):
    model = load_model(model_dir, device="cpu")
    return {
        f"layers.{i}.{n}": lin.weight
        for i, layer in enumerate(model.layers)
        for n, lin in linears(layer).items()
    }


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_masks_have_the_asked_sparsity(model_dir, tmp_path, method, sparsity):
    out = prune(model_dir, tmp_path / "p", PruneConfig(method, sparsity, **CALIB))
    for name, w in decoder_weights(out).items():
        zeros = (w == 0).sum(1)  # [out]
        if method == "wanda":  # compared within each output row: every row loses its share
            assert (zeros == int(w.shape[1] * sparsity)).all(), name
        else:  # magnitude over the Linear; SparseGPT over each 128-column block (one here)
            assert zeros.sum() == int(w.numel() * sparsity), name
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_masks_keep_n_in_every_m_inputs(model_dir, tmp_path, method, pattern):
    n, m = map(int, pattern.split(":"))
    out = prune(model_dir, tmp_path / "p", PruneConfig(method, pattern=pattern, **CALIB))
    for name, w in decoder_weights(out).items():
        nonzeros = (w != 0).reshape(w.shape[0], -1, m).sum(-1)  # [out, in / M]
        assert (nonzeros == n).all(), name


def test_wanda_scores_weights_by_their_input_norm_within_each_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    norms = torch.tensor([8.0, 4.0, 2.0, 1.0])  # |W| * ||X||: row 0 scores 8, 8, 6, 4
    mask = prune_mask(w * norms, 0.5, None, per_row=True)
    assert mask.tolist() == [[False, False, True, True], [False, False, True, True]]
    # by magnitude over the matrix, row 0 would go whole: the reason Wanda compares per row
    assert prune_mask(w, 0.5, None, per_row=False)[0].all()


def outlier_inputs(n=2048, d=128, seed=0):
    """Correlated inputs with a few large channels, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) @ (torch.randn(d, d, generator=gen) / d**0.5)
    x[:, [3, 40, 77]] *= 20
    return x, 0.05 * torch.randn(64, d, generator=gen)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_and_sparsegpt_keep_outputs_closer_than_magnitude(nm):
    x, w = outlier_inputs()
    h = Hessian(w.shape[1])
    h.add(x)
    norms = x.pow(2).sum(0).sqrt()

    def error(pruned):
        return (x @ (w - pruned).t()).norm()

    magnitude = w.masked_fill(prune_mask(w.abs(), 0.5, nm, per_row=False), 0)
    wanda = w.masked_fill(prune_mask(w.abs() * norms, 0.5, nm, per_row=True), 0)
    obs = sparsegpt(w, h.h, 0.5, nm)
    assert (obs == 0).float().mean() == 0.5
    assert error(obs) < error(wanda) < 0.8 * error(magnitude)


def test_recovery_fine_tune_trains_the_survivors_and_keeps_the_zeros(model_dir, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    train = FinetuneConfig(max_steps=99, batch_size=2, lr=1e-3, eval_interval=2, eval_steps=1,
                           log_interval=1, device="cpu")  # fmt: skip
    cfg = PruneConfig("wanda", 0.5, recover_steps=3, **CALIB)
    out = prune(model_dir, tmp_path / "p", cfg, train, TextData(str(corpus), seq_len=32))
    plain = prune(model_dir, tmp_path / "q", PruneConfig("wanda", 0.5, **CALIB))
    tuned, pruned = decoder_weights(out), decoder_weights(plain)
    for name, w in tuned.items():
        assert torch.equal(w == 0, pruned[name] == 0), name
    assert any(not torch.equal(w, pruned[n]) for n, w in tuned.items())
    assert (out / "run" / "log.jsonl").is_file()


def test_cli_prunes_to_2_4_and_the_model_generates(model_dir, tmp_path, capsys):
    out = tmp_path / "p24"
    argv = ["prune", "--model", str(model_dir), "--out", str(out), "--method", "sparsegpt",
            "--pattern", "2:4", "--calib-samples", "4", "--calib-len", "64"]  # fmt: skip
    assert main(argv) == 0
    assert main(["generate", "--model", str(out), "--prompt", "To be", "--max-tokens", "4"]) == 0
    assert "\nTo be" in capsys.readouterr().out


@pytest.fixture(scope="module")
def odd_width_dir(tmp_path_factory):
    """A tiny llama whose MLP is 90 wide: down_proj's inputs do not split into groups of 4."""
    import transformers
    from tiny_models import BASE, save_chat_tokenizer

    out = tmp_path_factory.mktemp("odd")
    config = transformers.LlamaConfig(**{**BASE, "intermediate_size": 90})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    save_chat_tokenizer(out)
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.0"], "--sparsity 1.0 must be in [0, 1)"),
        (["--sparsity", "-0.1"], "--sparsity -0.1 must be in [0, 1)"),
        ([], "--sparsity is required"),
        (["--pattern", "4:2"], "expected N:M with 0 < N < M"),
        (["--pattern", "2:4", "--sparsity", "0.3"], "contradicts --pattern 2:4"),
        (["--method", "heads", "--pattern", "2:4"], "--pattern is for unstructured methods"),
        (
            ["--pattern", "2:4", "--odd"],
            "layers.0.mlp.down_proj has 90 inputs, not a multiple of 4",
        ),
        (["--sparsity", "0.5", "--calib-len", "9999"], "--calib-len 9999 exceeds"),
    ],
)
def test_bad_input_is_a_one_line_error(model_dir, odd_width_dir, tmp_path, capsys, args, message):
    model = odd_width_dir if "--odd" in args else model_dir
    args = [a for a in args if a != "--odd"]
    out = tmp_path / "bad"
    assert main(["prune", "--model", str(model), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
