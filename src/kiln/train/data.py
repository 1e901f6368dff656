"""Token memmaps: a corpus of documents -> train.bin / val.bin (split by document) -> batches.

A batch is a pure function of its index: `TokenWindows(i)` draws the same random windows for
the same i on every run and every rank, so a resumed run sees exactly the data order of an
uninterrupted one, and N processes each taking a slice of the global batch see what one process
with the whole global batch sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kiln.errors import ConfigError, InputError

EOT = "<|endoftext|>"


def corpus_files(corpus: str | os.PathLike) -> list[Path]:
    """The documents of a corpus: a .txt file, or every .txt file of a directory (sorted)."""
    path = Path(corpus)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise ConfigError(f"corpus {str(path)!r} holds no .txt documents")
    return files


def train_char_tokenizer(
    files: Sequence[Path], out_dir: str | os.PathLike, specials: Sequence[str] = (EOT,)
) -> Path:
    """A character-level tokenizer (one id per distinct character, plus the special tokens).

    It is a plain tokenizer.json (WordLevel over single characters), so kiln and transformers
    load it like any other.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set().union(*(set(f.read_text(encoding="utf-8")) for f in files)))
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def split_documents(
    files: Sequence[Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Whole documents go to one side: a seeded shuffle picks round(val_fraction * n) for val."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(files)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order)))) if val_fraction else 0
    val = set(order[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def prepare_data(
    files: Sequence[Path],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 1337,
) -> dict:
    """Tokenize documents into out_dir/{train,val}.bin (each document + <|endoftext|>).

    Skips the work when out_dir/meta.json already describes the same files and tokenizer.
    Returns the metadata (dtype, token counts, which documents went where).
    """
    from kiln.tokenizer.hf import load_tokenizer

    out = Path(out_dir)
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    key = _fingerprint(files, tokenizer_json, val_fraction, seed)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
    tok = load_tokenizer(tokenizer_dir)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    train_docs, val_docs = split_documents(files, val_fraction, seed)
    eot = tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        texts = [f.read_text(encoding="utf-8") for f in docs]
        encodings = tok.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [e.ids + ([eot] if eot is not None else []) for e in encodings]
        arr = np.fromiter((t for doc in ids for t in doc), dtype=dtype)
        tmp = out / f"{split}.bin.tmp"
        arr.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        counts[split] = int(arr.size)
    meta = {
        "key": key,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "num_tokens": counts,
        "documents": {"train": [f.name for f in train_docs], "val": [f.name for f in val_docs]},
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return meta


def _fingerprint(files, tokenizer_json: Path, val_fraction: float, seed: int) -> str:
    h = hashlib.sha256(tokenizer_json.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{val_fraction}:{seed}".encode())
    return h.hexdigest()


class TokenWindows:
    """Random windows of block_size + 1 tokens from a memmap; batch i -> (x, y) [B, T] int64.

    Batch i is drawn from a generator seeded by (seed, i) as a global batch of
    batch_size * world_size rows, and each rank keeps its own rows.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: str,
        block_size: int,
        batch_size: int,
        seed: int = 1337,
    ):
        self.path = Path(path)
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        # (rank, world) of the data-parallel replicas; None: every process is one
        self.data_parallel: tuple[int, int] | None = None
        if len(self.tokens) < block_size + 1:
            raise InputError(
                f"{self.path.name} holds {len(self.tokens)} tokens, too few for one batch: "
                f"a window needs block_size + 1 = {block_size + 1}"
            )

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rank, world = self.data_parallel or _rank_world()
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.tokens) - self.block_size, self.batch_size * world)
        starts = starts[rank * self.batch_size : (rank + 1) * self.batch_size]
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts])
        rows = torch.from_numpy(rows.astype(np.int64))  # [B, T + 1]
        return rows[:, :-1], rows[:, 1:]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
