"""The inference engine: paged KV cache, prefix caching, continuous batching, sampling."""

from __future__ import annotations

import importlib

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

# Imported on first use, so that reading EngineConfig (the CLI's flags) does not load torch.
_LAZY = {
    "LLM": "kiln.engine.llm",
    "SamplingParams": "kiln.engine.sampling_params",
    "RequestOutput": "kiln.engine.outputs",
    "CompletionOutput": "kiln.engine.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.engine' has no attribute {name!r}")
