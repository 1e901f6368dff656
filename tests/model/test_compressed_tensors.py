"""compressed-tensors W8A8 checkpoints built here from known tensors, laid out as llm-compressor
writes them (FP8 dynamic per-channel, int8 W8A8, FP8 static per-tensor): kiln loads exactly those
tensors as W8A8Linears; what kiln cannot run is a one-line error naming the field."""

import copy
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.errors import CheckpointError, ConfigError
from kiln.model.loader import load_model
from kiln.model.w8a8 import FP8, W8A8Linear

# As llm-compressor's FP8_DYNAMIC preset writes it (the fields of compressed-tensors 0.x).
ARGS = {
    "actorder": None,
    "block_structure": None,
    "dynamic": False,
    "group_size": None,
    "num_bits": 8,
    "observer": "minmax",
    "observer_kwargs": {},
    "strategy": "channel",
    "symmetric": True,
    "type": "float",
}
FP8_DYNAMIC = {
    "config_groups": {
        "group_0": {
            "input_activations": ARGS | {"dynamic": True, "observer": None, "strategy": "token"},
            "output_activations": None,
            "targets": ["Linear"],
            "weights": ARGS,
        }
    },
    "format": "float-quantized",
    "global_compression_ratio": 1.24,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def scheme(qtype="float", weights="channel", static=False):
    qc = copy.deepcopy(FP8_DYNAMIC)
    group = qc["config_groups"]["group_0"]
    group["weights"] |= {"type": qtype, "strategy": weights}
    group["input_activations"] |= {"type": qtype}
    if static:
        group["input_activations"] |= {"dynamic": False, "strategy": "tensor", "observer": "minmax"}
    qc["format"] = f"{qtype}-quantized"
    return qc


def build(src, out, qc, zero_points=False, seed=0):
    """A copy of the HF checkpoint src with every decoder Linear replaced by known 8-bit
    weights and scales; HF prefix -> (weight, weight_scale, input_scale)."""
    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(seed)
    group = qc["config_groups"]["group_0"]
    qtype, per_tensor = group["weights"]["type"], group["weights"]["strategy"] == "tensor"
    static = not group["input_activations"]["dynamic"]
    tensors = load_file(out / "model.safetensors")
    known = {}
    for name in list(tensors):
        if not re.match(r"model\.layers\.\d+\..*_proj\.weight$", name):
            continue
        prefix, (n, k) = name.removesuffix(".weight"), tensors[name].shape
        if qtype == "int":
            w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        else:
            w = (100 * torch.randn(n, k, generator=gen)).clamp(-448, 448).to(FP8)
        shape = (1,) if per_tensor else (n, 1)
        scale = (1e-3 + 1e-2 * torch.rand(shape, generator=gen)).bfloat16()
        tensors[name], tensors[f"{prefix}.weight_scale"] = w, scale
        input_scale = None
        if static:
            input_scale = tensors[f"{prefix}.input_scale"] = 0.02 + 0.01 * torch.rand(1)
        if zero_points:
            tensors[f"{prefix}.weight_zero_point"] = torch.zeros(shape, dtype=torch.int8)
        known[prefix] = (w, scale, input_scale)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text()) | {"quantization_config": qc}
    (out / "config.json").write_text(json.dumps(config))
    return known


@pytest.fixture
def src(hf_model_dir):
    return hf_model_dir("llama")[0]


@pytest.mark.parametrize(
    "qc, zero_points",
    [
        (scheme("float"), False),
        (scheme("int"), True),
        (scheme("float", "tensor", static=True), False),
        (scheme("int", "tensor", static=True), False),
    ],
    ids=["fp8-dynamic", "int8-w8a8", "fp8-static", "int8-static"],
)
def test_checkpoint_loads_the_exact_tensors(src, tmp_path, qc, zero_points):
    known = build(src, tmp_path / "q", qc, zero_points)
    model = load_model(tmp_path / "q", device="cpu")
    for prefix, (w, scale, input_scale) in known.items():
        lin = model.get_submodule(prefix.removeprefix("model."))
        assert isinstance(lin, W8A8Linear), prefix
        assert lin.weight.dtype == w.dtype
        assert torch.equal(lin.weight.view(torch.int8), w.view(torch.int8))
        assert torch.equal(lin.weight_scale, scale.float().expand(w.shape[0], 1))
        if input_scale is None:
            assert lin.input_scale is None
        else:
            assert torch.equal(lin.input_scale, input_scale.reshape(()))
    assert isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        assert model(torch.tensor([[5, 6, 7]])).isfinite().all()


def test_fused_engine_gives_the_plain_model_greedy_tokens(src, tmp_path):
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

    build(src, tmp_path / "q", scheme("float"))
    model = load_model(tmp_path / "q", device="cpu")
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    llm = LLM(str(tmp_path / "q"), device="cpu", max_model_len=64)
    qkv = llm.engine.core.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, W8A8Linear)  # q/k/v fused as one 8-bit Linear
    out = llm.generate(
        prompt_token_ids=[ids[:4]], sampling_params=SamplingParams(max_tokens=6, temperature=0)
    )
    assert out[0].outputs[0].token_ids == ids[4:]


def edit(path, qc_edit):
    config = json.loads((path / "config.json").read_text())
    qc_edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "qc_edit, message",
    [
        (lambda qc: qc.update(format="pack-quantized"), "format 'pack-quantized'"),
        (lambda qc: qc.update(quantization_status="frozen"), "quantization_status 'frozen'"),
        (lambda qc: qc.update(kv_cache_scheme=ARGS), "kv_cache_scheme"),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="group"),
            "group_0.weights.strategy 'group'",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4),
            "group_0.weights.num_bits 4",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"].update(input_activations=None),
            "group_0.input_activations is null",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(symmetric=False),
            "input_activations.symmetric False",
        ),
    ],
)
def test_config_kiln_cannot_run_names_the_field(src, tmp_path, qc_edit, message):
    build(src, tmp_path / "q", scheme("float"))
    edit(tmp_path / "q", qc_edit)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_model(tmp_path / "q", device="cpu")
    assert "\n" not in str(e.value) and "quantization_config" in str(e.value)


@pytest.mark.parametrize(
    "drop, message",
    [
        ("weight_scale", "lacks tensor 'weight_scale'"),
        ("nonzero_zero_point", "weight_zero_point' is not zero"),
    ],
)
def test_broken_tensors_name_the_layer(src, tmp_path, drop, message):
    build(src, tmp_path / "q", scheme("int"), zero_points=True)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    if drop == "weight_scale":
        del tensors[f"{name}.weight_scale"]
    else:
        tensors[f"{name}.weight_zero_point"][0] = 3
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(tmp_path / "q", device="cpu")
