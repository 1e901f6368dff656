"""kiln's Transformer against Hugging Face transformers, for every supported family."""

import pytest
import torch
from tiny_models import FAMILIES, save_hf_model

import kiln
from kiln.generate import generate

FAMILY_NAMES = list(FAMILIES)


def _prompt(batch=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_logits_match_transformers(hf_model_dir, name):
    path, hf = hf_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    ids = _prompt()
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_greedy_tokens_match_transformers(hf_model_dir, name):
    path, hf = hf_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    ids = _prompt(batch=1, length=7, seed=1)
    with torch.no_grad():
        ref = hf.generate(
            ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    out = generate(model, ids, max_new_tokens=32)
    assert out.tolist() == ref.tolist()


def test_sliding_window_shorter_than_sequence(hf_model_dir):
    path, hf = hf_model_dir("mistral")
    model = kiln.load_model(path, dtype="float32", device="cpu")
    assert model.config.sliding_windows == [8, 8]
    ids = _prompt(batch=1, length=40)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    # the window matters: full attention gives different logits
    full = kiln.load_model(path, dtype="float32", device="cpu")
    for layer in full.layers:
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        assert (full(ids) - model(ids)).abs().max().item() > 1e-3


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_hf_model("llama", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = kiln.load_model(tmp_path, dtype="float32", device="cpu")
    ids = _prompt()
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "name", ["llama", "qwen3", "mixtral", "qwen3_moe", "gpt2", "llama_mha_tied"]
)
def test_export_round_trip_loads_in_transformers(hf_model_dir, tmp_path, name):
    import transformers

    path, hf = hf_model_dir(name)
    model = kiln.load_model(path, dtype="float32", device="cpu")
    kiln.save_model(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = _prompt()
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_sharded_export_round_trip(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("qwen2")
    model = kiln.load_model(path, dtype="float32", device="cpu")
    kiln.save_model(model, tmp_path, max_shard_bytes=30_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    again = kiln.load_model(tmp_path, dtype="float32", device="cpu")
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_choice(hf_model_dir, dtype):
    path, hf = hf_model_dir("llama")
    model = kiln.load_model(path, dtype=dtype, device="cpu")
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    ids = _prompt()
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).float()
    assert (out - ref).abs().max().item() < 0.1


def test_tied_weights_share_storage(hf_model_dir):
    path, _ = hf_model_dir("qwen2")
    model = kiln.load_model(path, device="cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
