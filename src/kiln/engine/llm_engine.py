"""LLMEngine: an EngineCore and an OutputProcessor in one process (what kiln.LLM drives).

add_request -> tokenize and check the prompt -> the core's queue; step() = one core step
(schedule, run the model, sample, token-level stops) -> the output processor (detokenize,
stop strings, RequestOutputs in the request's output_kind); sequences a stop string ended are
finished in the core. The server runs the same two halves in two processes (AsyncLLM).
"""

from __future__ import annotations

from pathlib import Path

from kiln.engine.core import EngineCore, check_fits_batch, check_prompt_ids
from kiln.engine.lora import LoRARequest
from kiln.engine.output_processor import OutputProcessor, StopRequest
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.structured import check_structured_outputs
from kiln.errors import InputError, MissingTokenizerError, WorkerDiedError


def load_engine_tokenizer(path: str | Path):
    """The model directory's tokenizer, or None when it has none (token ids in and out); a
    tokenizer file that exists but does not load is a TokenizerError, not a silent None."""
    from kiln.tokenizer.hf import load_tokenizer

    try:
        return load_tokenizer(path)
    except MissingTokenizerError:
        return None


def encode_prompt(
    tokenizer, prompt: str | None, prompt_token_ids: list[int] | None, max_model_len: int,
    vocab_size: int,
) -> list[int]:  # fmt: skip
    """The prompt's token ids; InputError for an empty, too long or out-of-vocab prompt."""
    if prompt_token_ids is None:
        if prompt is None:
            raise InputError("give a prompt or prompt_token_ids")
        if tokenizer is None:
            raise InputError("this model has no tokenizer: give prompt_token_ids")
        prompt_token_ids = tokenizer.encode(prompt)
    return check_prompt_ids(prompt_token_ids, max_model_len, vocab_size)


def check_params(
    tokenizer, params: SamplingParams, max_num_seqs: int, kv_eviction: str = "none"
) -> None:
    """What a request's settings need of the engine: stop strings need a tokenizer, and all
    n (best_of) sequences must fit in one batch (they are scheduled together; beam search
    runs each beam as a request of its own, which KV eviction cannot honour: every beam step
    would prefill its beam again, under the budget)."""
    if params.stop and tokenizer is None:
        raise InputError("stop strings need a tokenizer; this model has none", "stop")
    if params.structured_outputs is not None:
        if tokenizer is None:
            raise InputError("structured outputs need a tokenizer; this model has none",
                             "structured_outputs")  # fmt: skip
        check_structured_outputs(params.structured_outputs)
    if params.use_beam_search and kv_eviction != "none":
        raise InputError(
            f"use_beam_search does not combine with kv_eviction={kv_eviction!r}",
            "use_beam_search",
        )
    if not params.use_beam_search:
        check_fits_batch(params, max_num_seqs)


class LLMEngine:
    def __init__(self, model: str, dtype=None, device=None, tokenizer=None, **engine_args):
        if tokenizer is None:
            tokenizer = load_engine_tokenizer(model)
        eos = tokenizer.eos_token_ids if tokenizer is not None else None
        self.core = EngineCore(model, dtype=dtype, device=device, eos_token_ids=eos, **engine_args)
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self.config = self.core.config
        self.model_config = self.core.model_config
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = self.core.eos_token_ids
        self.device = self.core.device

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def runner(self):
        return self.core.runner

    def validate_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        """The prompt's token ids; InputError for an empty, too long or out-of-vocab prompt."""
        return encode_prompt(
            self.tokenizer, prompt, prompt_token_ids, self.max_model_len,
            self.model_config.vocab_size,
        )  # fmt: skip

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        params = params or SamplingParams()
        if params.use_beam_search:  # a client of the engine, not a kind of request
            raise InputError(
                "beam search drives the engine from outside: use kiln.LLM.generate",
                "use_beam_search",
            )
        if request_id in self.processor.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt, prompt_token_ids)
        check_params(self.tokenizer, params, self.config.max_num_seqs, self.config.kv_eviction)
        self.core.add_request(request_id, ids, params, lora_request)
        self.processor.add_request(request_id, prompt, ids, params)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (finish_reason 'abort')."""
        self.core.abort(request_id)
        return self.processor.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.processor.has_unfinished() or self.core.has_unfinished()

    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Run one core step; the outputs it produced (only finished ones unless `stream`)."""
        try:
            deltas = self.core.step()
        except WorkerDiedError:  # the core failed every request: so does the processor
            for rid in list(self.processor.requests):
                self.processor.abort(rid)
            raise
        outputs, stops = self.processor.process(deltas)
        self.apply_stops(stops)
        for rid, why in self.core.take_errors():
            self.processor.abort(rid)
            raise InputError(why, "structured_outputs")
        return outputs if stream else [o for o in outputs if o.finished]

    def apply_stops(self, stops: list[StopRequest]) -> None:
        for s in stops:
            self.core.finish_seq(s.request_id, s.index, "stop", s.stop)

    def stats(self) -> dict:
        return self.core.stats()
