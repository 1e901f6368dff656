"""The JAX decoder against kiln's torch Transformer, family by family: logits and greedy tokens."""

import copy
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("jax")

import torch  # noqa: E402
from tiny_models import EXTRA_FAMILIES, FAMILIES, save_hf_model  # noqa: E402

import kiln  # noqa: E402
import kiln.jax  # noqa: E402
from kiln.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from kiln.generate import generate as torch_generate  # noqa: E402

NAMES = list(FAMILIES) + list(EXTRA_FAMILIES)
# One family for each path the cached decode takes (the RoPE variants differ only in the table,
# which the logits test covers): GQA, MQA with biases, tied, q/k norms, sliding window, MoE,
# MoE beside a dense layer, learned positions with LayerNorm, a position-dependent RoPE base.
GREEDY = ["llama", "llama_mqa", "llama_mha_tied", "qwen3", "mistral", "mixtral", "qwen3_moe"]
GREEDY += ["gpt2", "llama_dynamic_rope"]


def _prompt(batch=2, length=20, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _torch_model(path):
    return kiln.load_model(path, dtype="float32", device="cpu")


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_torch(jax_model, name):
    model, path = jax_model(name)
    ids = _prompt()
    with torch.no_grad():
        ref = _torch_model(path)(ids).numpy()
    out = np.asarray(model(ids.numpy()))
    assert out.shape == ref.shape == (2, 20, model.config.vocab_size)
    assert np.abs(out - ref).max() < 1e-4


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_tokens_match_torch(jax_model, name):
    model, path = jax_model(name)
    ids = _prompt(batch=2, length=7, seed=1)
    ref = torch_generate(_torch_model(path), ids, max_new_tokens=12)
    out = kiln.jax.generate(model, ids.numpy(), max_new_tokens=12)
    assert np.asarray(out).tolist() == ref.tolist()


@pytest.mark.parametrize("attention", ["flash", "pallas"])
def test_flash_attention_in_the_model_gives_the_same_tokens(jax_model, attention):
    model, _ = jax_model("mistral")  # sliding window 8, shorter than the prompt
    fast = model.replace(attention=attention)
    ids = _prompt(batch=1, length=20, seed=2).numpy()
    assert np.abs(np.asarray(fast(ids)) - np.asarray(model(ids))).max() < 1e-5
    out = kiln.jax.generate(fast, ids, max_new_tokens=6)
    assert np.asarray(out).tolist() == np.asarray(kiln.jax.generate(model, ids, 6)).tolist()


def test_bfloat16_checkpoint_loads_exactly(tmp_path, hf_model_dir):
    _, hf = hf_model_dir("qwen3")
    # a copy: .to() casts in place, and a bf16 round trip would leave the session's shared
    # float32 model rounded (test_parity then disagrees with it)
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)
    model = kiln.jax.load_model(tmp_path, dtype="float32")
    ids = _prompt()
    with torch.no_grad():
        ref = _torch_model(tmp_path)(ids).numpy()
    assert np.abs(np.asarray(model(ids.numpy())) - ref).max() < 1e-4
    half = kiln.jax.load_model(tmp_path, dtype="bfloat16")
    assert half.params["embed"].dtype == "bfloat16"
    logits = np.asarray(half(ids.numpy()), dtype=np.float32)
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()


def test_ssm_layers_are_refused(tmp_path):
    save_hf_model("mamba", tmp_path)
    with pytest.raises(ConfigError, match="SSM"):
        kiln.jax.load_model(tmp_path)


def test_quantized_checkpoint_is_refused(tmp_path, hf_model_dir):
    path, _ = hf_model_dir("llama")
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gptq"):
        kiln.jax.load_model(tmp_path)


def test_bad_dtype_and_missing_directory_raise(tmp_path, hf_model_dir):
    path, _ = hf_model_dir("llama")
    with pytest.raises(CheckpointError, match="dtype"):
        kiln.jax.load_model(path, dtype="int4")
    with pytest.raises(CheckpointError, match="does not exist"):
        kiln.jax.load_model(tmp_path / "nowhere")


def test_generate_refuses_a_prompt_past_the_context(jax_model):
    model, _ = jax_model("llama")
    with pytest.raises(InputError, match="context"):
        kiln.jax.generate(model, np.ones((1, 250), np.int32), max_new_tokens=10)
