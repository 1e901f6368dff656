"""The inference engine: paged KV cache, prefix caching, continuous batching, sampling."""

from __future__ import annotations

from kiln import lazy_attributes

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LoRARequest"]

# Imported on first use, so that reading EngineConfig (the CLI's flags) does not load torch.
_LAZY = {
    "LLM": "kiln.engine.llm",
    "SamplingParams": "kiln.engine.sampling_params",
    "RequestOutput": "kiln.engine.outputs",
    "CompletionOutput": "kiln.engine.outputs",
    "LoRARequest": "kiln.engine.lora",
}

__getattr__ = lazy_attributes("kiln.engine", _LAZY)
