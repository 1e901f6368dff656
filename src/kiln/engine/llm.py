"""kiln.LLM: offline batch generation, vLLM's interface.

Requests with `use_beam_search` run as clients of the engine (kiln.engine.beam_search): each
beam step queues one ordinary request per live beam, batched with every other request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import replace

from kiln.engine import pooling as pooling_
from kiln.engine.beam_search import BeamSearch
from kiln.engine.llm_engine import LLMEngine, check_params
from kiln.engine.lora import LoRARequest
from kiln.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
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
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in the prompts' order.
        `lora_request`: the adapter every prompt runs with, or one (or None) per prompt."""
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
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(ids)
        if len(loras) != len(ids):
            raise InputError(f"{len(loras)} lora_request entries for {len(ids)} prompts")
        if any(r is not None and p.use_beam_search for r, p in zip(loras, params)):
            raise InputError("beam search with a LoRA adapter is not supported", "lora_request")
        # Validate everything before queueing anything.
        ids = [self.engine.validate_prompt(t, i) for t, i in zip(texts, ids)]
        for p in params:
            cfg = self.engine.config
            check_params(self.tokenizer, p, cfg.max_num_seqs, cfg.kv_eviction)
        order, searches = [], {}
        for text, tok_ids, p, lora in zip(texts, ids, params, loras):
            rid = str(next(self._ids))
            order.append(rid)
            if p.use_beam_search:
                search = BeamSearch(
                    tok_ids, p, self.engine.eos_token_ids, self.engine.max_model_len
                )
                searches[rid] = text, search
                continue
            # one output per request, at its end: nothing is assembled while it runs
            p = replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            self.engine.add_request(rid, text, p, tok_ids, lora)
        return self._run(order, searches, use_tqdm)

    def embed(
        self,
        prompts: str | list[str] | None = None,
        prompt_token_ids: list[int] | list[list[int]] | None = None,
        pooling: str | None = None,
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt: its final hidden states pooled (`pooling` "mean" or
        "last"; the engine's `pooling` when None), L2-normalized, optionally cut to the first
        `dimensions`."""
        if (prompts is None) == (prompt_token_ids is None):
            raise InputError("give prompts or prompt_token_ids")
        if prompts is not None:
            items = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.engine.validate_prompt(p, None) for p in items]
        else:
            if prompt_token_ids and isinstance(prompt_token_ids[0], int):
                prompt_token_ids = [prompt_token_ids]
            ids = [self.engine.validate_prompt(None, list(p)) for p in prompt_token_ids]
        hidden = self.engine.model_config.hidden_size
        if dimensions is not None and not 1 <= dimensions <= hidden:
            raise InputError(f"dimensions must be in [1, {hidden}], got {dimensions}",
                             "dimensions")  # fmt: skip
        vecs = self.engine.core.embed(ids, pooling)
        if normalize:
            vecs = [pooling_.normalize(v, dimensions) for v in vecs]
        elif dimensions is not None:
            vecs = [v[:dimensions] for v in vecs]
        return [EmbeddingRequestOutput(str(next(self._ids)), i, EmbeddingOutput(v))
                for i, v in zip(ids, vecs)]  # fmt: skip

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

    def _run(
        self, order: list[str], searches: dict[str, tuple[str | None, BeamSearch]], use_tqdm: bool
    ) -> list[RequestOutput]:
        """Step the engine until every request is done; the beam searches advance in
        lockstep, each step's beam requests batched with everything else in flight."""
        done: dict[str, RequestOutput] = {}
        top = set(order)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="generate")

        def step_until(wanted: set[str]) -> None:
            while not wanted <= done.keys():
                assert self.engine.has_unfinished(), "waiting for requests the engine lacks"
                for out in self.engine.step(stream=False):
                    done[out.request_id] = out
                    if bar and out.request_id in top:
                        bar.update(1)

        while searches:
            steps = {rid: self._queue_beam_step(rid, s) for rid, (_, s) in searches.items()}
            step_until(set().union(*steps.values()))
            for rid, sub_ids in steps.items():
                text, search = searches[rid]
                search.advance([done.pop(sub) for sub in sub_ids])
                if search.finished:
                    done[rid] = search.output(self.tokenizer, rid, text)
                    del searches[rid]
                    if bar:
                        bar.update(1)
        step_until(top)
        if bar:
            bar.close()
        return [done[r] for r in order]

    def _queue_beam_step(self, rid: str, search: BeamSearch) -> list[str]:
        """Queue one ordinary request per live beam of `search`; their ids."""
        subs = search.step_requests(rid)
        for sub_id, prompt in subs:
            self.engine.add_request(sub_id, None, search.step_params, prompt)
        return [sub_id for sub_id, _ in subs]
