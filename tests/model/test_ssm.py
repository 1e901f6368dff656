"""Mamba / Mamba2 (kiln.model.ssm) against transformers, and the hybrid layer_types layout."""

import pytest
import torch
from tiny_models import SSM_FAMILIES, save_hf_model

import kiln
from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.generate import generate
from kiln.model.transformer import Transformer


@pytest.fixture(scope="module")
def ssm_model_dir(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[name] = (out, save_hf_model(name, out))
        return cache[name]

    return get


def _prompt(batch, length, seed):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_logits_match_transformers(ssm_model_dir, name):
    path, hf = ssm_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    ids = _prompt(2, 24, 0)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_greedy_tokens_match_transformers(ssm_model_dir, name):
    path, hf = ssm_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    ids = _prompt(1, 7, 1)
    with torch.no_grad():
        ref = hf.generate(
            ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    out = generate(model, ids, max_new_tokens=32)
    assert out.tolist() == ref.tolist()
    assert len(set(out[0, 7:].tolist())) > 1  # not a degenerate repeat


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_export_round_trip_loads_in_transformers(ssm_model_dir, tmp_path, name):
    import transformers

    path, _ = ssm_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    kiln.save_model(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = _prompt(2, 12, 2)
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < 1e-4


HYBRID = dict(
    model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, mamba_state_size=8, mamba_head_dim=16, mamba_n_groups=2,
)  # fmt: skip


@pytest.mark.parametrize("ssm", ["mamba", "mamba2"])
def test_hybrid_is_one_config_change(ssm):
    """layer_types swaps attention blocks for SSM blocks; generation with the cache equals
    recomputing the whole sequence each step."""
    layer_types = ["attention", ssm, "attention", ssm]
    config = ModelConfig.from_hf({**HYBRID, "layer_types": layer_types})
    assert config.kv_layers == [0, 2] and config.num_ssm_layers == 2
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.init_weights(0.1)
    assert hasattr(model.layers[1], "mixer") and hasattr(model.layers[2], "self_attn")
    assert model.layers[2].self_attn.layer_idx == 1  # its K/V's index among attention layers
    assert config.num_params == model.num_parameters()
    ids = _prompt(2, 9, 3)
    out = generate(model, ids, max_new_tokens=8)
    for _ in range(8):  # no cache: every step recomputes the whole sequence
        with torch.no_grad():
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_ssm_layer_type_without_ssm_fields_is_refused():
    with pytest.raises(ConfigError, match="unsupported layer type 'mamba3'"):
        ModelConfig.from_hf({**HYBRID, "layer_types": ["attention", "mamba3"] * 2})
    with pytest.raises(ConfigError, match="mamba_num_heads"):
        ModelConfig.from_hf({**HYBRID, "layer_types": ["mamba2"] * 4, "mamba_head_dim": 24})


def test_hybrid_checkpoint_round_trip(tmp_path):
    config = ModelConfig.from_hf({**HYBRID, "layer_types": ["mamba2", "attention"] * 2})
    torch.manual_seed(1)
    model = Transformer(config).eval()
    model.init_weights(0.1)
    kiln.save_model(model, tmp_path)
    back = kiln.load_model(tmp_path, dtype="float32", device="cpu")
    assert back.config.layer_types == config.layer_types and back.config.ssm == config.ssm
    ids = _prompt(2, 10, 4)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_triton_scan_path_matches_transformers(ssm_model_dir, monkeypatch, name):
    """The model through the Triton kernels (the interpreter on CPU): the views the mixers
    hand them (strided x, z, B, C) are read right, prefill and decode."""
    import kiln.kernels.selective_scan as scan

    path, hf = ssm_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    monkeypatch.setattr(scan, "use_triton", lambda x: True)
    ids = _prompt(1, 6, 5)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
        ref = hf.generate(
            ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    assert generate(model, ids, max_new_tokens=3).tolist() == ref.tolist()
