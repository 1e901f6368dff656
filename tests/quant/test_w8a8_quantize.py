"""kiln quantize --method smoothquant / fp8: smoothing moves activation outliers into the weights
(the model's function unchanged, the W8A8 error lower), the compressed-tensors checkpoint holds
exactly the weights computed, and a small trained model keeps its greedy tokens in kiln.LLM."""

import pytest
import torch
from tiny_models import save_permutation_model

import kiln
from kiln.cli import main
from kiln.config import ModelConfig
from kiln.model.loader import load_model
from kiln.model.w8a8 import FP8, W8A8Linear, quantize_weight
from kiln.quant.quantize import CALIB_BATCH, calibration, linears
from kiln.quant.smoothquant import smooth_model, smoothing_scale

CALIB = dict(calib_samples=4, calib_len=64)


@pytest.fixture(scope="module")
def trained_dir(tokenized_model_dir, tmp_path_factory):
    """The tiny llama trained to follow a fixed token permutation (tiny_models)."""
    return save_permutation_model(tokenized_model_dir("llama"), tmp_path_factory.mktemp("trained"))


def test_smoothing_lowers_the_w8a8_error_with_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=gen)
    x[:, [3, 50, 97]] *= 40  # a few outlier channels, as LLM activations have
    w = 0.05 * torch.randn(96, 128, generator=gen)
    ref = x @ w.t()

    def w8a8_error(x, w):
        q = quantize_weight(w, torch.int8)
        return (W8A8Linear(q.weight, q.weight_scale)(x) - ref).norm() / ref.norm()

    lin = torch.nn.Linear(128, 96, bias=False)
    lin.weight.data.copy_(w)
    s = smoothing_scale(x.abs().amax(0), [lin], alpha=0.5)
    naive, smoothed = w8a8_error(x, w), w8a8_error(x / s, w * s)
    assert smoothed < 0.5 * naive


def test_smoothing_leaves_the_fp_logits_unchanged(trained_dir):
    model = load_model(trained_dir, device="cpu")
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    norm = model.layers[0].input_layernorm.weight.clone()
    skipped = smooth_model(model, calibration(model, trained_dir, None, 4, 64), 0.5, 2, False)
    assert skipped == [f"layers.{i}.self_attn.o_proj (grouped-query attention: v_proj is "
                       "narrower)" for i in range(2)]  # fmt: skip
    assert not torch.equal(model.layers[0].input_layernorm.weight, norm)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fp8", "smoothquant"])
def test_checkpoint_round_trip_is_exact(trained_dir, tmp_path, method):
    out = kiln.quantize(trained_dir, tmp_path / method, method=method, **CALIB)
    model = load_model(trained_dir, dtype="float32", device="cpu")
    if method == "smoothquant":
        ids = calibration(model, trained_dir, None, CALIB["calib_samples"], CALIB["calib_len"])
        smooth_model(model, ids, 0.5, CALIB_BATCH, False)
    loaded = load_model(out, device="cpu")
    dtype = FP8 if method == "fp8" else torch.int8
    for i, layer in enumerate(model.layers):
        for name, lin in linears(layer).items():
            want = quantize_weight(lin.weight, dtype)
            got = loaded.layers[i].get_submodule(name)
            assert isinstance(got, W8A8Linear) and got.weight.dtype == dtype
            assert torch.equal(got.weight.view(torch.int8), want.weight.view(torch.int8)), name
            assert torch.equal(got.weight_scale, want.weight_scale), name
        norm = layer.post_attention_layernorm.weight
        assert torch.equal(loaded.layers[i].post_attention_layernorm.weight, norm)
    qc = ModelConfig.from_dir(out).hf_config["quantization_config"]
    assert qc["format"] == ("float-quantized" if method == "fp8" else "int-quantized")
    assert qc["ignore"] == ["lm_head"] and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("method, logit_error", [("fp8", 0.1), ("smoothquant", 0.04)])
def test_quantized_model_keeps_greedy_tokens_in_llm(trained_dir, tmp_path, method, logit_error):
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

    out = kiln.quantize(trained_dir, tmp_path / method, method=method, **CALIB)
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = load_model(trained_dir, device="cpu")(ids)
        quant = load_model(out, device="cpu")(ids)
    assert (quant - ref).norm() < logit_error * ref.norm()
    prompts = [[5 + 40 * i] for i in range(8)]  # where the chains it learned start
    params = SamplingParams(max_tokens=12, temperature=0)
    tokens = [
        [o.outputs[0].token_ids for o in LLM(str(d), device="cpu", max_model_len=64).generate(
            prompt_token_ids=prompts, sampling_params=params)]
        for d in (trained_dir, out)
    ]  # fmt: skip
    same = sum(a == b for x, y in zip(*tokens) for a, b in zip(x, y))
    assert same >= 0.9 * 8 * 12


