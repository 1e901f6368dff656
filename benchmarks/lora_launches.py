"""Kernel launches of one decode step with multi-LoRA off and on (tiny model; CPU or GPU).

Counts, in an eager decode step of 8 sequences, the Triton kernels launched (the Triton ops,
in the interpreter on CPU) and the torch ops that launch a kernel, under base requests, one
adapter and two (rank 16 on all seven projections). A CUDA graph replays the same launches.

    PYTHONPATH=src:benchmarks python benchmarks/lora_launches.py
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():  # (before kiln.kernels defines the kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_lora import TINY, build_model, write_adapter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kiln.engine import LLM, LoRARequest, SamplingParams  # noqa: E402
from kiln.kernels.lora import _shrink_kernel  # noqa: E402

# torch ops that launch no kernel (views, metadata, allocation)
NO_KERNEL = {"view", "_unsafe_view", "as_strided", "slice", "select", "unsqueeze", "squeeze",
             "reshape", "expand", "t", "transpose", "permute", "detach", "alias", "split",
             "split_with_sizes", "unbind", "narrow", "unflatten", "empty", "empty_like",
             "empty_strided", "promote_types", "_local_scalar_dense", "lift_fresh"}  # fmt: skip
SEQS = 8


class LaunchCounter(TorchDispatchMode):
    """Counts Triton launches (by kernel) and kernel-launching torch ops, not the torch ops
    a Triton launch makes itself (the interpreter's)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.inside = 0
        self.kernel_type = type(_shrink_kernel)
        self.run = self.kernel_type.run

    def __enter__(self):
        counter, run = self, self.run

        def counted(kernel, *args, **kwargs):
            if not counter.inside:
                counter.counts[f"triton {kernel.fn.__name__.strip('_')}"] += 1
            counter.inside += 1
            try:
                return run(kernel, *args, **kwargs)
            finally:
                counter.inside -= 1

        self.kernel_type.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        self.kernel_type.run = self.run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and name not in NO_KERNEL:
            self.counts[f"torch {name}"] += 1
        return func(*args, **(kwargs or {}))


def decode_launches(llm, loras) -> collections.Counter:
    """The launches of the last decode step of SEQS sequences, adapters round-robin."""
    model = llm.engine.runner.model
    forward, steps = model.hidden_states, []

    def hidden_states(ids, positions, backend):
        with LaunchCounter() as counter:
            out = forward(ids, positions, backend)
        steps.append((ids.shape[0], counter.counts))
        return out

    model.hidden_states = hidden_states
    prompts = [[5 + i] * (6 + i) for i in range(SEQS)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    per_request = [loras[i % len(loras)] for i in range(SEQS)]
    llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=per_request)
    model.hidden_states = forward
    return [counts for n, counts in steps if n == SEQS][-1]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(TINY, max_position_embeddings=512)
    engine = dict(attention_backend="triton", use_cuda_graph=False, max_num_seqs=SEQS)
    lora = dict(enable_lora=True, max_loras=2, max_lora_rank=16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(config, tmp / "model", device)
        loras = []
        for i in range(2):
            write_adapter(config, tmp / f"lora{i}", 16, seed=i)
            loras.append(LoRARequest(f"lora{i}", i + 1, str(tmp / f"lora{i}")))
        runs = [("enable_lora off", {}, [None]), ("base requests, enable_lora on", lora, [None]),
                ("1 adapter", lora, loras[:1]), ("2 adapters", lora, loras)]  # fmt: skip
        rows = [(label, decode_launches(LLM(str(tmp / "model"), **engine, **kw), requests))
                for label, kw, requests in runs]  # fmt: skip
    layers = config["num_hidden_layers"]
    print(f"\nkernel launches of one eager decode step ({SEQS} sequences, {layers} layers, "
          f"{device})")  # fmt: skip
    print("| run | launches | of which LoRA | what |\n|---|---|---|---|")
    for label, counts in rows:
        lora_launches = sum(n for k, n in counts.items() if "shrink" in k or "expand" in k)
        what = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
        print(f"| {label} | {sum(counts.values())} | {lora_launches} | {what} |")
    print("(a CUDA graph captures the LoRA kernels whenever enable_lora is on: there, a step "
          "of base requests launches as many as one with adapters)")  # fmt: skip


if __name__ == "__main__":
    main()
