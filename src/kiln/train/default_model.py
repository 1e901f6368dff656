"""Where the bundled default model lives (built by `kiln demo`: BPE + pretraining on the bundled
Shakespeare, then a short SFT pass on the bundled chat set)."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import InputError

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO / "configs" / "default.toml"
DEFAULT_DIR = REPO / "models" / "default"


def built_chat_model(root: Path = DEFAULT_DIR) -> Path:
    """The default chat model's directory; InputError if `kiln demo` has not built it yet."""
    chat = root / "chat"
    if not (chat / "config.json").is_file():
        raise InputError(
            f"no --model given and the default model is not built ({chat}): run "
            "`kiln demo --no-serve` once, or pass --model DIR"
        )
    return chat
