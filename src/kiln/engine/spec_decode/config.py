"""SpeculativeConfig: what `speculative_config` (vLLM's names) asks of the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kiln.errors import InputError

# proposers: prompt lookup, a draft model, and drafts over the target's own hidden states
# (kiln.engine.spec_decode.hidden: heads trained by `kiln train-draft`)
METHODS = ("ngram", "draft_model", "medusa", "eagle", "early_exit")
HIDDEN_METHODS = ("medusa", "eagle", "early_exit")
NEEDS_MODEL = {
    "draft_model": "the draft's directory",
    "medusa": "the directory `kiln train-draft` wrote",
    "eagle": "the directory `kiln train-draft` wrote",
}
# Speculation stops for a step once more sequences than this are live: a verify step of k + 1
# tokens per sequence costs more than the tokens it saves once the batch is compute bound
# (benchmarks/bench_spec.py measures the crossover; vLLM leaves it to the user).
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


def _error(message: str) -> InputError:
    return InputError(message, "speculative_config")


@dataclass
class SpeculativeConfig:
    """method "ngram" (prompt lookup: the k tokens that followed the newest earlier match of
    the sequence's last n tokens, n from prompt_lookup_max down to prompt_lookup_min),
    "draft_model" (`model`: a smaller checkpoint with the target's vocabulary), "medusa" /
    "eagle" (`model`: heads that `kiln train-draft` trained for this target) or "early_exit"
    (the target's first `exit_layer` layers and an exit head: `model`'s, or the target's own
    norm and LM head without one). `verify: false` (early_exit only) skips verification:
    every token comes from the exit head, a smaller and lossy model."""

    method: str | None = None
    model: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    exit_layer: int | None = None  # early_exit: layers the draft runs (None: the head's)
    verify: bool = True

    def __post_init__(self) -> None:
        if self.method is None and self.model is not None:
            self.method = "draft_model"
        if self.method not in METHODS:
            raise _error(
                f"speculative_config method must be one of {', '.join(METHODS)}, got "
                f"{self.method!r}"
            )
        if not isinstance(self.verify, bool):
            raise _error(f"speculative_config verify must be true or false, got {self.verify!r}")
        if not self.verify and self.method != "early_exit":
            raise _error(
                f"speculative_config verify: false applies to method 'early_exit' only (its "
                f"exit head alone decodes, lossy); method {self.method!r} always verifies"
            )
        k = self.num_speculative_tokens
        if self.verify and (not isinstance(k, int) or k < 1):
            raise _error(f"speculative_config needs num_speculative_tokens >= 1, got {k!r}")
        if self.method in NEEDS_MODEL and not self.model:
            raise _error(
                f"speculative_config method {self.method!r} needs 'model': "
                f"{NEEDS_MODEL[self.method]}"
            )
        self._check_exit_layer()
        if self.method == "ngram":
            self._check_lookup()
        if self.disable_by_batch_size < 1:
            raise _error(
                f"speculative_config disable_by_batch_size must be >= 1, got "
                f"{self.disable_by_batch_size}"
            )

    def _check_exit_layer(self) -> None:
        e = self.exit_layer
        if e is None:
            if self.method == "early_exit" and not self.model:
                raise _error(
                    "speculative_config method 'early_exit' needs 'exit_layer' (or a 'model' "
                    "directory whose exit head names it)"
                )
            return
        if self.method != "early_exit":
            raise _error(
                f"speculative_config exit_layer applies to method 'early_exit' only, not "
                f"{self.method!r}"
            )
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            raise _error(f"speculative_config exit_layer must be an int >= 1, got {e!r}")

    def _check_lookup(self) -> None:
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo, hi = 2, 5
        self.prompt_lookup_min = lo = hi if lo is None else lo
        self.prompt_lookup_max = hi = lo if hi is None else hi
        if not 1 <= lo <= hi:
            raise _error(
                f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, "
                f"got {lo} and {hi}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """From the user's dict; unknown keys are an InputError naming them."""
        if not isinstance(d, dict):
            raise _error(f"speculative_config must be a JSON object, got {d!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise _error(f"unknown speculative_config key(s): {', '.join(unknown)}")
        return cls(**d)
