"""One choice of kernels (kiln.engine.ops.Ops) at start-up, used by every part of the engine."""

import dataclasses
import importlib
import pkgutil

import pytest
import torch

import kiln.kernels
from kiln.engine import LLM, SamplingParams
from kiln.engine.ops import Ops, choose_ops
from kiln.kernels._triton import HAS_TRITON

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _ops_in_use(llm) -> list[Ops]:
    """The Ops of the backend, the graph runner, every fused layer and the sampler."""
    runner = llm.engine.runner
    found = [runner.backend.ops, runner.graph_runner.ops, llm.engine.core.sampler.ops]
    found += [m.ops for m in runner.model.modules() if hasattr(m, "ops")]
    return found


def _kernel_modules():
    for info in pkgutil.iter_modules(kiln.kernels.__path__):
        yield importlib.import_module(f"kiln.kernels.{info.name}")


def test_auto_chooses_the_references_off_cuda():
    cpu = torch.device("cpu")
    assert choose_ops("auto", cpu) == Ops.torch() == choose_ops("torch", cpu)
    assert choose_ops("triton", cpu) == Ops.triton()


def test_torch_backend_runs_the_torch_ops_everywhere(hf_model_dir, random_prompts, monkeypatch):
    """attention_backend="torch": the backend, the fused layers (GEMVs included) and the
    sampler all hold the reference ops, and no Triton kernel or per-call dispatcher is reached
    while the engine runs (each is replaced by a function that fails)."""
    path, _ = hf_model_dir("qwen3")
    llm = LLM(str(path), device="cpu", attention_backend="torch", gemv_max_batch=1)
    ops = llm.engine.runner.ops
    assert ops == Ops.torch()
    in_use = _ops_in_use(llm)
    assert len(in_use) > 3 and all(o is ops for o in in_use)
    triton_fns = set(dataclasses.astuple(Ops.triton())[1:])
    assert not triton_fns & set(dataclasses.astuple(ops)[1:])

    def forbidden(*args, **kwargs):
        raise AssertionError("a Triton kernel or a per-call dispatcher was reached")

    for module in _kernel_modules():
        for name, value in vars(module).items():
            if name.endswith("_triton") or name == "use_triton":
                if callable(value):
                    monkeypatch.setattr(module, name, forbidden)
    prompts = random_prompts((9, 1), seed=20)
    sampled = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True)
    out = llm.generate(prompt_token_ids=prompts * 2, sampling_params=[GREEDY] * 2 + [sampled] * 2)
    assert all(len(o.outputs[0].token_ids) == n for o, n in zip(out, (8, 8, 6, 6)))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter on CPU)")
def test_triton_ops_in_the_interpreter_give_the_torch_tokens(hf_model_dir, random_prompts):
    """attention_backend="triton" on CPU runs every Triton op in the interpreter (attention,
    norms, RoPE, the batch-1 GEMVs, the sampling kernel): greedy tokens are the references'."""
    path, _ = hf_model_dir("qwen3")
    prompts = random_prompts((13, 4), seed=21)
    runs = []
    for name in ("torch", "triton"):
        llm = LLM(str(path), device="cpu", attention_backend=name, max_num_batched_tokens=16)
        assert all(o == getattr(Ops, name)() for o in _ops_in_use(llm))
        batch = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
        alone = llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)  # GEMVs
        runs.append([o.outputs[0].token_ids for o in batch + alone])
        llm.engine.block_manager.check_all_free()
    assert runs[1] == runs[0]
