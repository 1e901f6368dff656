"""Pre-tokenization: the split regexes (GPT-2, GPT-4/cl100k) and special-token splitting.

BPE never merges across a pre-token boundary, so these regexes decide what a token can span.
"""

from __future__ import annotations

from collections.abc import Iterable

import regex

from kiln.errors import TokenizerError

# GPT-2's pattern; also what HF's ByteLevel pre-tokenizer uses when `use_regex` is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tiktoken's cl100k_base pattern (GPT-4); numbers split into runs of at most three digits.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


def pattern_for(name: str) -> str:
    """The regex of a named pre-tokenization pattern ("gpt2" or "gpt4")."""
    if name not in PATTERNS:
        raise TokenizerError(f"unknown pattern {name!r}; expected one of {sorted(PATTERNS)}")
    return PATTERNS[name]


def special_splitter(specials: Iterable[str]) -> regex.Pattern | None:
    """A regex whose captured matches are the special tokens (longest first), or None if none.

    `splitter.split(text)` then alternates ordinary text (even indices) and specials (odd).
    """
    # Longest first: alternation takes the first alternative that matches, HF takes the longest.
    ordered = sorted(set(specials), key=lambda s: (-len(s), s))
    if not ordered:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")")
