"""Bad checkpoints and bad CLI input give one clear line, never a traceback."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.cli import main
from kiln.config import ModelConfig
from kiln.errors import CheckpointError, ConfigError


def _copy(src, dst):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        kiln.load_model(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="'bert'.*llama, qwen2, qwen3, mistral, mixtral, gpt2"):
        kiln.load_model(tmp_path)


def test_unsupported_rope_type(hf_model_dir):
    hf = dict(ModelConfig.from_dir(hf_model_dir("llama")[0]).hf_config)
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf(hf)


def test_misshapen_tensor_names_it_and_both_shapes(hf_model_dir, tmp_path):
    d = _copy(hf_model_dir("llama")[0], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\(8, 8\).*\(64, 64\)"):
        kiln.load_model(d)


def test_missing_tensor_is_named(hf_model_dir, tmp_path):
    d = _copy(hf_model_dir("llama")[0], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks tensor 'norm.weight'"):
        kiln.load_model(d)


def test_pickle_weights_are_refused(hf_model_dir, tmp_path):
    d = _copy(hf_model_dir("llama")[0], tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        kiln.load_model(d)


def test_cli_errors_are_one_line(hf_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_cli_empty_prompt(hf_model_dir, capsys):
    assert main(["generate", "--model", str(hf_model_dir("llama")[0]), "--prompt", ""]) == 2
    assert "empty prompt" in capsys.readouterr().err
