"""Qwen3-MoE, Mixtral and YaRN in the engine: greedy tokens equal transformers' under chunked
prefill and preemption, with the torch references and (interpreted) Triton kernels alike."""

import pytest

from kiln.engine import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_moe_norm", "mixtral"])
def test_greedy_with_chunked_prefill_and_preemption(hf_model_dir, random_prompts, hf_greedy, name):
    path, hf = hf_model_dir(name)
    prompts = random_prompts((33, 7, 50, 16), seed=4)
    expected = [hf_greedy(hf, p, 32) for p in prompts]
    # 6 blocks of 16 tokens for four sequences growing to 39..82 tokens: preemptions; chunks
    # of at most 24 tokens split the longer prompts.
    llm = LLM(str(path), device="cpu", num_kv_blocks=6, max_model_len=96, max_num_batched_tokens=24)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == expected
    llm.engine.block_manager.check_all_free()


def test_fused_moe_layers_with_triton_kernels(hf_model_dir, random_prompts, hf_greedy):
    """The engine stacks each MoE layer's experts (FusedMoE) and runs the Triton grouped GEMMs
    (the interpreter here): transformers' greedy tokens, chunked prefill included."""
    from kiln.engine.fuse import FusedMoE

    path, hf = hf_model_dir("qwen3_moe")
    prompts = random_prompts((21, 5), seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(path), device="cpu", attention_backend="triton", max_num_batched_tokens=16)
    mlps = [layer.mlp for layer in llm.engine.runner.model.layers]
    assert isinstance(mlps[0], FusedMoE) and not isinstance(mlps[1], FusedMoE)  # layer 1 dense
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in out] == [hf_greedy(hf, p, 8) for p in prompts]


def test_yarn_engine_with_preemption_and_chunked_prefill(hf_model_dir, random_prompts, hf_greedy):
    path, hf = hf_model_dir("llama_yarn")  # positions past the original 64
    prompts = random_prompts((70, 7, 50, 16), seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), device="cpu", num_kv_blocks=8, max_model_len=128,
              max_num_batched_tokens=24)  # fmt: skip
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == [hf_greedy(hf, p, 32) for p in prompts]


def test_dynamic_ntk_with_preemption_and_chunked_prefill(hf_model_dir, random_prompts, hf_greedy):
    """Dynamic NTK past its original 24-token context (kiln's is 48): a recomputed
    (preempted) sequence re-prefills with the same per-position rotations."""
    path, hf = hf_model_dir("llama_dynamic_rope")
    prompts = random_prompts((20, 7, 15, 11), seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(str(path), device="cpu", num_kv_blocks=5, max_num_batched_tokens=8)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == [hf_greedy(hf, p, 24) for p in prompts]
