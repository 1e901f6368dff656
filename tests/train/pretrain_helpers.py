"""Tiny models, corpora and configs shared by the pretraining tests."""

import random

import numpy as np
import torch

from kiln.model.transformer import Transformer
from kiln.train.config import ModelSpec, TrainConfig
from kiln.train.data import TokenWindows
from kiln.train.pretrain import add_dropout, model_config

WORDS = (
    "the king queen lord lady love death night day sword crown heart blood fair foul "
    "speak hear see come go stay fly thou thee thy my mine our your is are was be not"
).split()


def make_corpus(corpus):
    """A directory of 6 small documents of seeded random verse."""
    rng = random.Random(0)
    corpus.mkdir()
    for d in range(6):
        lines = [" ".join(rng.choices(WORDS, k=8)).capitalize() + "." for _ in range(60)]
        (corpus / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    return corpus


def tiny_model(seed: int = 0, dropout: float = 0.0, **spec) -> Transformer:
    """A 2-layer, 32-wide Llama-family model over a 64-token vocab."""
    fields = dict(num_layers=2, num_heads=2, hidden_size=32, block_size=16) | spec
    torch.manual_seed(seed)
    model = Transformer(model_config(ModelSpec(**fields), 64, 0, 1))
    model.init_weights()
    add_dropout(model, dropout)
    return model


def token_file(path, n: int = 4000, vocab: int = 64):
    tokens = np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16)
    tokens.tofile(path)
    return path


def windows(path, batch_size: int, seed: int = 0) -> TokenWindows:
    return TokenWindows(path, "uint16", block_size=16, batch_size=batch_size, seed=seed)


def train_config(out_dir, **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir), max_steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2,
        log_interval=1, eval_interval=3, eval_steps=2, ckpt_interval=3, device="cpu",
    )  # fmt: skip
    return TrainConfig(**(base | overrides))


def ddp_worker(rank: int, world_size: int, port: int, data, out_dir, fsdp: bool) -> None:
    """One process of a gloo group training the tiny model on its share of each batch."""
    import os

    import torch.distributed as dist

    from kiln.train.loop import train
    from kiln.train.pretrain import lm_loss

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        cfg = train_config(out_dir, batch_size=4 // world_size, fsdp=fsdp)
        train(tiny_model(), cfg, windows(data, 4 // world_size), lm_loss,
              windows(data, 2 // world_size, seed=1))  # fmt: skip
        # both ranks past their last collective before either tears gloo down (a rank that
        # destroyed the group while the other still ran one aborted in gloo's destructor)
        dist.barrier()
    finally:
        dist.destroy_process_group()
