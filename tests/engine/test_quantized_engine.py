"""The engine on GPTQ / AWQ checkpoints: packed quantized Linears (kiln.model.quant_layers) give
the dequantize-at-load reference's logits and greedy tokens, fused and unfused, torch or Triton."""

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.errors import ConfigError
from kiln.model.loader import load_model
from kiln.model.quant_layers import ConcatLinear, QuantLinear, concat_quantized
from kiln.quant.quantize import quantize

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
CALIB = dict(calib_samples=4, calib_len=64)
# name -> quantize() arguments: every packed variant (sym / asym, act-order, AWQ, int8)
CHECKPOINTS = {
    "rtn4-g32-asym": dict(method="rtn", bits=4, group_size=32, sym=False),
    "gptq4-g32-act": dict(method="gptq", bits=4, group_size=32, sym=False, act_order=True, **CALIB),
    "awq4-g32": dict(method="awq", bits=4, group_size=32, **CALIB),
    "rtn8-channel": dict(method="rtn", bits=8, group_size=-1),
}


@pytest.fixture(scope="module")
def quantized_dir(tokenized_model_dir, tmp_path_factory):
    """quantized_dir(name) -> a quantized copy of the tiny llama (built once per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp("quant") / name
            cache[name] = quantize(tokenized_model_dir("llama"), out, **CHECKPOINTS[name])
        return cache[name]

    return get


def _tokens(llm, prompts):
    out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    return [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_packed_layers_give_the_dequantized_logits(quantized_dir, name):
    path = quantized_dir(name)
    ref = load_model(path, device="cpu")  # dequantized at load
    packed = load_model(path, device="cpu", quantization=None)
    assert isinstance(packed.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(ref.layers[0].mlp.down_proj, torch.nn.Linear)
    ids = torch.randint(
        0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = ref(ids), packed(ids)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_engine_greedy_tokens_match_dequantize_at_load(quantized_dir, random_prompts, name):
    path = quantized_dir(name)
    prompts = random_prompts((11, 3, 7), seed=3)
    llm = LLM(str(path), device="cpu")  # quantization from the checkpoint: packed
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.out_features == 64 + 2 * 32
    packed = _tokens(llm, prompts)
    assert packed == _tokens(LLM(str(path), device="cpu", quantization="none"), prompts)
    unfused = LLM(str(path), device="cpu", fuse_weights=False)
    assert _tokens(unfused, prompts) == packed


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter_give_the_torch_tokens(quantized_dir, random_prompts):
    """attention_backend="triton" on CPU: the quantized GEMV / GEMM kernels under the
    interpreter (prefill rows and batch-1 decode) give the reference's greedy tokens."""
    path = quantized_dir("gptq4-g32-act")
    prompts = random_prompts((9, 5), seed=4)
    runs = []
    for backend in ("torch", "triton"):
        llm = LLM(str(path), device="cpu", attention_backend=backend, max_num_batched_tokens=16)
        qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        assert qkv.matmul is llm.engine.runner.ops.quant_matmul
        runs.append(_tokens(llm, prompts) + _tokens(llm, prompts[:1]))
    assert runs[1] == runs[0]


def test_quantization_must_match_the_checkpoint(quantized_dir, tokenized_model_dir):
    gptq, plain = quantized_dir("rtn4-g32-asym"), tokenized_model_dir("llama")
    with pytest.raises(ConfigError, match="quantization='awq' does not match.*'gptq'"):
        LLM(str(gptq), device="cpu", quantization="awq")
    with pytest.raises(ConfigError, match="not quantized"):
        LLM(str(plain), device="cpu", quantization="gptq")
    with pytest.raises(ConfigError, match="quantization='int3' is unknown"):
        load_model(gptq, device="cpu", quantization="int3")
    llm = LLM(str(gptq), device="cpu", quantization="gptq")
    assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj, QuantLinear)


def test_parts_with_different_act_orders_run_side_by_side(quantized_dir):
    """q/k/v permuted differently cannot share one packed weight: they run one after another."""
    model = load_model(quantized_dir("gptq4-g32-act"), device="cpu", quantization=None)
    attn = model.layers[0].self_attn
    attn.k_proj.perm = attn.k_proj.perm.flip(0)  # no longer q's order
    fused = concat_quantized([attn.q_proj, attn.k_proj, attn.v_proj])
    assert isinstance(fused, ConcatLinear)
    x = torch.randn(3, 64)
    expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    assert torch.equal(fused(x), expected)
    same = concat_quantized([attn.q_proj, attn.v_proj])
    assert isinstance(same, QuantLinear)
    assert torch.allclose(same(x), torch.cat([attn.q_proj(x), attn.v_proj(x)], -1), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rtn4-g32-asym", "gptq4-g32-act", "rtn8-channel"])
def test_triton_kernels_and_graphs_on_gpu_give_the_dequantized_tokens(
    quantized_dir, random_prompts, name
):
    """float32 on CUDA: the quantized kernels (GEMV with prologues, GEMM, dequantize +
    cuBLAS) under CUDA graphs give the dequantize-at-load torch path's greedy tokens."""
    path = quantized_dir(name)
    prompts = random_prompts((3, 40, 17, 90, 1), seed=30)
    kw = dict(dtype="float32", device="cuda", kv_cache_memory_bytes=2**26)
    ref = LLM(str(path), quantization="none", attention_backend="torch", use_cuda_graph=False, **kw)
    for gemv_max_batch in (1, 0):
        llm = LLM(str(path), attention_backend="triton", gemv_max_batch=gemv_max_batch, **kw)
        assert llm.engine.runner.graph_runner.graphs
        assert _tokens(llm, prompts) == _tokens(ref, prompts)
        assert _tokens(llm, prompts[:1]) == _tokens(ref, prompts[:1])  # batch-1 decode


def test_groups_the_kernels_cannot_take_name_the_fallback(quantized_dir, tmp_path):
    """A g_idx whose groups are not group_size inputs each loads only dequantized."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = quantized_dir("gptq4-g32-act")
    shutil.copytree(src, tmp_path / "bad")
    state = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.g_idx"
    state[name] = state[name].clone()
    state[name][0] = (state[name][0] + 1) % 4  # one group now has 33 inputs
    save_file(state, tmp_path / "bad" / "model.safetensors", {"format": "pt"})
    with pytest.raises(ConfigError, match="down_proj: g_idx does not give every group 32.*'none'"):
        load_model(tmp_path / "bad", device="cpu", quantization=None)
    assert isinstance(
        load_model(tmp_path / "bad", device="cpu").layers[1].mlp.down_proj, torch.nn.Linear
    )
