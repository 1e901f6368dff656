"""Tokenizer benchmark: kiln BPE training time, and encode throughput beside HF and tiktoken.

    .venv/bin/python benchmarks/bench_tokenizer.py [--vocab-size 8192] [--pattern gpt2]

Trains kiln's BPE on the bundled Shakespeare corpus, saves it as tokenizer.json, and encodes the
same corpus (one call per file) with kiln, HF `tokenizers` loading that file, and a
`tiktoken.Encoding` built from kiln's ranks. Everything runs on one thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers/tiktoken start their pools
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import tiktoken  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from kiln.tokenizer.bpe import BPETokenizer  # noqa: E402

CORPUS = Path(__file__).parents[1] / "data" / "shakespeare"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of(n: int, fn: Callable[[], object]) -> tuple[float, object]:
    runs = [timed(fn) for _ in range(n)]
    return min(t for t, _ in runs), runs[0][1]


def train_hf(texts: list[str], vocab_size: int) -> Tokenizer:
    """HF's BpeTrainer on the same corpus (GPT-2 regex), for a reference training time."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--pattern", default="gpt2", choices=["gpt2", "gpt4"])
    parser.add_argument("--repeats", type=int, default=3, help="encode runs; the best is shown")
    args = parser.parse_args()

    files = sorted(CORPUS.glob("*.txt"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(files)} files, {mb:.2f} MB; vocab {args.vocab_size}, {args.pattern}\n")

    train_s, kiln = timed(
        lambda: BPETokenizer.train(files, args.vocab_size, args.pattern, progress=False)
    )
    hf_train_s = (
        timed(lambda: train_hf(texts, args.vocab_size))[0] if args.pattern == "gpt2" else None
    )
    print(f"| training (vocab {args.vocab_size}) | seconds |")
    print("|---|---:|")
    print(f"| kiln BPETokenizer.train (pure Python, 1 core) | {train_s:.2f} |")
    if hf_train_s is not None:
        print(f"| HF BpeTrainer (Rust, reference) | {hf_train_s:.2f} |")

    with tempfile.TemporaryDirectory() as out:
        kiln.save(out)
        hf = Tokenizer.from_file(str(Path(out) / "tokenizer.json"))
    ranks = {token: i for i, token in kiln.vocab.items()}
    tt = tiktoken.Encoding(
        "kiln", pat_str=kiln.pattern, mergeable_ranks=ranks, special_tokens=kiln.special_tokens
    )

    fresh = BPETokenizer(kiln.vocab, kiln.merges, kiln.pattern, kiln.special_tokens)
    encoders = {
        "kiln (cold cache, first pass)": lambda: [fresh.encode(t) for t in texts],
        "kiln (warm cache)": lambda: [kiln.encode(t) for t in texts],
        "HF tokenizers": lambda: [
            e.ids for e in (hf.encode(t, add_special_tokens=False) for t in texts)
        ],
        "HF tokenizers, encode_batch_fast (1 thread)": lambda: [
            e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)
        ],
        "tiktoken": lambda: [tt.encode_ordinary(t) for t in texts],
    }
    kiln.encode(texts[0])  # warm the cache on part of the corpus; the rest fills in run one
    results = {}
    for name, fn in encoders.items():
        seconds, ids = timed(fn) if "cold" in name else best_of(args.repeats, fn)
        results[name] = (seconds, ids)
    reference = results["HF tokenizers"][1]
    assert all(ids == reference for _, ids in results.values()), "encoders disagree"
    tokens = sum(map(len, reference))

    hf_mbps = mb / results["HF tokenizers"][0]
    print(f"\n| encode ({tokens:,} tokens, ids identical) | MB/s | vs HF |")
    print("|---|---:|---:|")
    for name, (seconds, _) in results.items():
        mbps = mb / seconds
        print(f"| {name} | {mbps:.2f} | {mbps / hf_mbps:.2f}x |")


if __name__ == "__main__":
    main()
