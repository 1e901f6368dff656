"""Bad checkpoints and bad CLI input give one clear line, never a traceback."""

import json
import struct

import pytest
import torch
from chat_tokenizer import save_char_tokenizer
from safetensors.torch import load_file, save_file

import kiln
from kiln.cli import main
from kiln.config import ModelConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.model.hf_format import hf_to_kiln


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
    with pytest.raises(
        ConfigError, match="'bert'.*llama, qwen2, qwen3, qwen3_moe, mistral, mixtral, gpt2"
    ):
        kiln.load_model(tmp_path)


def test_unsupported_rope_type(hf_model_dir):
    hf = dict(ModelConfig.from_dir(hf_model_dir("llama")[0]).hf_config)
    hf["rope_parameters"] = {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="longrope"):
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


def _llama_copy(hf_model_dir, tmp_path):
    return _copy(hf_model_dir("llama")[0], tmp_path / "m")


def _header_length_past_the_end(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data[8:]


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda data: b"", "header too small"),
        (lambda data: data[:5], "header too small"),
        (lambda data: data[: len(data) // 2], "not fully covered"),
        (lambda data: b"\x13" * len(data), "header too large"),
        (lambda data: data[:8] + b"{garbage" + data[16:], "invalid JSON in header"),
        (_header_length_past_the_end, "invalid header length"),
    ],
    ids=["empty", "five_bytes", "truncated", "garbage", "garbage_header", "header_too_long"],
)
def test_corrupt_safetensors_is_a_checkpoint_error_naming_the_file(
    hf_model_dir, tmp_path, corrupt, match
):
    d = _llama_copy(hf_model_dir, tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=f"{weights}: not a valid safetensors file.*{match}"):
        kiln.load_model(d)


def _sharded_copy(hf_model_dir, tmp_path):
    """The tiny llama with its one file named as a shard of an index."""
    d = _llama_copy(hf_model_dir, tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    names = load_file(d / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d, weight_map


def test_sharded_copy_loads(hf_model_dir, tmp_path):
    kiln.load_model(_sharded_copy(hf_model_dir, tmp_path)[0])


@pytest.mark.parametrize(
    "index, match",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[]", "no 'weight_map'"),
        (b'{"metadata": {}}', "no 'weight_map'"),
        (b'{"weight_map": {"model.norm.weight": 3}}', "no 'weight_map'"),
    ],
)
def test_bad_index_is_a_checkpoint_error_naming_it(hf_model_dir, tmp_path, index, match):
    d, _ = _sharded_copy(hf_model_dir, tmp_path)
    (d / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: {match}"):
        kiln.load_model(d)


@pytest.mark.parametrize(
    "escape", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"]
)
def test_shard_outside_the_model_directory_is_refused(hf_model_dir, tmp_path, escape):
    d, weight_map = _sharded_copy(hf_model_dir, tmp_path)
    outside = tmp_path / "outside.safetensors"
    (d / "model-00001-of-00001.safetensors").rename(outside)
    (d / "sub").mkdir()
    name = str(outside) if escape == "ABSOLUTE" else escape
    index = {"weight_map": dict.fromkeys(weight_map, name)}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name inside the model directory"):
        kiln.load_model(d)


def test_symlinked_shard_is_followed(hf_model_dir, tmp_path):
    # The Hugging Face cache links each snapshot file to a blob outside the snapshot folder.
    d, _ = _sharded_copy(hf_model_dir, tmp_path)
    blob = tmp_path / "blob"
    (d / "model-00001-of-00001.safetensors").rename(blob)
    (d / "model-00001-of-00001.safetensors").symlink_to(blob)
    kiln.load_model(d)


def test_gpt2_conv1d_weight_of_wrong_rank(hf_model_dir, tmp_path):
    d = _copy(hf_model_dir("gpt2")[0], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(2, 2, 2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"c_attn.weight' has shape \(2, 2, 2\)"):
        kiln.load_model(d)


def test_mixtral_expert_tensor_without_projection_is_unexpected():
    cfg = ModelConfig(model_type="mixtral", num_layers=1, num_experts=2)
    name = "model.layers.0.block_sparse_moe.experts.0.weight"
    assert [n for n, _ in hf_to_kiln(cfg, name, torch.zeros(1))] == [name[len("model.") :]]


@pytest.mark.parametrize("what", ["weights", "config", "tokenizer"])
@pytest.mark.parametrize(
    "argv",
    [["generate", "--prompt", "hi"], ["serve", "--device", "cpu"]],
    ids=["generate", "serve"],
)
def test_cli_corrupt_model_is_one_line(hf_model_dir, tmp_path, capsys, what, argv):
    d = save_char_tokenizer(_llama_copy(hf_model_dir, tmp_path))
    if what == "weights":
        (d / "model.safetensors").write_bytes(b"\x00" * 7)
    elif what == "tokenizer":  # a broken tokenizer fails at start-up, not on every request
        (d / "tokenizer.json").write_bytes(bytes(range(256)) * 4)
    else:
        hf = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": -3}))
    capsys.readouterr()  # drop the fixture's progress bars
    assert main([*argv, "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    names = {"weights": "model.safetensors", "config": "num_hidden_layers",
             "tokenizer": "tokenizer.json"}  # fmt: skip
    assert names[what] in err
