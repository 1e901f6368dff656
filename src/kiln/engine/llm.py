"""kiln.LLM: offline batch generation, vLLM's interface."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import replace

from kiln.engine.llm_engine import LLMEngine, check_params
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import RequestOutputKind, SamplingParams
from kiln.errors import InputError


class LLM:
    """LLM(model_dir, dtype=None, device=None, **engine_args) -> .generate(), .chat()."""

    def __init__(self, model: str, dtype=None, device=None, **engine_args):
        self.engine = LLMEngine(model, dtype=dtype, device=device, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[int] | list[list[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in the prompts' order."""
        if prompts is not None and prompt_token_ids is not None:
            raise InputError("give prompts or prompt_token_ids, not both")
        if prompts is not None:
            items = [prompts] if isinstance(prompts, str) else list(prompts)
            texts, ids = items, [None] * len(items)
        elif prompt_token_ids is not None:
            if prompt_token_ids and isinstance(prompt_token_ids[0], int):
                prompt_token_ids = [prompt_token_ids]
            ids = [list(p) for p in prompt_token_ids]
            texts = [None] * len(ids)
        else:
            raise InputError("give prompts or prompt_token_ids")
        params = sampling_params or SamplingParams()
        if isinstance(params, Seq):
            if len(params) != len(ids):
                raise InputError(f"{len(params)} sampling_params for {len(ids)} prompts")
        else:
            params = [params] * len(ids)
        # Validate everything before queueing anything.
        ids = [self.engine.validate_prompt(t, i) for t, i in zip(texts, ids)]
        for p in params:
            check_params(self.tokenizer, p, self.engine.config.max_num_seqs)
        order = []
        for text, tok_ids, p in zip(texts, ids, params):
            rid = str(next(self._ids))
            # one output per request, at its end: nothing is assembled while it runs
            p = replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            self.engine.add_request(rid, text, p, tok_ids)
            order.append(rid)
        return self._run(order, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, **kwargs):
        """Generate a reply to one conversation (list of messages) or to several."""
        if self.tokenizer is None:
            raise InputError("chat needs a tokenizer; this model has none")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [
            self.tokenizer.apply_chat_template(
                c, add_generation_prompt=True, tokenize=True, **kwargs
            )
            for c in convs
        ]
        return self.generate(sampling_params=sampling_params, prompt_token_ids=ids)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="generate")
        while self.engine.has_unfinished():
            for out in self.engine.step(stream=False):
                if out.finished:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [done[r] for r in order]
