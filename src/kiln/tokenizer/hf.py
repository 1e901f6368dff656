"""Tokenizers from a model directory: tokenizer.json through HF `tokenizers`, plus the special
tokens and chat template of tokenizer_config.json.

Text a user wrote (a prompt, a message's content) never yields a special token: `encode` treats
special-token text as ordinary text unless asked (like `split_special_tokens=True` in
transformers), and a tokenized chat gets special tokens only from its template's own markers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from kiln.errors import MissingTokenizerError, TokenizerError
from kiln.tokenizer.chat import (
    Placeholders,
    compile_template,
    render_chat,
    special_text_pattern,
)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any, key: str, where: Path) -> str | None:
    """A special token's text from tokenizer_config.json: a string or a serialized AddedToken."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise TokenizerError(f"{where}: {key} must be a string, got {value!r:.80}")
    return text


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
        # A copy that reads special-token text as ordinary text (a flag of the tokenizer object,
        # so a second object rather than a toggle that concurrent encodes would race on).
        self._plain = HFTokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        added = tokenizer.get_added_tokens_decoder()
        self._specials = {i: t.content for i, t in added.items() if t.special}  # id -> text
        self._special_text = special_text_pattern(self._specials.values())
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

    def encode(
        self, text: str, add_special_tokens: bool = True, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `text`; special-token text in it is ordinary text unless allow_special.

        add_special_tokens: let the tokenizer's post-processor add its tokens (BOS, ...).
        """
        tok = self.tokenizer if allow_special else self._plain
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation the way `transformers.apply_chat_template` does.

        tokenize=True gives token ids in which only the template's own markers are special
        tokens: special-token text inside messages (or tools) is encoded as ordinary text.
        """
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        if not tokenize:
            return self._render(messages, add_generation_prompt, **kwargs)
        hidden = Placeholders(self._special_text)
        text = self._render(hidden.hide(messages), add_generation_prompt, **hidden.hide(kwargs))
        if not hidden.texts:
            return self.encode(text, add_special_tokens=False, allow_special=True)
        return self._encode_around_markers(text, hidden)

    def _render(self, messages, add_generation_prompt: bool, **kwargs: Any) -> str:
        return render_chat(
            self.chat_template, messages, add_generation_prompt, self.special_tokens, **kwargs
        )

    def _encode_around_markers(self, text: str, hidden: Placeholders) -> list[int]:
        """Ids of a rendered chat whose user text held special-token text, hidden: the special
        tokens found in `text` are the template's markers; the text between them, revealed, is
        encoded as ordinary text.

        The tokenizer itself encodes the text between special tokens piece by piece, so this
        gives its ids, except that a Metaspace pre-tokenizer with prepend_scheme="first" now
        prefixes "▁" to each piece rather than to the first only.
        """
        ids: list[int] = []
        pos = 0
        found = self.tokenizer.encode(text, add_special_tokens=False)
        for token, (start, end) in zip(found.ids, found.offsets):
            marker = self._specials.get(token)
            # a match of the marker's text (offsets take in any whitespace it strips), not an
            # id such as <unk> that the model gave a character it lacks
            if marker is not None and marker in text[start:end]:
                ids += self.encode(hidden.reveal(text[pos:start]), add_special_tokens=False)
                ids.append(token)
                pos = end
        return ids + self.encode(hidden.reveal(text[pos:]), add_special_tokens=False)

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
    """Load tokenizer.json (+ tokenizer_config.json, chat template) from a model directory.

    MissingTokenizerError when there is no tokenizer.json; TokenizerError naming the file when
    one of the files exists but does not load.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise MissingTokenizerError(f"no tokenizer.json in {str(path)!r}")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from e
    directory = file.parent
    cfg_file = directory / "tokenizer_config.json"
    cfg = _read_json(cfg_file)
    special = {k: _token_text(cfg.get(k), k, cfg_file) for k in SPECIAL_TOKEN_KEYS}
    template = _chat_template(cfg, cfg_file, directory / "chat_template.jinja")
    gen_file = directory / "generation_config.json"
    eos = _read_json(gen_file).get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(type(i) is int for i in extra):
        raise TokenizerError(f"{gen_file}: eos_token_id must be token ids, got {eos!r}")
    return Tokenizer(tok, special, template, extra)


def _chat_template(cfg: dict[str, Any], cfg_file: Path, jinja_file: Path) -> str | None:
    """The chat template (chat_template.jinja over tokenizer_config.json's), compiled once."""
    template, where = cfg.get("chat_template"), cfg_file
    if jinja_file.is_file():
        try:
            template, where = jinja_file.read_text(), jinja_file
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja_file}: not UTF-8 text ({e})") from e
    if isinstance(template, list):  # named templates: use "default"
        if not all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in template):
            raise TokenizerError(f"{where}: chat_template list needs {{name, template}} objects")
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise TokenizerError(f"{where}: chat_template must be a string, got {template!r:.80}")
    try:
        compile_template(template)
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from e
    return template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
