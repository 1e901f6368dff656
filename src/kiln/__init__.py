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
    "LoRARequest": "kiln.engine.lora",
    "quantize": "kiln.quant.quantize",
}


def lazy_attributes(module: str, table: dict[str, str]):
    """A module-level __getattr__ that imports each public name's module on first use."""

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_attributes("kiln", _LAZY)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
