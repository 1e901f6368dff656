"""What the compression verbs that train share (distillation, QAT, prune's recovery
fine-tune): windows of corpus text cut as `kiln pretrain` cuts them, and the run's config.

The corpus is tokenized with the model's own tokenizer into token memmaps (kiln.train.data,
cached beside the run) and split by document with the run's seed, so that with the defaults
(the bundled corpus, val_fraction 0.1, seed 1337) a model `kiln pretrain` trained keeps its
held-out plays held out. Training itself is the shared loop (kiln.train.loop).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kiln.compress.config import TextData
from kiln.errors import InputError
from kiln.train.config import FinetuneConfig


def run_config(given: FinetuneConfig, out: str | Path, lr: float) -> FinetuneConfig:
    """FinetuneConfig with what the flags left unset derived: the run under OUT/run, `lr`
    (the verb's default) unless given."""
    return dataclasses.replace(given, lr=given.lr if given.lr is not None else lr).resolve(
        out, lora=False
    )


def text_windows(model_dir: str | Path, data: TextData, context: int, cfg: FinetuneConfig):
    """(train_batch, val_batch or None, seq_len): random (x, y) [batch_size, seq_len] windows
    of data.corpus in the tokenizer of model_dir, split by document (kiln.train.data)."""
    from kiln.train.data import TokenWindows, corpus_files, prepare_data
    from kiln.train.default_model import CORPUS

    seq_len = data.seq_len if data.seq_len is not None else min(256, context)
    if not 2 <= seq_len <= context:
        raise InputError(
            f"--seq-len {seq_len} must be in [2, {context}] (the model's context)", param="seq_len"
        )
    if not 0 <= data.val_fraction < 1:
        raise InputError(f"--val-fraction {data.val_fraction} must be in [0, 1)")
    files = corpus_files(data.corpus or CORPUS)
    out = Path(cfg.out_dir) / "data"
    meta = prepare_data(files, model_dir, out, data.val_fraction, cfg.seed)
    windows = dict(dtype=meta["dtype"], block_size=seq_len, batch_size=cfg.batch_size)
    train = TokenWindows(out / "train.bin", seed=cfg.seed, **windows)
    val = None
    if meta["num_tokens"]["val"]:
        val = TokenWindows(out / "val.bin", seed=cfg.seed + 1, **windows)
    return train, val, seq_len
