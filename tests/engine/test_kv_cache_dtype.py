"""The fp8 / int8 KV cache in the engine: pool size, scales (checkpoint, calculated, 1.0),
greedy output close to the full-precision cache, and the errors."""

import argparse
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.engine import LLM, SamplingParams
from kiln.engine.config import EngineConfig
from kiln.engine.model_runner import kv_cache_torch_dtype
from kiln.engine.ops import Ops
from kiln.errors import CheckpointError, ConfigError, InputError

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
FIRST = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
# The first token's top log-probabilities stay this close to the full-precision cache's: fp8
# e4m3 keeps 3 mantissa bits (~6% per value), int8 ~7 bits over each head's range.
LOGPROB_TOL = {"fp8": 0.1, "int8": 0.05}


# Where the Triton kernels run in these tests: the interpreter on CPU, else the GPU (float32).
TRITON_DEVICE = (
    dict(device="cpu") if not torch.cuda.is_available() else dict(device="cuda", dtype="float32")
)


def _run(path, prompts, params=GREEDY, **engine_args):
    engine_args.setdefault("device", "cpu")
    llm = LLM(str(path), **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.engine.block_manager.check_all_free()
    return llm, out


def _tokens(out):
    return [o.outputs[0].token_ids for o in out]


@pytest.fixture(scope="module")
def qwen3(hf_model_dir, random_prompts):
    """The tiny qwen3 (q/k norms, fused qkv: the decode_qkv path), prompts and its greedy
    tokens and first-token logprobs with the full-precision cache."""
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((33, 7, 50, 16), seed=3)
    _, out = _run(path, prompts)
    _, first = _run(path, prompts, FIRST)
    return path, prompts, _tokens(out), [o.outputs[0].logprobs[0] for o in first]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_quantized_cache_greedy_is_close_to_full_precision(qwen3, kv_cache_dtype):
    """Every first token and most later ones equal the float32 cache's; the first token's
    top-5 log-probabilities (prefill attention reads the quantized pages back) within
    LOGPROB_TOL."""
    path, prompts, want, want_first = qwen3
    _, out = _run(path, prompts, kv_cache_dtype=kv_cache_dtype)
    got = _tokens(out)
    assert [g[0] for g in got] == [w[0] for w in want]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.6 * sum(map(len, want)), f"{same} of {sum(map(len, want))} equal"
    _, first = _run(path, prompts, FIRST, kv_cache_dtype=kv_cache_dtype)
    for o, w in zip(first, want_first):
        got_lp = o.outputs[0].logprobs[0]
        for token, lp in w.items():
            if token in got_lp:
                assert abs(got_lp[token] - lp) < LOGPROB_TOL[kv_cache_dtype]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_quantized_cache_triton_kernels_give_the_reference_tokens(
    hf_model_dir, random_prompts, kv_cache_dtype
):
    """The Triton kernels (interpreter) over the quantized pool: the torch ops' tokens."""
    path, _ = hf_model_dir("llama")  # unfused attention: store + decode / prefill kernels
    prompts = random_prompts((21, 5), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    args = dict(kv_cache_dtype=kv_cache_dtype, async_scheduling=False, **TRITON_DEVICE)
    _, ref = _run(path, prompts, params, attention_backend="torch", **args)
    _, got = _run(path, prompts, params, attention_backend="triton", **args)
    assert _tokens(got) == _tokens(ref)


def test_quantized_pool_holds_more_tokens_in_the_same_memory(hf_model_dir):
    path, _ = hf_model_dir("llama")  # float32 on the CPU: 4x for fp8 and int8
    blocks = {}
    for dt in ("auto", "fp8", "int8"):
        llm = LLM(str(path), device="cpu", kv_cache_dtype=dt, kv_cache_memory_bytes=2**22)
        blocks[dt] = llm.engine.runner.num_blocks
        assert llm.engine.runner.kv_cache.data.dtype == {
            "auto": torch.float32, "fp8": torch.float8_e4m3fn, "int8": torch.int8
        }[dt]  # fmt: skip
    assert blocks["fp8"] == blocks["int8"] == 4 * blocks["auto"]


def _with_scales(src, dst, tensors):
    """A copy of the checkpoint at src with extra tensors in its safetensors file."""
    shutil.copytree(src, dst)
    file = next(dst.glob("*.safetensors"))
    weights = load_file(file)
    weights.update(tensors)
    save_file(weights, file)
    return dst


def test_checkpoint_scales_are_used_and_logged(hf_model_dir, tmp_path, caplog):
    src, _ = hf_model_dir("llama")
    scales = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.05),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.02, 0.03]),  # per kv head
        "model.layers.1.self_attn.kv_scale": torch.tensor(0.04),  # older: one for both
    }
    path = _with_scales(src, tmp_path / "ckpt", scales)
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        llm, _ = _run(path, [[5, 6, 7]], kv_cache_dtype="fp8")
    s = llm.engine.runner.kv_cache.scales
    torch.testing.assert_close(s[:, 0], torch.tensor([[0.05, 0.05], [0.04, 0.04]]))
    torch.testing.assert_close(s[:, 1], torch.tensor([[0.02, 0.03], [0.04, 0.04]]))
    torch.testing.assert_close(s[:, 2], 1 / s[:, 0])
    assert "KV scales: checkpoint" in caplog.text
    # calculate_kv_scales=True overrides them
    llm, _ = _run(path, [[5, 6, 7]], kv_cache_dtype="fp8", calculate_kv_scales=True)
    assert not torch.equal(llm.engine.runner.kv_cache.scales, s)
    # an auto cache loads the same checkpoint and ignores them
    _run(path, [[5, 6, 7]])


