"""AWQ: the folded scales keep the model's function, the searched scale beats plain RTN on inputs
with outlier channels, so does the clipping search, and `kiln quantize
--method awq` writes an AWQ GEMM checkpoint kiln runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.cli import main
from kiln.model.hf_format import kiln_to_hf
from kiln.model.layers import RMSNorm
from kiln.model.loader import load_model
from kiln.model.quantized import pack_awq, read_quant_config, unpack_awq
from kiln.quant.awq import ScaleGroup, fold_scale, scale_groups, search_clip, search_scale
from kiln.quant.calibration import calibration_ids
from kiln.quant.quantize import awq_model
from kiln.quant.rtn import quantize_rtn
from kiln.tokenizer.hf import load_tokenizer


@pytest.fixture(scope="module", params=["llama", "llama_mha_tied"])
def model_dir(request, tokenized_model_dir):
    return tokenized_model_dir(request.param)


def test_folded_scales_leave_the_fp_logits_unchanged(model_dir):
    model = load_model(model_dir, dtype="float32", device="cpu")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        before = model(ids)
    gen = torch.Generator().manual_seed(1)
    folded = 0
    for layer in model.layers:
        groups, _ = scale_groups(layer, attention=None)
        for g in groups:
            fold_scale(g, 0.25 + 4 * torch.rand(g.linears[0].in_features, generator=gen))
            folded += 1
    with torch.no_grad():
        after = model(ids)
    assert folded == len(model.layers) * (
        4 if model.config.num_kv_heads == model.config.num_heads else 3
    )
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_awq_output_error_is_below_rtn_with_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    n = 64
    mix = torch.randn(n, n, generator=gen) / n**0.5
    x = torch.randn(2048, n, generator=gen) @ mix + 0.1 * torch.randn(2048, n, generator=gen)
    x[:, [3, 17, 40]] *= 20  # a few salient input channels, as LLM activations have
    lin = torch.nn.Linear(n, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(64, n, generator=gen))
    w = lin.weight.detach().clone()
    group = ScaleGroup("lin", RMSNorm(n), [lin], lin)
    s = search_scale(group, x, bits=4, group_size=n, sym=False)
    assert torch.equal(lin.weight, w)  # the search leaves the weights as it found them
    awq = quantize_rtn(w * s, 4, n, sym=False).dequantize() / s
    rtn = quantize_rtn(w, 4, n, sym=False).dequantize()
    assert (x @ (w - awq).t()).norm() < 0.8 * (x @ (w - rtn).t()).norm()


def test_clipping_search_lowers_the_output_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=gen)
    w = 0.05 * torch.randn(64, 128, generator=gen)  # a group's extremes stretch its grid
    clipped = search_clip(w, x, bits=4, group_size=128, sym=False)
    assert (clipped.abs() <= w.abs()).all() and not torch.equal(clipped, w)
    rtn = quantize_rtn(w, 4, 128, sym=False).dequantize()
    awq = quantize_rtn(clipped, 4, 128, sym=False).dequantize()
    assert (x @ (w - awq).t()).norm() < 0.98 * (x @ (w - rtn).t()).norm()


def test_cli_awq_checkpoint_runs_in_llm(model_dir, tmp_path, capsys):
    out = tmp_path / "awq"
    argv = ["quantize", "--model", str(model_dir), "--out", str(out), "--method", "awq",
            "--group-size", "32", "--calib-samples", "4", "--calib-len", "64"]  # fmt: skip
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc | {"quant_method": "awq", "version": "gemm", "bits": 4, "zero_point": True} == qc
    err = capsys.readouterr().err
    gqa = "llama_mha_tied" not in str(model_dir)
    assert ("self_attn.o_proj (grouped-query attention" in err) == gqa
    llm = kiln.LLM(str(out), device="cpu", max_model_len=128)
    result = llm.generate(
        prompt_token_ids=[[5, 6, 7]], sampling_params=kiln.SamplingParams(max_tokens=4)
    )
    assert len(result[0].outputs[0].token_ids) == 4


def test_awq_checkpoint_round_trips_through_unpack_awq(model_dir, tmp_path):
    out = kiln.quantize(
        model_dir, tmp_path / "awq", method="awq", group_size=32, calib_samples=4, calib_len=64
    )
    ids = calibration_ids(load_tokenizer(model_dir), None, 4, 64)
    model = load_model(model_dir, dtype="float32", device="cpu")
    expected, _ = awq_model(model, ids, 4, 32, False, progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    spec = read_quant_config(json.loads((out / "config.json").read_text()))
    for name, w in expected.items():
        (hf_name,) = kiln_to_hf(model.config, {f"{name}.weight": torch.empty(0)})
        prefix = hf_name.removesuffix(".weight")
        parts = {p: tensors[f"{prefix}.{p}"] for p in ("qweight", "qzeros", "scales")}
        got = unpack_awq(parts, spec)
        assert torch.equal(got.q, w.q) and torch.equal(got.zeros, w.zeros), name
        assert torch.equal(got.scales, w.scales), name
        assert all(torch.equal(pack_awq(got)[p], t) for p, t in parts.items()), name
    norm = model.layers[0].input_layernorm.weight.detach()  # the folded 1/s is saved too
    (norm_name,) = kiln_to_hf(model.config, {"layers.0.input_layernorm.weight": norm})
    assert torch.equal(tensors[norm_name], norm)
