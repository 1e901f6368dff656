"""The Triton backend and CUDA graphs against kiln's torch backend, on a GPU (float32: the
kernels use exact float32 dot products there, so greedy tokens must be identical)."""

import pytest

from kiln.engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _run(path, prompts, **engine_args):
    llm = LLM(str(path), dtype="float32", device="cuda", kv_cache_memory_bytes=2**26, **engine_args)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS)
    llm.engine.block_manager.check_all_free()
    return llm, [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gpt2", "mixtral", "qwen3_moe"])
def test_triton_backend_and_graphs_match_torch_backend(hf_model_dir, random_prompts, name):
    path, _ = hf_model_dir(name)
    prompts = random_prompts((3, 40, 17, 90, 1), seed=30)
    _, ref = _run(
        path, prompts, attention_backend="torch", use_cuda_graph=False, fuse_weights=False
    )
    llm, out = _run(path, prompts, attention_backend="triton")
    graphs = llm.engine.runner.graph_runner
    assert bool(graphs.graphs) and bool(graphs.mixed)  # MoE too: FusedMoE never syncs
    assert out == ref
    _, eager = _run(path, prompts, attention_backend="triton", use_cuda_graph=False)
    assert eager == ref
    # chunks beside decodes: nearly every step is a mixed one (the 16-token mixed graph)
    _, chunked = _run(path, prompts, attention_backend="triton", max_num_batched_tokens=7)
    assert chunked == ref
    llm, tight = _run(
        path, prompts, attention_backend="triton", num_kv_blocks=16, max_model_len=128
    )
    assert tight == ref


def test_async_scheduling_changes_no_token(hf_model_dir, random_prompts):
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((3, 40, 17, 90, 1), seed=31)
    _, sync = _run(path, prompts, attention_backend="triton", async_scheduling=False)
    llm, overlapped = _run(path, prompts, attention_backend="triton", async_scheduling=True)
    assert llm.engine.core.async_scheduling
    assert overlapped == sync
