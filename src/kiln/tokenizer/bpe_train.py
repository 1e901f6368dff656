"""Byte-level BPE training with incremental pair counts.

The corpus is reduced to its unique pre-tokens ("words") with their frequencies. Each merge then
touches only the words that hold the merged pair: their old pairs are uncounted, the merge is
applied, their new pairs are counted. A max-heap with lazy invalidation picks the next pair, so
nothing is ever recounted over the whole corpus.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex
from tqdm import tqdm

from kiln.errors import TokenizerError
from kiln.tokenizer.pretokenize import special_splitter

Pair = tuple[int, int]


def read_corpus(items: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield the texts of `items`: a `str` is text, a path (`os.PathLike`) names a UTF-8 file."""
    for item in items:
        if not isinstance(item, os.PathLike):
            yield item
            continue
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(
                f"{str(path)!r} is not UTF-8 (bad byte at offset {e.start})"
            ) from e


def count_words(
    texts: Iterable[str], pattern: str, special_tokens: Iterable[str], progress: bool = True
) -> Counter[str]:
    """Frequencies of the pre-tokens of `texts`; special tokens are cut out, never learned from."""
    split = regex.compile(pattern).findall
    splitter = special_splitter(special_tokens)
    counts: Counter[str] = Counter()
    for text in tqdm(texts, desc="pre-tokenizing", unit=" texts", disable=not progress):
        chunks = [text] if splitter is None else splitter.split(text)[::2]
        for chunk in chunks:
            counts.update(split(chunk))
    return counts


def learn_merges(
    words: Counter[str], vocab_size: int, progress: bool = True
) -> tuple[list[bytes], list[tuple[int, int, int]]]:
    """Merge the most frequent adjacent pair until the vocabulary holds `vocab_size` tokens.

    Returns the vocabulary (token id -> bytes; ids 0-255 are the single bytes) and the merges
    `(left, right, merged)` in the order learned, which is the rank order encoding applies.
    Ties between equally frequent pairs go to the smaller `(left, right)` ids.
    """
    vocab = [bytes([i]) for i in range(256)]
    id_of = {b: i for i, b in enumerate(vocab)}
    seqs = [list(w.encode("utf-8")) for w in words]  # lone surrogates are refused by the caller
    freqs = list(words.values())
    pair_counts: defaultdict[Pair, int] = defaultdict(int)
    where: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> words that may hold it
    for wi, (seq, freq) in enumerate(zip(seqs, freqs)):
        for pair in zip(seq, seq[1:]):
            pair_counts[pair] += freq
            where[pair].add(wi)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int, int]] = []
    ranked: set[Pair] = set()
    bar = tqdm(total=vocab_size - len(vocab), desc="merging", unit=" tokens", disable=not progress)
    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -neg_count:  # stale: the count dropped since this entry was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count <= 0:
            continue
        left, right = pair
        token = vocab[left] + vocab[right]
        # Two different pairs can spell the same bytes; like HF's trainer, they share one id.
        merged = id_of.get(token)
        if merged is None:
            merged = id_of[token] = len(vocab)
            vocab.append(token)
            bar.update()
        if pair not in ranked:  # a pair re-formed by a shared id keeps its rank
            ranked.add(pair)
            merges.append((left, right, merged))
        grown = _apply_merge(seqs, freqs, where.pop(pair), pair, merged, pair_counts, where)
        for new_pair in grown:
            heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
    bar.close()
    return vocab, merges


def _apply_merge(
    seqs: list[list[int]],
    freqs: list[int],
    word_ids: set[int],
    pair: Pair,
    merged: int,
    pair_counts: defaultdict[Pair, int],
    where: defaultdict[Pair, set[int]],
) -> set[Pair]:
    """Merge `pair` in the given words, updating counts; return the pairs that gained counts.

    Only pairs holding `merged` can gain; every other pair can only lose, which the heap's lazy
    check catches when it pops them.
    """
    left, right = pair
    grown: set[Pair] = set()
    for wi in word_ids:
        seq = seqs[wi]
        out: list[int] = []
        i, n = 0, len(seq)
        while i < n:
            if seq[i] == left and i + 1 < n and seq[i + 1] == right:
                out.append(merged)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        if len(out) == n:  # stale index entry: this word lost the pair to an earlier merge
            continue
        freq = freqs[wi]
        for p in zip(seq, seq[1:]):
            pair_counts[p] -= freq
        for p in zip(out, out[1:]):
            pair_counts[p] += freq
            if merged in p:
                grown.add(p)
                where[p].add(wi)
        seqs[wi] = out
    return grown
