"""kiln quantize: RTN and GPTQ on a tiny llama, written as a GPTQ checkpoint kiln loads back."""

import pytest
import torch

import kiln.config
import kiln.quant.checkpoint
from kiln.cli import main
from kiln.errors import InputError
from kiln.model.loader import load_model
from kiln.quant.gptq import Hessian, quantize_gptq
from kiln.quant.quantize import quantize, rtn_model
from kiln.quant.rtn import quantize_rtn

CALIB = dict(group_size=32, calib_samples=4, calib_len=64)


@pytest.fixture(scope="module")
def model_dir(tokenized_model_dir):
    return tokenized_model_dir("llama")


def correlated(n_rows: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5
    return torch.randn(n_rows, n, generator=gen) @ mix + 0.1 * torch.randn(n_rows, n, generator=gen)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(act_order, sym):
    x = correlated(2048, 256)  # [samples, in]
    w = 0.05 * torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    h = Hessian(256)
    for chunk in x.split(500):
        h.add(chunk)
    assert torch.allclose(h.h, 2 * x.double().t() @ x.double() / len(x))
    rtn = quantize_rtn(w, 4, 64, sym).dequantize()
    gptq = quantize_gptq(w, h.h, 4, 64, sym, act_order).dequantize()
    assert (x @ (w - gptq).t()).norm() < 0.85 * (x @ (w - rtn).t()).norm()


def test_gptq_act_order_gives_each_input_its_group():
    x = correlated(512, 64) * torch.linspace(0.1, 3, 64)  # later inputs matter more
    h = Hessian(64)
    h.add(x)
    q = quantize_gptq(0.05 * torch.randn(64, 64), h.h, 4, 16, act_order=True)
    order = torch.argsort(torch.diag(h.h), descending=True)
    assert torch.equal(q.g_idx[order], torch.arange(64, dtype=torch.int32) // 16)
    assert q.scales.shape == (4, 64) and q.q.shape == (64, 64)


def test_rtn_int8_model_keeps_logits_and_greedy_tokens(model_dir, tmp_path):
    out = quantize(model_dir, tmp_path / "int8", bits=8, group_size=-1)
    ref = load_model(model_dir, device="cpu")
    quant = load_model(out, device="cpu")
    ids = torch.randint(
        0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = ref(ids), quant(ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_rtn_checkpoint_round_trip_is_exact(model_dir, tmp_path):
    out = quantize(model_dir, tmp_path / "rtn", bits=4, group_size=32, sym=False)
    expected = rtn_model(load_model(model_dir, device="cpu"), 4, 32, False, progress=False)
    params = dict(load_model(out, device="cpu").named_parameters())
    for name, w in expected.items():
        assert torch.equal(params[f"{name}.weight"], w.dequantize()), name
    assert (out / "tokenizer.json").is_file()


def test_cli_gptq_act_order_checkpoint_generates(model_dir, tmp_path, capsys):
    out = tmp_path / "gptq"
    argv = ["quantize", "--model", str(model_dir), "--out", str(out), "--method", "gptq",
            "--group-size", "32", "--asym", "--act-order", "--calib-samples", "4",
            "--calib-len", "64"]  # fmt: skip
    assert main(argv) == 0
    qc = kiln.config.ModelConfig.from_dir(out).hf_config["quantization_config"]
    assert qc | {"desc_act": True, "sym": False, "quant_method": "gptq", "bits": 4} == qc
    assert main(["generate", "--model", str(out), "--prompt", "To be", "--max-tokens", "4"]) == 0
    assert "\nTo be" in capsys.readouterr().out


def test_llm_engine_runs_a_quantized_checkpoint(model_dir, tmp_path):
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

    out = quantize(model_dir, tmp_path / "q", bits=8, group_size=32)
    llm = LLM(str(out), device="cpu", max_model_len=128)
    # ignore_eos: an unseeded sample of the random tiny model may be its EOS (which tests ran
    # before decides the global RNG's state)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    result = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)
    assert len(result[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "3"], "--bits 3"),
        (["--group-size", "48"], "not divisible by --group-size 48"),
        (["--method", "awq", "--bits", "8"], "AWQ GEMM checkpoints are 4-bit"),
        (
            [
                "--method",
                "gptq",
                "--group-size",
                "32",
                "--calib-samples",
                "100000",
                "--calib-len",
                "64",
            ],
            "calibration text",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["quantize", "--model", str(model_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_too_short_calibration_file_names_its_counts(model_dir, tmp_path):
    (tmp_path / "calib.txt").write_text("To be, or not to be")
    with pytest.raises(InputError, match=r"needs 256"):
        quantize(model_dir, tmp_path / "q", method="gptq", calib=tmp_path / "calib.txt", **CALIB)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_quantize_leaves_no_output_directory(model_dir, tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error("interrupted")

    monkeypatch.setattr(kiln.quant.checkpoint, "quantized_state", fail)
    with pytest.raises(error):
        quantize(model_dir, tmp_path / "q", method="gptq", **CALIB)
    assert list(tmp_path.iterdir()) == []
