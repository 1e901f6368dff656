"""EngineCore.load_weights: a plain model's weights copied into the running (fused) engine
model in place give the tokens an engine started from those weights gives."""

import pytest
import torch

import kiln
from kiln.engine import LLM, SamplingParams
from kiln.errors import ConfigError, InputError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                          sampling_params=GREEDY)]  # fmt: skip


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: Triton ops, CUDA graphs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral", "gpt2"])
@pytest.mark.parametrize("fuse", [True, False])
def test_loaded_weights_give_the_other_models_tokens(
    hf_model_dir, random_prompts, name, fuse, device
):
    path, _ = hf_model_dir(name)
    other = kiln.load_model(path, device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = kiln.save_model(other, path.parent / f"{name}_other_{fuse}_{device}")
    prompts = random_prompts((5, 21, 12), seed=4)
    want = _tokens(LLM(str(saved), device=device, fuse_weights=fuse), prompts)
    llm = LLM(str(path), device=device, fuse_weights=fuse)
    before = _tokens(llm, prompts)  # fills the prefix cache with the old weights' K/V
    storage = [p.data_ptr() for p in llm.engine.runner.model.parameters()]
    llm.engine.core.load_weights(other.state_dict())
    assert _tokens(llm, prompts) == want != before
    assert [p.data_ptr() for p in llm.engine.runner.model.parameters()] == storage
    llm.engine.block_manager.check_all_free()


def test_load_weights_refuses_missing_or_foreign_tensors(hf_model_dir):
    path, _ = hf_model_dir("llama")
    llm = LLM(str(path), device="cpu")
    state = kiln.load_model(path, device="cpu").state_dict()
    with pytest.raises(ConfigError, match="not given"):
        llm.engine.core.load_weights({k: v for k, v in state.items() if "q_proj" not in k})
    with pytest.raises(ConfigError, match="has no 'extra.weight'"):
        llm.engine.core.load_weights(state | {"extra.weight": torch.zeros(1)})
    llm.engine.add_request("busy", None, GREEDY, [5, 6, 7])
    with pytest.raises(InputError, match="waits for every request"):
        llm.engine.core.load_weights(state)