def test_scales_are_calculated_or_one_with_a_warning(hf_model_dir, caplog):
    path, _ = hf_model_dir("llama")
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        llm, _ = _run(path, [[5, 6, 7, 8]], kv_cache_dtype="int8")
    assert "KV scales: calculated from the first prefill step" in caplog.text
    s = llm.engine.runner.kv_cache.scales
    assert (s[:, :2] != 1.0).all() and not llm.engine.runner.backend.calibrating
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        llm, _ = _run(path, [[5, 6, 7, 8]], kv_cache_dtype="int8", calculate_kv_scales=False)
    assert (llm.engine.runner.kv_cache.scales == 1.0).all()
    assert any(r.levelname == "WARNING" and "1.0" in r.message for r in caplog.records)


def test_partial_checkpoint_scales_are_refused(hf_model_dir, tmp_path):
    src, _ = hf_model_dir("llama")
    path = _with_scales(
        src, tmp_path / "ckpt", {"model.layers.0.self_attn.k_scale": torch.ones(())}
    )
    with pytest.raises(CheckpointError, match="layers.0.self_attn"):
        LLM(str(path), device="cpu", kv_cache_dtype="fp8")


def test_bad_kv_cache_dtype_is_one_line_error():
    with pytest.raises(InputError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="fp16")


def test_fp8_kernels_need_an_fp8_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="compute capability 8.9"):
        kv_cache_torch_dtype("fp8", torch.bfloat16, torch.device("cuda"), Ops.triton())
    assert kv_cache_torch_dtype("int8", torch.bfloat16, torch.device("cuda"), Ops.triton())
    assert kv_cache_torch_dtype("auto", torch.bfloat16, torch.device("cpu"), Ops.torch())


def test_kv_flags_come_from_engine_config():
    parser = argparse.ArgumentParser()
    EngineConfig.add_arguments(parser)
    args = parser.parse_args(
        ["--kv-cache-dtype", "fp8", "--no-calculate-kv-scales", "--kv-eviction", "h2o",
         "--kv-budget", "64", "--num-sink-tokens", "8"]
    )  # fmt: skip
    assert EngineConfig.args_from(args) == dict(
        kv_cache_dtype="fp8", calculate_kv_scales=False, kv_eviction="h2o", kv_budget=64,
        num_sink_tokens=8,
    )  # fmt: skip
