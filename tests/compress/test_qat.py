"""kiln qat: fake quantization computes with exactly the weights the export stores, gradients
pass straight through, and the exported checkpoint serves in the engine with the fake-quant
model's logits; it is the checkpoint kiln quantize writes for the same scheme."""

import pytest
import torch
import torch.nn.functional as F
from train.pretrain_helpers import make_corpus

import kiln
from kiln.cli import main
from kiln.compress.config import QATConfig, TextData
from kiln.compress.qat import FakeQuantLinear, apply_qat, export_qat, qat
from kiln.config import ModelConfig
from kiln.model.loader import load_model
from kiln.model.w8a8 import quantize_weight
from kiln.quant.rtn import quantize_rtn
from kiln.train.config import FinetuneConfig

INT4 = QATConfig(bits=4, group_size=32, sym=False)
W8A8 = QATConfig(bits=8, group_size=-1, act_bits=8)


@pytest.fixture(scope="module")
def model_dir(tokenized_model_dir):
    return tokenized_model_dir("llama")


def test_fake_quant_forward_uses_the_exported_weights_and_passes_gradients_through():
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64, generator=gen, requires_grad=True)
    fq = FakeQuantLinear(lin, INT4)
    expected = F.linear(x, quantize_rtn(lin.weight.detach(), 4, 32, False).dequantize(), lin.bias)
    torch.testing.assert_close(fq(x), expected, rtol=0, atol=0)
    fq(x).sum().backward()
    # straight through: d/dW of sum(x W^T) is the column sums of x, whatever the rounding
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(32, -1).detach())
    assert x.grad is not None and fq.weight is lin.weight


def test_w8a8_fake_quant_rounds_the_input_per_token():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    scale = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / scale).clamp(-127, 127) * scale
    w = quantize_weight(lin.weight, torch.int8).dequantize()
    torch.testing.assert_close(FakeQuantLinear(lin, W8A8)(x), xq @ w.t())


def trained_fake_quant(model_dir, scheme, steps=3):
    """The model under fake quantization after a few steps of plain SGD (weights move)."""
    model = apply_qat(load_model(model_dir, device="cpu"), scheme).requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 384, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize("scheme", [INT4, W8A8], ids=["gptq-int4", "w8a8-int8"])
def test_export_serves_in_the_engine_with_the_fake_quant_logits(model_dir, tmp_path, scheme):
    from kiln.engine.sampling_params import SamplingParams

    model = trained_fake_quant(model_dir, scheme)
    out = export_qat(model, scheme, model_dir, tmp_path / "qat")
    prompt = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        want = F.log_softmax(model(torch.tensor([prompt]))[0], -1)  # [T, vocab]
    llm = kiln.LLM(str(out), device="cpu", max_model_len=64)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)
    got = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].prompt_logprobs
    for t, top in enumerate(got[1:]):  # the logprobs of token t + 1's distribution
        for token, logprob in top.items():
            assert abs(logprob - want[t, token].item()) < 1e-3, (t, token)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy)[0].outputs[0]
    assert first.token_ids[0] == want[-1].argmax().item()


@pytest.mark.parametrize(
    "scheme, options",
    [
        (INT4, dict(method="rtn", bits=4, group_size=32, sym=False)),
        (W8A8, dict(method="smoothquant")),
    ],
    ids=["gptq", "compressed-tensors"],
)
def test_qat_writes_the_checkpoint_kiln_quantize_writes(model_dir, tmp_path, scheme, options):
    make_corpus(tmp_path / "corpus")
    train = FinetuneConfig(max_steps=2, batch_size=2, lr=1e-3, eval_interval=2, eval_steps=1,
                           device="cpu")  # fmt: skip
    result = qat(model_dir, tmp_path / "qat", scheme, train, TextData(str(tmp_path / "corpus"), 32))
    ptq = kiln.quantize(model_dir, tmp_path / "ptq", calib_samples=2, calib_len=32, **options)
    ours = ModelConfig.from_dir(tmp_path / "qat").hf_config["quantization_config"]
    assert ours == ModelConfig.from_dir(ptq).hf_config["quantization_config"]
    assert result["export"] == str(tmp_path / "qat") and (tmp_path / "qat.run").is_dir()
    assert (tmp_path / "qat" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--act-bits", "8"], "it needs --bits 8 --group-size -1 --sym"),
        (["--group-size", "48"], "not divisible by --group-size 48"),
        (["--group-size", "32", "--seq-len", "4096"], "--seq-len 4096 must be in [2, 256]"),
    ],
)
def test_bad_input_is_a_one_line_error(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert (
        main(["qat", "--model", str(model_dir), "--out", str(out), "--device", "cpu", *args]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
