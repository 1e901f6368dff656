"""Multi-LoRA in the engine: adapters of different ranks and targets in one batch give the
tokens of the merged-weights model for each (peft's merge on transformers, and kiln's)."""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import save_peft_adapter

import kiln
from kiln import LoRARequest, SamplingParams
from kiln.errors import InputError
from kiln.model.lora import merge_and_unload

pytest.importorskip("peft")

ADAPTERS = {  # name: (rank, alpha, target modules) -- different ranks and targets
    "a": (8, 16, ["q_proj", "v_proj", "down_proj"]),
    "b": (4, 8, ["k_proj", "o_proj", "gate_proj", "up_proj"]),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def lora_setup(hf_model_dir, tmp_path_factory):
    """(base dir, {name: adapter dir}, {name: merged transformers model}, base hf model)."""
    path, hf = hf_model_dir("llama")
    dirs, merged = {}, {}
    for seed, name in enumerate(ADAPTERS):
        dirs[name] = tmp_path_factory.mktemp(f"lora_{name}")
        merged[name] = save_peft_adapter(hf, dirs[name], *ADAPTERS[name], seed=seed)
    return path, dirs, merged, hf


def _ref(hf_greedy, model, prompt):
    """transformers' greedy tokens, up to kiln's stop at the tiny model's eos (2)."""
    tokens = hf_greedy(model, prompt, 8)
    return tokens[: tokens.index(2) + 1] if 2 in tokens else tokens


def _requests(dirs):
    return {name: LoRARequest(name, i + 1, str(d)) for i, (name, d) in enumerate(dirs.items())}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_matches_merged_models(lora_setup, random_prompts, hf_greedy, backend):
    path, dirs, merged, hf = lora_setup
    reqs = _requests(dirs)
    prompts = random_prompts([37, 20, 33, 37, 9])
    prompts[3] = prompts[0]  # the same prompt under the base model and adapter a
    loras = [None, reqs["a"], reqs["b"], reqs["a"], reqs["b"]]
    llm = kiln.LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=8,
                   attention_backend=backend)  # fmt: skip
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, lora_request=loras)
    got = [o.outputs[0].token_ids for o in outs]
    for prompt, lora, tokens in zip(prompts, loras, got):
        ref = merged[lora.lora_name] if lora is not None else hf
        assert tokens == _ref(hf_greedy, ref, prompt)
    assert got[0] != got[3], "adapter a changes nothing: the test would not see it"
    llm.engine.block_manager.check_all_free()


def test_matches_kiln_merged_model(lora_setup, random_prompts, tmp_path):
    path, dirs, _, _ = lora_setup
    prompts = random_prompts([25, 14], seed=3)
    kiln.save_model(merge_and_unload(kiln.load_model(path, lora=dirs["b"])), tmp_path)
    want = kiln.LLM(str(tmp_path)).generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    llm = kiln.LLM(str(path), enable_lora=True, max_lora_rank=8)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                       lora_request=_requests(dirs)["b"])  # fmt: skip
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_prefix_cache_is_keyed_by_adapter(lora_setup, random_prompts, hf_greedy):
    path, dirs, merged, hf = lora_setup
    reqs = _requests(dirs)
    prompt = random_prompts([40], seed=5)[0]
    llm = kiln.LLM(str(path), enable_lora=True, max_loras=1, max_lora_rank=8)
    bm = llm.engine.block_manager
    for lora, ref in [(reqs["a"], merged["a"]), (None, hf), (reqs["b"], merged["b"])]:
        hits = bm.prefix_cache_hits
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, lora_request=lora)
        assert out[0].outputs[0].token_ids == _ref(hf_greedy, ref, prompt)
        assert bm.prefix_cache_hits == hits  # no block of another adapter's prompt is shared
    hits = bm.prefix_cache_hits
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, lora_request=reqs["a"])
    assert bm.prefix_cache_hits > hits  # its own blocks are
    assert out[0].outputs[0].token_ids == _ref(hf_greedy, merged["a"], prompt)
    bm.check_all_free()


