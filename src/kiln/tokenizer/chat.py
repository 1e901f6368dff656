"""Chat templates: Jinja2 rendering with the environment `transformers.apply_chat_template` uses,
and the placeholders that keep special-token text in user messages from passing for markers."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import TokenizerError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` ([{"role", "content"}, ...]) through a chat template."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} objects")
    try:
        return compile_template(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=kwargs.pop("tools", None),
            documents=kwargs.pop("documents", None),
            **(special_tokens or {}),
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from e


def special_text_pattern(specials: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of `specials` (longest first), or None when there are none."""
    texts = sorted({t for t in specials if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


class Placeholders:
    """Stand-ins for special-token text inside user-supplied values (message contents, tools).

    hide() swaps each occurrence for a placeholder before a template renders them, so every
    special token left in the rendered text is one of the template's own markers; reveal() puts
    the text back, to be encoded as ordinary text. A placeholder is a random run of digits
    between two private-use characters: no special token can match into it, and templates that
    trim, split or case-change a message leave it whole.
    """

    def __init__(self, special_text: re.Pattern | None):
        self.special_text = special_text
        self.nonce = f"{secrets.randbelow(10**16):016d}"
        self.texts: list[str] = []  # placeholder i stands for texts[i]
        self._placeholder = re.compile(f"\ue000{self.nonce}(\\d+)\ue001")

    def hide(self, value: Any) -> Any:
        """`value` with special-token text in its strings (nested in dicts, lists) hidden."""
        if isinstance(value, str):
            return self.special_text.sub(self._stand_in, value) if self.special_text else value
        if isinstance(value, dict):
            return {k: self.hide(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.hide(v) for v in value]
        return value

    def _stand_in(self, match: re.Match) -> str:
        self.texts.append(match.group())
        return f"\ue000{self.nonce}{len(self.texts) - 1}\ue001"

    def reveal(self, text: str) -> str:
        """`text` with each placeholder replaced by the special-token text it hides."""
        text = self._placeholder.sub(lambda m: self.texts[int(m.group(1))], text)
        if self.nonce in text:  # a template escaped the private-use characters (tojson ascii)
            raise TokenizerError(
                "the chat template rewrote message text that contains special tokens' text; "
                "cannot encode it safely"
            )
        return text
