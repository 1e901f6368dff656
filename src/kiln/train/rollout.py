"""Rollouts: completions that kiln's own engine samples from the policy being trained.

The engine (kiln.LLM: paged KV cache, continuous batching, CUDA graphs on a GPU) starts once
from the policy's directory. Before each rollout `sync` copies the policy's current weights into
the engine's model in place (EngineCore.load_weights; LoRA adapters folded in; nothing is
written to or read from disk), then `sample` queues every prompt with `n` completions and
steps the engine until all are done. Each Sample keeps token ids, text and the engine's
log-probability of its completion; kiln.train.rl turns a list of them into a training batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.errors import InputError
from kiln.train.config import RolloutConfig


@dataclass
class Prompt:
    """One prompt record: the prompt as written (text or chat messages), its token ids, and
    the record's other fields (what reward functions read as columns)."""

    prompt: str | list[dict]
    ids: list[int]
    record: dict[str, Any]


@dataclass
class Sample:
    """One completion of a Prompt."""

    prompt: Prompt
    completion_ids: list[int]
    completion: str
    logprob: float  # the engine's log-probability of the whole completion
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length"


def encode_prompt(tok, prompt: str | list[dict]) -> list[int]:
    """A text prompt's tokens (with the tokenizer's special tokens), or chat messages rendered
    through the chat template with the assistant's generation prompt."""
    if isinstance(prompt, str):
        return tok.encode(prompt)
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)


def load_prompts(tok, path: str | os.PathLike, max_prompt_len: int) -> list[Prompt]:
    """Read and tokenize a JSONL file of {"prompt": text or messages, ...other fields}."""
    from kiln.train.finetune_data import check_messages, read_jsonl

    prompts = []
    for where, record in read_jsonl(path):
        if "prompt" not in record:
            raise InputError(f'{where}: expected {{"prompt": ...}}, got keys {list(record)}')
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            prompt = check_messages(prompt, where, need_assistant=False)
        ids = encode_prompt(tok, prompt)
        if not ids or len(ids) > max_prompt_len:
            raise InputError(f"{where}: the prompt has {len(ids)} tokens; 1 to {max_prompt_len} "
                             "fit (--max-seq-len minus --max-completion-length)")  # fmt: skip
        prompts.append(Prompt(prompt, ids, {k: v for k, v in record.items() if k != "prompt"}))
    return prompts


class RolloutEngine:
    """kiln's engine sampling `cfg.num_generations` completions per prompt from a policy."""

    def __init__(self, model_dir: str, tok, cfg: RolloutConfig, device: torch.device | str):
        from kiln.engine import LLM, SamplingParams

        device = torch.device(device)
        engine_args = {}
        if device.type == "cuda":
            engine_args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(str(model_dir), device=device, tokenizer=tok, **engine_args)
        self.params = SamplingParams(
            n=cfg.num_generations,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_completion_length,
        )

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        """Copy the policy's weights (adapters folded in) into the engine's model in place."""
        from kiln.model.lora import merged_state_dict

        self.llm.engine.core.load_weights(merged_state_dict(policy))

    def sample(self, prompts: list[Prompt]) -> list[Sample]:
        """n completions of each prompt, prompt by prompt (a group's samples are adjacent)."""
        outs = self.llm.generate(prompt_token_ids=[p.ids for p in prompts],
                                 sampling_params=self.params)  # fmt: skip
        return [
            Sample(p, list(c.token_ids), c.text, c.cumulative_logprob or 0.0, c.finish_reason)
            for p, out in zip(prompts, outs)
            for c in out.outputs
        ]
