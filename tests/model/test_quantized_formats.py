"""GPTQ and AWQ checkpoints, packed here the way AutoGPTQ and AutoAWQ pack them from known
integer weights, scales and zeros, load into kiln with exactly the dequantized weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.errors import ConfigError
from kiln.model.loader import load_model
from kiln.model.quantized import (
    IntWeight,
    QuantSpec,
    pack_awq,
    pack_gptq,
    read_quant_config,
    unpack_awq,
    unpack_gptq,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def autogptq_pack(q: np.ndarray, zeros: np.ndarray, bits: int):
    """AutoGPTQ's QuantLinear.pack loops (v1: zeros stored minus 1); q [in, out], zeros [g, out]."""
    pack = 32 // bits
    q, zeros = q.astype(np.uint32), zeros.astype(np.uint32) - 1
    qweight = np.zeros((q.shape[0] // pack, q.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(pack):
            qweight[row] |= q[row * pack + j] << (bits * j)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // pack), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(pack):
            qzeros[:, col] |= zeros[:, col * pack + j] << (bits * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def autoawq_pack(x: np.ndarray) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing along the output dim: x [rows, out]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    x = x.astype(np.uint32)
    packed = np.zeros((x.shape[0], x.shape[1] // 8), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for i in range(8):
            packed[:, col] |= x[:, col * 8 + order_map[i]] << (i * 4)
    return torch.from_numpy(packed.view(np.int32))


def known_ints(out_f, in_f, group_size, bits, gen, act_order):
    """Random integer weights, zeros (>= 1: v1 cannot store 0) and fp16 scales."""
    groups = in_f // group_size
    q = torch.randint(0, 2**bits, (in_f, out_f), generator=gen)
    zeros = torch.randint(1, 2**bits, (groups, out_f), generator=gen)
    scales = (torch.rand(groups, out_f, generator=gen) * 0.01 + 0.001).half()
    g_idx = torch.arange(in_f) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    return q, zeros, scales, g_idx


def expected_weight(q, zeros, scales, g_idx):
    return ((q - zeros[g_idx]).float() * scales[g_idx].float()).t()  # [out, in]


def quantized_dir(hf_model_dir, tmp_path, method):
    """The tiny llama with every decoder Linear replaced by packed known integers; returns the
    directory and {kiln name: expected weight}."""
    src, _ = hf_model_dir("llama")
    out = tmp_path / method
    shutil.copytree(src, out)
    state = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    group_size, expected = 32, {}
    for name in [k for k in state if k.removesuffix(".weight").endswith(LINEARS)]:
        out_f, in_f = state.pop(name).shape
        prefix = name.removesuffix(".weight")
        q, zeros, scales, g_idx = known_ints(out_f, in_f, group_size, 4, gen, method == "gptq")
        if method == "gptq":
            qweight, qzeros = autogptq_pack(q.numpy(), zeros.numpy(), 4)
            state[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        else:
            qweight, qzeros = autoawq_pack(q.numpy()), autoawq_pack(zeros.numpy())
        state |= {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros}
        state[f"{prefix}.scales"] = scales
        expected[prefix.removeprefix("model.") + ".weight"] = expected_weight(
            q, zeros, scales, g_idx
        )
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
        if method == "gptq"
        else {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 32,
            "zero_point": True,
            "version": "gemm",
        }  # fmt: skip
    )
    (out / "config.json").write_text(json.dumps(config))
    return out, expected


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_packed_checkpoint_loads_exact_dequantized_weights(hf_model_dir, tmp_path, method):
    path, expected = quantized_dir(hf_model_dir, tmp_path, method)
    params = dict(load_model(path, dtype="float32", device="cpu").named_parameters())
    assert len(expected) == 2 * len(LINEARS)
    for name, w in expected.items():
        assert torch.equal(params[name], w), name


def random_int_weight(in_f, out_f, groups, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return IntWeight(
        torch.randint(0, 2**bits, (in_f, out_f), generator=gen, dtype=torch.int32),
        torch.rand(groups, out_f, generator=gen).half(),
        torch.randint(0, 2**bits, (groups, out_f), generator=gen, dtype=torch.int32),
        (torch.arange(in_f) // (in_f // groups))[torch.randperm(in_f, generator=gen)].int(),
        bits,
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_pack_round_trip_through_a_file_is_exact(tmp_path, bits, checkpoint_format):
    w = random_int_weight(64, 48, 4, bits)
    w.zeros[0, :3] = torch.tensor([0, 2**bits - 1, 1])  # the ends of the v1 offset's wrap
    spec = read_quant_config(
        {
            "quantization_config": {
                "quant_method": "gptq",
                "bits": bits,
                "group_size": 16,
                "checkpoint_format": checkpoint_format,
            }
        }  # fmt: skip
    )
    save_file(pack_gptq(w, spec.zero_offset), str(tmp_path / "w.safetensors"))
    back = unpack_gptq(load_file(str(tmp_path / "w.safetensors")), spec)
    for field in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(w, field)), field


def test_awq_pack_round_trip_is_exact():
    w = random_int_weight(64, 48, 4, 4)
    w.g_idx = torch.arange(64, dtype=torch.int32) // 16
    back = unpack_awq(pack_awq(w), QuantSpec("awq", 4, 16))
    assert torch.equal(back.dequantize(), w.dequantize()) and torch.equal(back.q, w.q)


@pytest.mark.parametrize(
    "qc, field",
    [
        ({"quant_method": "bitsandbytes", "bits": 4, "group_size": 128}, "quant_method"),
        ({"bits": 4, "group_size": 128}, "quant_method"),
        ({"quant_method": "gptq", "group_size": 128}, "bits"),
        ({"quant_method": "gptq", "bits": 4}, "group_size"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version"),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "x"},
            "checkpoint_format",
        ),  # fmt: skip
    ],
)
def test_unusable_quantization_config_is_a_one_line_error_naming_the_field(
    hf_model_dir, tmp_path, qc, field
):
    src, _ = hf_model_dir("llama")
    shutil.copytree(src, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    with pytest.raises(ConfigError, match=field) as e:
        load_model(tmp_path / "m", device="cpu")
    assert "\n" not in str(e.value)
