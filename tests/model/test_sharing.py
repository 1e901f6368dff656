"""ALBERT-style weight sharing (kiln.model.sharing): the parameters a shared model trains, its
plain export computing exactly what it computes (in kiln and transformers), and pretraining
with it."""

import math

import pytest
import torch
from train.pretrain_helpers import make_corpus

from kiln.errors import ConfigError
from kiln.model.sharing import apply_sharing, materialize
from kiln.model.transformer import Transformer
from kiln.train.config import ModelSpec, load_config
from kiln.train.pretrain import model_config, run_pretrain

V, H, L = 384, 64, 4


def build(share=1, embedding_size=0, tied=True, model_type="llama") -> Transformer:
    spec = ModelSpec(model_type=model_type, num_layers=L, num_heads=4, hidden_size=H,
                     block_size=32, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(model_config(spec, V, 1, 2))
    model.init_weights()
    return apply_sharing(model, share, embedding_size)


def per_layer(config) -> int:
    """One block's parameters (attention, SwiGLU MLP, two norms)."""
    return 4 * H * H + 3 * H * config.intermediate_size + 2 * H


@pytest.mark.parametrize(
    "share, embedding_size, tied",
    [(1, 0, True), (L, 0, True), (2, 0, False), (1, 16, True), (L, 16, False), (2, 16, True)],
)
def test_shared_model_trains_each_shared_weight_once(share, embedding_size, tied):
    model = build(share, embedding_size, tied)
    c = model.config
    unique_layers = math.ceil(L / share)
    emb = V * embedding_size + embedding_size * H if embedding_size else V * H
    head = 0 if tied else V * H
    assert model.num_parameters() == unique_layers * per_layer(c) + emb + head + H
    assert c.num_params == L * per_layer(c) + V * H * (1 if tied else 2) + H  # the export's
    optimizer_params = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(optimizer_params) == len(list(model.parameters()))


def test_a_shared_weight_gets_the_gradient_of_every_layer_that_uses_it():
    model = build(share=2)
    assert model.layers[1].mlp.up_proj.weight is model.layers[0].mlp.up_proj.weight
    assert model.layers[2].mlp.up_proj.weight is not model.layers[0].mlp.up_proj.weight
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids).logsumexp(-1).sum().backward()
    plain = materialize(model)
    plain.requires_grad_(True)
    plain(ids).logsumexp(-1).sum().backward()
    summed = plain.layers[0].mlp.up_proj.weight.grad + plain.layers[1].mlp.up_proj.weight.grad
    torch.testing.assert_close(model.layers[0].mlp.up_proj.weight.grad, summed)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_export_materializes_and_loads_in_transformers_with_equal_logits(
    tmp_path, model_type, tied
):
    import transformers

    import kiln

    model = build(share=2, embedding_size=16, tied=tied, model_type=model_type).eval()
    plain = materialize(model)
    assert plain.num_parameters() == Transformer(model.config).num_parameters()
    assert plain.num_parameters() > model.num_parameters()
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    kiln.save_model(plain, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(plain(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_pretraining_with_sharing_exports_a_plain_model(tmp_path):
    import kiln

    make_corpus(tmp_path / "corpus")
    overrides = dict(
        corpus=str(tmp_path / "corpus"), tokenizer="char", out_dir=str(tmp_path / "run"),
        num_layers="4", num_heads="2", hidden_size="32", block_size="32", max_steps="4",
        batch_size="4", eval_interval="2", eval_steps="1", log_interval="2", ckpt_interval="2",
        device="cpu", share_layers="4", embedding_size="8",
    )  # fmt: skip
    result = run_pretrain(load_config(None, overrides))
    assert result["trained_params"] < result["num_params"]
    model = kiln.load_model(result["export"], device="cpu")
    assert model.num_parameters() == result["num_params"]
    assert torch.equal(model.layers[0].mlp.up_proj.weight, model.layers[3].mlp.up_proj.weight)
    assert math.isfinite(result["val_loss"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(share_layers="0"), "share_layers must be >= 1"),
        (dict(embedding_size="-1"), "embedding_size must be >= 0"),
        (dict(share_layers="2", fsdp="true"), "train on one process or with DDP"),
    ],
)
def test_bad_sharing_options_are_config_errors(tmp_path, overrides, message):
    make_corpus(tmp_path / "corpus")
    base = dict(corpus=str(tmp_path / "corpus"), tokenizer="char", out_dir=str(tmp_path / "r"),
                num_layers="2", hidden_size="32", num_heads="2", block_size="16", device="cpu",
                max_steps="1")  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        run_pretrain(load_config(None, base | overrides))
