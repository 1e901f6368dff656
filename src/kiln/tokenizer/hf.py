"""Tokenizers from a model directory: tokenizer.json through HF `tokenizers`, plus the special
tokens and chat template of tokenizer_config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from kiln.errors import TokenizerError
from kiln.tokenizer.chat import render_chat

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


class Tokenizer:
    """encode / decode / apply_chat_template over a tokenizer.json."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_ids: list[int] | None = None,
    ):
        self.tokenizer = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        eos = {self.eos_token_id, *(extra_eos_ids or [])} - {None}
        self.eos_token_ids: set[int] = eos

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (special tokens added as the tokenizer's post-processor says)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation the way `transformers.apply_chat_template` does."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        text = render_chat(
            self.chat_template, messages, add_generation_prompt, self.special_tokens, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        cfg = {**self.special_tokens, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json (+ tokenizer_config.json, chat template) from a model directory."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"no tokenizer.json in {str(path)!r}")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{file}: cannot load tokenizer ({e})") from e
    directory = file.parent
    cfg = _read_json(directory / "tokenizer_config.json")
    special = {k: _token_text(cfg.get(k)) for k in SPECIAL_TOKEN_KEYS}
    template = cfg.get("chat_template")
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    if isinstance(template, list):  # named templates: use "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    gen = _read_json(directory / "generation_config.json")
    eos = gen.get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return Tokenizer(tok, special, template, extra)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
