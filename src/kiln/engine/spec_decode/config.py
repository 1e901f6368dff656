"""SpeculativeConfig: what `speculative_config` (vLLM's names) asks of the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kiln.errors import InputError

METHODS = ("ngram", "draft_model")
PLANNED = ("medusa", "eagle", "early_exit")
# Speculation stops for a step once more sequences than this are live: a verify step of k + 1
# tokens per sequence costs more than the tokens it saves once the batch is compute bound
# (benchmarks/bench_spec.py measures the crossover; vLLM leaves it to the user).
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclass
class SpeculativeConfig:
    """method "ngram" (prompt lookup: the k tokens that followed the newest earlier match of
    the sequence's last n tokens, n from prompt_lookup_max down to prompt_lookup_min) or
    "draft_model" (`model`: a smaller checkpoint with the target's vocabulary)."""

    method: str | None = None
    model: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.method is None and self.model is not None:
            self.method = "draft_model"
        if self.method in PLANNED:
            raise InputError(
                f"speculative_config method {self.method!r} is not implemented yet "
                f"(available: {', '.join(METHODS)})", "speculative_config"
            )  # fmt: skip
        if self.method not in METHODS:
            raise InputError(
                f"speculative_config method must be one of {', '.join(METHODS)}, got "
                f"{self.method!r}", "speculative_config"
            )  # fmt: skip
        k = self.num_speculative_tokens
        if not isinstance(k, int) or k < 1:
            raise InputError(
                f"speculative_config needs num_speculative_tokens >= 1, got {k!r}",
                "speculative_config",
            )
        if self.method == "draft_model" and not self.model:
            raise InputError(
                "speculative_config method 'draft_model' needs 'model': the draft's directory",
                "speculative_config",
            )
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if lo is None and hi is None:
                lo, hi = 2, 5
            self.prompt_lookup_min = lo = hi if lo is None else lo
            self.prompt_lookup_max = hi = lo if hi is None else hi
            if not 1 <= lo <= hi:
                raise InputError(
                    f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, "
                    f"got {lo} and {hi}", "speculative_config"
                )  # fmt: skip
        if self.disable_by_batch_size < 1:
            raise InputError(
                f"speculative_config disable_by_batch_size must be >= 1, got "
                f"{self.disable_by_batch_size}", "speculative_config"
            )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """From the user's dict; unknown keys are an InputError naming them."""
        if not isinstance(d, dict):
            raise InputError(
                f"speculative_config must be a JSON object, got {d!r}", "speculative_config"
            )
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(
                f"unknown speculative_config key(s): {', '.join(unknown)}", "speculative_config"
            )
        return cls(**d)
