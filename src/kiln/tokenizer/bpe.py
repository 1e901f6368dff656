"""kiln's own byte-level BPE: train, encode, decode, and save/load as a HF tokenizer.json.

Text is split into pre-tokens by a regex (GPT-2's or GPT-4's), each pre-token's UTF-8 bytes
start as one token per byte, and merges apply lowest rank first, leftmost first, as HF
`tokenizers` and tiktoken do. Special tokens match only where `encode` is told to allow them.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
from collections.abc import Iterable, Sequence, Set
from itertools import chain
from pathlib import Path
from typing import Literal

import regex

from kiln.errors import TokenizerError
from kiln.tokenizer.bpe_json import from_tokenizer_json, to_tokenizer_json
from kiln.tokenizer.pretokenize import pattern_for, special_splitter

CACHE_SIZE = 1 << 18  # pre-tokens whose ids are remembered; cleared when full
AllowedSpecial = Literal["all"] | Set[str]


class _PieceCache(dict):
    """pre-token -> its token ids, computed on first lookup (a dict lookup stays in C on a hit)."""

    def __init__(self, encode_piece):
        super().__init__()
        self.encode_piece = encode_piece

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = self[piece] = self.encode_piece(piece)
        return ids


class BPETokenizer:
    """A byte-level BPE: ordinary tokens are byte strings, special tokens are matched text."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[int, int, int]],
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        add_prefix_space: bool = False,
        ignore_merges: bool = False,
    ):
        self.vocab = dict(vocab)  # ordinary token id -> bytes
        self.merges = list(merges)  # (left, right, merged) in rank order
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.add_prefix_space = add_prefix_space  # HF ByteLevel option: " " before each text
        self.ignore_merges = ignore_merges  # HF BPE option: a pre-token in the vocab is one token
        try:
            self._split = regex.compile(pattern).findall
        except regex.error as e:
            raise TokenizerError(f"bad pre-tokenization regex {pattern!r}: {e}") from e
        # Later duplicates win, as when HF collects its merge map.
        self._ranks = {(a, b): (rank, m) for rank, (a, b, m) in enumerate(self.merges)}
        by_bytes = {token: i for i, token in self.vocab.items()}
        self._byte_ids = [by_bytes.get(bytes([b])) for b in range(256)]
        self._whole = by_bytes if ignore_merges else None
        self._id_bytes = {**self.vocab, **{i: s.encode() for s, i in self.special_tokens.items()}}
        self._cache = _PieceCache(self._encode_piece)
        self._splitters: dict[frozenset[str], regex.Pattern | None] = {}

    @classmethod
    def train(
        cls,
        corpus: Iterable[str | os.PathLike],
        vocab_size: int,
        pattern: str = "gpt2",
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        progress: bool = True,
    ) -> BPETokenizer:
        """Learn merges from `corpus` (str items are text, paths are UTF-8 files)."""
        from kiln.tokenizer.bpe_train import count_words, learn_merges, read_corpus

        regex_str = pattern_for(pattern)
        specials = list(dict.fromkeys(special_tokens))
        if "" in specials:
            raise TokenizerError("a special token cannot be the empty string")
        if vocab_size < 256 + len(specials):
            raise TokenizerError(
                f"vocab_size {vocab_size} is too small: need at least 256 byte tokens "
                f"+ {len(specials)} special tokens = {256 + len(specials)}"
            )
        words = count_words(read_corpus(corpus), regex_str, specials, progress)
        if not words:
            raise TokenizerError("empty corpus: no text to train on")
        try:
            "".join(words).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start]
            raise TokenizerError(
                f"corpus holds a lone surrogate {bad!r}: no UTF-8 for it"
            ) from None
        vocab, merges = learn_merges(words, vocab_size - len(specials), progress)
        special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
        return cls(dict(enumerate(vocab)), merges, regex_str, special_ids)

    @property
    def n_vocab(self) -> int:
        """One past the largest token id."""
        return max(self._id_bytes) + 1

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids of `text`; special tokens match only if allowed ("all" or a set of them).

        A disallowed special token's text is encoded as ordinary text, so user input cannot
        forge control tokens.
        """
        splitter = self._splitter(allowed_special)
        if splitter is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(splitter.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self.encode_ordinary(part)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens."""
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        if len(self._cache) > CACHE_SIZE:
            self._cache.clear()
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))
        except UnicodeEncodeError:
            _check_utf8(text)
            raise

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that `ids` spell (special tokens spell their text)."""
        try:
            return b"".join(map(self._id_bytes.__getitem__, ids))
        except KeyError as e:
            raise TokenizerError(f"unknown token id {e.args[0]!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `out_dir`."""
        if self.add_prefix_space or self.ignore_merges:
            raise TokenizerError("cannot save a tokenizer loaded with HF-only options")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = to_tokenizer_json(self.vocab, self.merges, self.pattern, self.special_tokens)
        (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        }
        if "<|endoftext|>" in self.special_tokens:
            config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a byte-level BPE tokenizer.json (a file, or a directory holding one)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except OSError as e:
            raise TokenizerError(f"cannot read {str(file)!r}: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{str(file)!r} is not a JSON tokenizer file ({e})") from e
        return cls(**from_tokenizer_json(doc, str(file)))

    def _splitter(self, allowed_special: AllowedSpecial) -> regex.Pattern | None:
        names = frozenset(self.special_tokens if allowed_special == "all" else allowed_special)
        if names not in self._splitters:
            unknown = names - self.special_tokens.keys()
            if unknown:
                raise TokenizerError(f"not special tokens of this tokenizer: {sorted(unknown)}")
            self._splitters[names] = special_splitter(names)
        return self._splitters[names]

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        data = piece.encode("utf-8")
        if self._whole is not None and data in self._whole:
            return (self._whole[data],)
        # A byte missing from the vocabulary is dropped, as HF's BPE does without an unk token.
        ids = [i for i in map(self._byte_ids.__getitem__, data) if i is not None]
        return tuple(self._merge(ids))

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply merges lowest (rank, position) first: HF's algorithm, O(n log n) in length."""
        ranks = self._ranks
        n = len(ids)
        if n < 2:
            return ids
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = [(*ranks[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in ranks]
        heapq.heapify(heap)
        while heap:
            rank, merged, i = heapq.heappop(heap)
            j = nxt[i]
            # Skip entries that went stale: i was merged away, or its right neighbor changed.
            if ids[i] is None or j >= n or ranks.get((ids[i], ids[j]), (0, None))[1] != merged:
                continue
            ids[i], ids[j] = merged, None
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                if (ids[i], ids[k]) in ranks:
                    heapq.heappush(heap, (*ranks[ids[i], ids[k]], i))
            if prv[i] >= 0 and (ids[prv[i]], merged) in ranks:
                heapq.heappush(heap, (*ranks[ids[prv[i]], merged], prv[i]))
        return [t for t in ids if t is not None]


class IncrementalDecoder:
    """Decode a stream of token ids piece by piece, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: BPETokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, ids: Iterable[int], final: bool = False) -> str:
        """Text completed by `ids`; with `final`, also flush what is held back (as U+FFFD)."""
        return self._utf8.decode(self.tokenizer.decode_bytes(ids), final=final)


def _check_utf8(text: str) -> None:
    """Refuse text that UTF-8 cannot encode (lone surrogates), naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text holds a lone surrogate {text[e.start]!r} at index {e.start}; "
            "it has no UTF-8 encoding"
        ) from None
