"""kiln: a language model's whole life in one package.

model = kiln.load_model("path/to/hf_dir")          # one Transformer for every family
tok = kiln.load_tokenizer("path/to/hf_dir")
llm = kiln.LLM("path/to/hf_dir")                    # the inference engine
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `kiln --help` does not pay for torch.
_LAZY = {
    "load_model": "kiln.model.loader",
    "save_model": "kiln.model.loader",
    "Transformer": "kiln.model.transformer",
    "ModelConfig": "kiln.config",
    "load_tokenizer": "kiln.tokenizer.hf",
    "LLM": "kiln.engine.llm",
    "SamplingParams": "kiln.engine.sampling_params",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
