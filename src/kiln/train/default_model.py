"""Where the bundled default model's inputs and outputs live.

Its inputs ship inside the package (kiln/data: the Shakespeare corpus, the SFT set, the training
config), so a non-editable install builds it as a checkout does. It is built (by `kiln demo`:
BPE + pretraining, then a short SFT pass) under $KILN_HOME/models/default, where KILN_HOME is
the checkout's root when kiln runs from one, else ~/.cache/kiln.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from kiln.errors import InputError

PACKAGE_DATA = Path(str(files("kiln") / "data"))
DEFAULT_CONFIG = PACKAGE_DATA / "default.toml"
CORPUS = PACKAGE_DATA / "shakespeare"
SFT_DATA = PACKAGE_DATA / "sft" / "shakespeare.jsonl"
DPO_DATA = PACKAGE_DATA / "dpo" / "shakespeare.jsonl"
RL_DATA = PACKAGE_DATA / "rl"  # toy verifiable tasks and preferences (data/build_rl_sets.py)


def kiln_home() -> Path:
    """$KILN_HOME; else the source checkout kiln runs from; else ~/.cache/kiln."""
    if os.environ.get("KILN_HOME"):
        return Path(os.environ["KILN_HOME"])
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "kiln").is_dir():
        return checkout
    return Path.home() / ".cache" / "kiln"


def default_dir() -> Path:
    return kiln_home() / "models" / "default"


def built_chat_model(root: Path | None = None) -> Path:
    """The default chat model's directory; InputError if `kiln demo` has not built it yet."""
    chat = (root or default_dir()) / "chat"
    if not (chat / "config.json").is_file():
        raise InputError(
            f"no --model given and the default model is not built ({chat}): run "
            "`kiln demo --no-serve` once, or pass --model DIR"
        )
    return chat
