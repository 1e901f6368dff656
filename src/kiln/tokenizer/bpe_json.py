"""kiln's BPE as a Hugging Face tokenizer.json, and back.

Byte-level BPE stores each token's bytes as a string through GPT-2's byte-to-unicode map (every
byte becomes one printable character). kiln writes a Split pre-tokenizer holding its regex
followed by a regex-free ByteLevel one; it reads that layout and the plain ByteLevel one that
HF's own byte-level trainer writes.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import TokenizerError
from kiln.tokenizer.pretokenize import GPT2_PATTERN


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map: printable Latin-1 bytes map to themselves, the rest to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + n)) for n, b in enumerate(shifted))
    return chars


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_TO_CHARS = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})


def bytes_to_str(token: bytes) -> str:
    """A token's bytes as a byte-level vocabulary string."""
    return token.decode("latin-1").translate(_TO_CHARS)


def str_to_bytes(token: str) -> bytes | None:
    """A byte-level vocabulary string's bytes, or None if it is not one."""
    if any(c not in CHAR_TO_BYTE for c in token):
        return None
    return bytes(CHAR_TO_BYTE[c] for c in token)


def to_tokenizer_json(
    vocab: dict[int, bytes],
    merges: list[tuple[int, int, int]],
    pattern: str,
    special_tokens: dict[str, int],
) -> dict[str, Any]:
    """The tokenizer.json document of a byte-level BPE."""
    names = {i: bytes_to_str(b) for i, b in vocab.items()}
    model_vocab = {names[i]: i for i in sorted(names)}
    assert len(model_vocab) == len(names), "two token ids share one byte string"
    assert not set(special_tokens) & set(model_vocab), "a special token spells an ordinary token"
    model_vocab.update(special_tokens)
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": model_vocab,
            "merges": [[names[a], names[b]] for a, b, _ in merges],
        },
    }


def from_tokenizer_json(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """BPETokenizer keyword arguments from a byte-level BPE tokenizer.json document."""

    def refuse(what: str) -> TokenizerError:
        return TokenizerError(f"{source}: {what}; kiln reads byte-level BPE only")

    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise refuse(f"model type {model.get('type')!r}")
    if doc.get("normalizer") is not None:
        raise refuse(f"normalizer {doc['normalizer'].get('type')!r}")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise refuse(f"model option {key}={model[key]!r}")
    pattern, add_prefix_space = _read_pre_tokenizer(doc.get("pre_tokenizer"), refuse)

    special_tokens = {t["content"]: t["id"] for t in doc.get("added_tokens", [])}
    strings: dict[str, int] = model["vocab"]
    vocab: dict[int, bytes] = {}
    for s, i in strings.items():
        if s in special_tokens:  # HF keeps added tokens in the model vocabulary too
            continue
        token = str_to_bytes(s)
        if token is None:
            raise refuse(f"vocabulary entry {s!r} is not a byte-level string")
        vocab[i] = token
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in strings or b not in strings or a + b not in strings:
            raise refuse(f"merge {a!r} + {b!r} refers to tokens missing from the vocabulary")
        merges.append((strings[a], strings[b], strings[a + b]))
    if model.get("unk_token") is not None and len({b for t in vocab.values() for b in t}) < 256:
        raise refuse("an unk_token standing in for missing bytes")
    return {
        "vocab": vocab,
        "merges": merges,
        "pattern": pattern,
        "special_tokens": special_tokens,
        "add_prefix_space": add_prefix_space,
        "ignore_merges": bool(model.get("ignore_merges")),
    }


def _read_pre_tokenizer(pre: dict[str, Any] | None, refuse) -> tuple[str, bool]:
    """(regex, add_prefix_space) of ByteLevel(use_regex) or Sequence[Split, ByteLevel]."""
    if pre is None:
        raise refuse("no pre_tokenizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN, bool(pre.get("add_prefix_space", True))
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2:
        split, byte_level = steps
        if (
            split.get("type") == "Split"
            and "Regex" in split.get("pattern", {})
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", True)
        ):
            return split["pattern"]["Regex"], False
    raise refuse(f"pre_tokenizer {pre!r}")