def test_more_adapters_than_slots_all_finish(lora_setup, random_prompts, hf_greedy):
    """max_loras=1: requests of two adapters take turns on the one device slot."""
    path, dirs, merged, _ = lora_setup
    reqs = _requests(dirs)
    prompts = random_prompts([12, 18, 15, 11], seed=7)
    loras = [reqs["a"], reqs["b"], reqs["b"], reqs["a"]]
    llm = kiln.LLM(str(path), enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, lora_request=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        assert out.outputs[0].token_ids == _ref(hf_greedy, merged[lora.lora_name], prompt)
    llm.engine.block_manager.check_all_free()


def test_bad_adapters_are_one_line_input_errors(lora_setup, tmp_path, random_prompts):
    path, dirs, _, _ = lora_setup
    prompt = random_prompts([5])[0]
    llm = kiln.LLM(str(path), enable_lora=True, max_lora_rank=4)
    with pytest.raises(
        InputError, match=r"'a' has rank 8 at model\.layers\.\d\.\S+, above max_lora_rank 4"
    ):
        llm.generate(prompt_token_ids=[prompt], lora_request=LoRARequest("a", 1, str(dirs["a"])))
    with pytest.raises(InputError, match="'missing'.* is not a PEFT adapter"):
        llm.generate(
            prompt_token_ids=[prompt], lora_request=LoRARequest("missing", 2, str(tmp_path))
        )
    wide = tmp_path / "wide"  # made for a model with a wider q_proj
    wide.mkdir()
    shutil.copy(dirs["b"] / "adapter_config.json", wide)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{key}.lora_A.weight": torch.zeros(4, 64),
        f"{key}.lora_B.weight": torch.zeros(96, 4),
    }
    save_file(tensors, wide / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"'wide' does not fit the base model at .*q_proj: "):
        llm.generate(prompt_token_ids=[prompt], lora_request=LoRARequest("wide", 3, str(wide)))
    with pytest.raises(InputError, match="lora_int_id must be an int >= 1"):
        LoRARequest("x", 0, str(dirs["a"]))
    plain = kiln.LLM(str(path))
    with pytest.raises(InputError, match="enable_lora is off"):
        plain.generate(prompt_token_ids=[prompt], lora_request=LoRARequest("b", 1, str(dirs["b"])))
    llm.engine.block_manager.check_all_free()


@pytest.mark.gpu
def test_cuda_graphs_match_kiln_merged_models(lora_setup, random_prompts, tmp_path):
    """Triton shrink/expand inside decode and mixed CUDA graphs (float32: exact products)
    give each request the tokens of kiln's merged model for its adapter."""
    path, dirs, _, _ = lora_setup
    reqs = _requests(dirs)
    prompts = random_prompts([3, 40, 17, 90, 1, 33], seed=30)
    loras = [None, reqs["a"], reqs["b"], reqs["a"], reqs["b"], None]
    kw = dict(dtype="float32", device="cuda", kv_cache_memory_bytes=2**26)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    merged_dirs = {None: path}
    for name, d in dirs.items():
        merged_dirs[name] = tmp_path / name
        kiln.save_model(merge_and_unload(kiln.load_model(path, lora=d)), merged_dirs[name])
    want = []
    for prompt, lora in zip(prompts, loras):
        llm = kiln.LLM(str(merged_dirs[lora.lora_name if lora else None]), **kw)
        want.append(llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0])
    for engine_args in [{}, {"use_cuda_graph": False}, {"max_num_batched_tokens": 7}]:
        llm = kiln.LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=8,
                       attention_backend="triton", **kw, **engine_args)  # fmt: skip
        if not engine_args:
            assert llm.engine.runner.graph_runner.graphs
        out = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=loras)
        assert [o.outputs[0].token_ids for o in out] == [w.outputs[0].token_ids for w in want]
        llm.engine.block_manager.check_all_free()
