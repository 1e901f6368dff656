"""LoRA: a transformation of the plain model, and PEFT-compatible adapters in both directions."""

import json

import pytest
import torch

import kiln
from kiln.errors import CheckpointError, ConfigError
from kiln.model import lora
from kiln.model.lora import LoraConfig, apply_lora

IDS = torch.tensor([[1, 5, 9, 200, 33, 7, 120, 64], [3, 3, 90, 14, 250, 8, 2, 77]])


def _randomize(model, seed=0):
    """Give every adapter nonzero A and B so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for w in (layer.lora_A.weight, layer.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def _logits(model):
    with torch.no_grad():
        return model(IDS)


def test_initial_output_equals_base(hf_model_dir):
    path, _ = hf_model_dir("llama")
    model = kiln.load_model(path)
    before = _logits(model)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(_logits(model), before)


def test_only_adapters_train_and_disabling_gives_base(hf_model_dir):
    path, _ = hf_model_dir("qwen3")
    model = kiln.load_model(path)
    base = _logits(model)
    names = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert names == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    _randomize(model)
    assert not torch.allclose(_logits(model), base)
    with lora.disable_adapters(model):
        assert torch.equal(_logits(model), base)


def test_merged_equals_unmerged(hf_model_dir):
    path, _ = hf_model_dir("llama_mqa")
    model = kiln.load_model(path)
    weight = model.layers[0].mlp.down_proj.weight.clone()
    apply_lora(model, LoraConfig(r=8, lora_alpha=32))
    _randomize(model)
    unmerged = _logits(model)
    lora.merge(model)
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(model)
    torch.testing.assert_close(model.layers[0].mlp.down_proj.base_layer.weight, weight)
    lora.merge_and_unload(model)
    assert not list(lora.lora_layers(model))
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)


ROUND_TRIP = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": "all-linear",
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["o_proj", "up_proj"],
    "gpt2": ["o_proj", "down_proj"],  # both are GPT-2's c_proj (Conv1D)
}


def _hf_logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_kiln_adapter_loads_in_peft(hf_model_dir, tmp_path, name):
    from peft import PeftModel
    from tiny_models import build_hf_model

    path, _ = hf_model_dir(name)
    model = kiln.load_model(path)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=ROUND_TRIP[name]))
    _randomize(model)
    lora.save_adapter(model, tmp_path, base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(build_hf_model(name), tmp_path).eval()
    num_wrapped = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
    assert num_wrapped == len(list(lora.lora_layers(model)))
    torch.testing.assert_close(_hf_logits(peft_model), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral"])
def test_peft_adapter_loads_in_kiln(hf_model_dir, tmp_path, name):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from tiny_models import build_hf_model

    path, _ = hf_model_dir(name)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if name != "mixtral":  # transformers fuses Mixtral's experts into 3-D parameters
        targets += ["gate_proj", "up_proj", "down_proj"]
    config = PeftLoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(build_hf_model(name), config).eval()
    peft_model.save_pretrained(tmp_path)
    model = kiln.load_model(path, lora=tmp_path)
    assert len(list(lora.lora_layers(model))) == 2 * len(targets)
    torch.testing.assert_close(_logits(model), _hf_logits(peft_model), atol=1e-5, rtol=1e-5)


def test_target_matching_nothing_lists_names(hf_model_dir):
    model = kiln.load_model(hf_model_dir("llama")[0])
    with pytest.raises(ConfigError, match="match no Linear.*gate_proj, k_proj, o_proj"):
        apply_lora(model, LoraConfig(target_modules=["qkv"]))


def test_rank_larger_than_dims_is_refused(hf_model_dir):
    model = kiln.load_model(hf_model_dir("llama")[0])
    with pytest.raises(ConfigError, match=r"rank 100 exceeds layers.0.self_attn.k_proj.*64 -> 32"):
        apply_lora(model, LoraConfig(r=100, target_modules=["k_proj"]))


def test_gpt2_fused_qkv_is_refused(hf_model_dir):
    model = kiln.load_model(hf_model_dir("gpt2")[0])
    with pytest.raises(ConfigError, match="c_attn"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"]))


def test_adapter_for_another_base_is_refused(hf_model_dir, tmp_path):
    llama = kiln.load_model(hf_model_dir("llama")[0])
    apply_lora(llama, LoraConfig(r=4))
    lora.save_adapter(llama, tmp_path, base_model_name_or_path="tiny-llama")
    with pytest.raises(CheckpointError, match="does not fit this base model.*tiny-llama"):
        kiln.load_model(hf_model_dir("qwen3")[0], lora=tmp_path)  # head_dim 32: q_proj 64 -> 128
    with pytest.raises(CheckpointError, match="which this model lacks"):
        kiln.load_model(hf_model_dir("gpt2")[0], lora=tmp_path)


@pytest.mark.parametrize(
    "file, content, match",
    [
        ("adapter_model.safetensors", b"", "adapter_model.safetensors: not a valid safetensors"),
        ("adapter_model.safetensors", b"\x13" * 64, "not a valid safetensors file"),
        ("adapter_config.json", b"\xff\xfe", "adapter_config.json: not valid JSON"),
        ("adapter_config.json", b"[]", "adapter_config.json: expected a JSON object"),
    ],
)
def test_corrupt_adapter_is_a_checkpoint_error_naming_the_file(
    hf_model_dir, tmp_path, file, content, match
):
    model = kiln.load_model(hf_model_dir("llama")[0])
    apply_lora(model, LoraConfig(r=4))
    lora.save_adapter(model, tmp_path)
    (tmp_path / file).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        kiln.load_model(hf_model_dir("llama")[0], lora=tmp_path)


def test_adapter_config_is_peft_shaped(hf_model_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig

    model = kiln.load_model(hf_model_dir("llama")[0])
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    lora.save_adapter(model, tmp_path)
    cfg = PeftLoraConfig.from_pretrained(tmp_path)
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (4, 8, {"q_proj", "down_proj"})
    keys = json.loads((tmp_path / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA"
    from safetensors.torch import load_file

    names = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names
