"""The inference engine: paged KV cache, prefix caching, continuous batching, sampling."""

from kiln.engine.llm import LLM
from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
