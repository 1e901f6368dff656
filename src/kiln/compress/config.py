"""The options of `kiln prune`, `kiln distill` and `kiln qat`: plain dataclasses whose fields
become the verbs' flags (kiln.flags), so that a default lives only here. No torch import.

The training half of each verb (distillation, QAT, prune's recovery fine-tune) takes
FinetuneConfig's flags too (its --device is also where prune's calibration runs), and
TextData's: which text it trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "heads", "channels")
STRUCTURED = ("heads", "channels")


@dataclass
class PruneConfig:
    """`kiln prune`: what to remove and how the calibration text is cut."""

    method: str = field(
        default="wanda",
        metadata={"choices": list(PRUNE_METHODS), "help": "magnitude, wanda, sparsegpt "
                  "(unstructured or N:M); heads, channels (structured: the model shrinks)"},
    )  # fmt: skip
    sparsity: float | None = field(
        default=None,
        metadata={"help": "share of weights (heads, MLP channels) removed, in [0, 1); "
                  "with --pattern N:M it is N/M"},
    )  # fmt: skip
    pattern: str = field(
        default="", metadata={"help": "semi-structured N:M, e.g. 2:4 (N zeros in every M inputs)"}
    )
    calib: str | None = field(
        default=None, metadata={"help": "calibration text file (default: the bundled corpus)"}
    )
    calib_samples: int = field(default=128, metadata={"help": "calibration windows"})
    calib_len: int = field(default=512, metadata={"help": "tokens per calibration window"})
    recover_steps: int = field(
        default=0, metadata={"help": "steps of recovery fine-tuning on --corpus (0: none)"}
    )


@dataclass
class TextData:
    """The text a compression run trains on: windows of seq_len tokens from a corpus, split by
    document into train and validation as `kiln pretrain` splits it."""

    corpus: str | None = field(
        default=None,
        metadata={"help": "a .txt file or a directory of them (default: the bundled corpus)"},
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per training row (default: min(256, context))"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of documents held out for validation"}
    )


@dataclass
class DistillConfig:
    """`kiln distill`'s loss: alpha * T^2 * KL(teacher || student at temperature T)
    + (1 - alpha) * LM loss + hidden_weight * hidden-state matching."""

    temperature: float = field(default=2.0, metadata={"help": "softens both distributions"})
    alpha: float = field(
        default=0.5, metadata={"help": "weight of the KL term; 1 - alpha goes to the LM loss"}
    )
    hidden_weight: float = field(
        default=0.0,
        metadata={"help": "weight of matching student layer outputs to the teacher's (0: off)"},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "compute the teacher's top-k logits once into this directory, then "
                  "train without the teacher in memory (default: on the fly)"},
    )  # fmt: skip
    top_k: int = field(default=64, metadata={"help": "logits per token kept in --teacher-cache"})


@dataclass
class QATConfig:
    """`kiln qat`: the quantization the model trains under and is exported to."""

    bits: int = field(default=4, metadata={"choices": [4, 8], "help": "weight bits"})
    group_size: int = field(
        default=128, metadata={"help": "input columns per scale; -1: per output channel"}
    )
    sym: bool = field(default=True, metadata={"help": "symmetric grid (--no-sym: a zero point)"})
    act_bits: int = field(
        default=0,
        metadata={"choices": [0, 8], "help": "8: int8 per-token activations too (W8A8, needs "
                  "--bits 8 --group-size -1); 0: weights only"},
    )  # fmt: skip