def test_cli_smoothquant_with_alpha_generates(trained_dir, tmp_path, capsys):
    out = tmp_path / "sq"
    argv = ["quantize", "--model", str(trained_dir), "--out", str(out), "--method", "smoothquant",
            "--alpha", "0.8", "--calib-samples", "4", "--calib-len", "64"]  # fmt: skip
    assert main(argv) == 0
    assert main(["generate", "--model", str(out), "--prompt", "To be", "--max-tokens", "4"]) == 0
    assert "\nTo be" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "fp8", "--bits", "4"], "--bits 4: --method fp8 is 8-bit"),
        (["--method", "smoothquant", "--act-order"], "--act-order is GPTQ's"),
        (["--method", "fp8", "--group-size", "128"], "--method fp8 scales each output channel"),
        (["--method", "smoothquant", "--asym"], "--asym: --method smoothquant is symmetric"),
        (["--method", "smoothquant", "--alpha", "1.5"], "--alpha 1.5 must be in [0, 1]"),
        (["--method", "fp8", "--alpha", "0.5"], "--alpha is SmoothQuant's"),
        (["--method", "rtn", "--alpha", "0.5"], "--alpha is SmoothQuant's"),
        (["--method", "fp8", "--calib", "x.txt"], "--method fp8 needs no calibration"),
        (["--method", "int3"], "--method 'int3' is unknown"),
    ],
)
def test_bad_options_are_a_one_line_error(trained_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["quantize", "--model", str(trained_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("method, logit_error", [("fp8", 1e-4), ("smoothquant", 0.05)])
def test_transformers_reads_the_checkpoint_and_writes_one_kiln_reads(
    trained_dir, tmp_path, method, logit_error
):
    """transformers (through compressed-tensors) runs kiln's checkpoint with the same logits (int8:
    close; its fake quantization rounds activations to [-128, 127] with absmax / 127.5, vLLM's
    kernels and kiln's to +-127 with absmax / 127), and the checkpoint it saves back loads in
    kiln with the same tensors."""
    pytest.importorskip("compressed_tensors")
    import transformers

    out = kiln.quantize(trained_dir, tmp_path / method, method=method, **CALIB)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(tmp_path / "resaved")  # (after a forward it would save "decompressed")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = load_model(out, device="cpu")
    with torch.no_grad():
        theirs, mine = hf(ids).logits.float(), ours(ids)
    assert (theirs - mine).norm() < logit_error * mine.norm()
    resaved = dict(load_model(tmp_path / "resaved", device="cpu").named_parameters())
    for name, p in ours.named_parameters():
        assert resaved[name].dtype == p.dtype and torch.equal(resaved[name].float(), p.float())


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant", "fp8"])
def test_quantize_on_cuda_matches_the_cpu(trained_dir, tmp_path, method):
    """Calibration on the GPU: RTN and FP8 give the CPU's tensors bit for bit, the calibrated
    methods a model as close to the original."""
    calibrated = CALIB if method in ("gptq", "awq", "smoothquant") else {}
    opts = calibrated | ({"group_size": 32} if method in ("rtn", "gptq", "awq") else {})
    cpu = kiln.quantize(trained_dir, tmp_path / "cpu", method=method, **opts)
    cuda = kiln.quantize(trained_dir, tmp_path / "cuda", method=method, device="cuda", **opts)
    a, b = (dict(load_model(d, device="cpu").named_parameters()) for d in (cpu, cuda))
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_model(trained_dir, device="cpu")(ids)
        errors = [(load_model(d, device="cpu")(ids) - ref).norm() / ref.norm() for d in (cpu, cuda)]
    if method in ("rtn", "fp8"):
        assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
    assert errors[1] < 1.5 * errors[0] + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp8", "smoothquant"])
def test_cuda_engine_runs_the_kernels_in_cuda_graphs(trained_dir, tmp_path, method):
    """On CUDA the engine runs the 8-bit kernels: the same greedy tokens with CUDA graphs on and
    off, and (nearly) those of the unquantized model."""
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

    out = kiln.quantize(trained_dir, tmp_path / method, method=method, **CALIB)
    prompts = [[5 + 40 * i] for i in range(8)]
    params = SamplingParams(max_tokens=12, temperature=0)

    def run(model_dir, **kwargs):
        llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=64, **kwargs)
        return [o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=prompts, sampling_params=params)]  # fmt: skip

    graphs, eager, ref = run(out), run(out, use_cuda_graph=False), run(trained_dir)
    assert graphs == eager
    same = sum(a == b for x, y in zip(graphs, ref) for a, b in zip(x, y))
    assert same >= 0.9 * 8 * 12
