"""Supervised fine-tuning on chat data: `kiln sft --model DIR --data FILE.jsonl --out DIR`.

Each line is `{"messages": [{"role", "content"}, ...]}`, rendered through the model's chat
template; only assistant tokens carry loss. With --pack, examples share rows of --max-seq-len
tokens: positions restart at each example and `PackedCausal` attends within an example only,
so a packed example computes exactly what it computes alone. Training runs in the shared loop
(kiln.train.loop); full fine-tuning saves an HF directory, LoRA a PEFT adapter directory.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kiln.train.default_model import SFT_DATA
from kiln.train.finetune_data import (
    IGNORE,
    Batches,
    Example,
    check_messages,
    encode_chat,
    pad,
    split_train_val,
)

DEFAULT_DATA = str(SFT_DATA)


class PackedCausal:
    """Attention backend for packed rows: causal within each example, blind across examples.

    seq_ids [B, T] numbers the examples of a row (padding gets its own id), positions [B, T]
    restart at 0 for each example.
    """

    def __init__(self, seq_ids: torch.Tensor, positions: torch.Tensor):
        t = seq_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
        self.mask = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal  # [B, T, T]
        self.distance = positions[:, :, None] - positions[:, None, :]  # [B, T, T]

    def attend(self, layer_idx, q, k, v, scale, sliding_window):
        mask = self.mask
        if sliding_window is not None:
            mask = mask & (self.distance < sliding_window)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One example a row, right-padded (causal attention never looks at the padding).

    A batch is a dict the loop moves to the device: input_ids, labels (next token or IGNORE)
    and positions [B, T], plus seq_ids [B, T] when packed.
    """
    ids, labels = pad(examples, pad_id)
    positions = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    num_tokens = sum(len(e) for e in examples)  # an int: the loop's throughput meter reads it
    return {"input_ids": ids, "labels": labels, "positions": positions, "num_tokens": num_tokens}


def pack(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several examples a row; positions restart and seq_ids separate them."""
    flat = [
        Example(sum((e.input_ids for e in r), []), sum((e.loss_mask for e in r), [])) for r in rows
    ]
    batch = collate(flat, pad_id)
    positions, labels = batch["positions"], batch["labels"]
    seq_ids = torch.full_like(positions, -1)  # padding: an "example" of its own
    for r, row in enumerate(rows):
        start = 0
        for i, e in enumerate(row):
            end = start + len(e)
            positions[r, start:end] = torch.arange(len(e))
            seq_ids[r, start:end] = i
            labels[r, end - 1] = IGNORE  # the next token belongs to the next example
            start = end
    return batch | {"seq_ids": seq_ids}


def pack_rows(examples: list[Example], max_len: int) -> list[list[Example]]:
    """Greedy first-fit of examples (in order) into rows of at most max_len tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in examples:
        for i, free in enumerate(room):
            if len(e) <= free:
                rows[i].append(e)
                room[i] -= len(e)
                break
        else:
            rows.append([e])
            room.append(max_len - len(e))
    return rows


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each trained token [B, T] (0 where the label is IGNORE)."""
    seq_ids = batch.get("seq_ids")
    backend = PackedCausal(seq_ids, batch["positions"]) if seq_ids is not None else None
    logits = model(batch["input_ids"], batch["positions"], backend)  # [B, T, vocab]
    labels = batch["labels"]
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return losses.view(labels.shape)


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the batch's assistant tokens (the loop's loss_fn)."""
    trained = (batch["labels"] != IGNORE).sum().clamp(min=1)
    return token_losses(model, batch).sum() / trained, {"num_tokens": batch["num_tokens"]}


def sft_batches(examples, batch_size, pad_id, max_len, packed, seed) -> Batches:
    """batch(i) of whole examples, or of rows of packed examples."""
    if packed:
        return Batches(
            pack_rows(examples, max_len), batch_size, lambda rows: pack(rows, pad_id), seed
        )
    return Batches(examples, batch_size, lambda ex: collate(ex, pad_id), seed)


def load_sft_examples(tok, path, max_len: int) -> list[Example]:
    """Read, validate and tokenize a chat JSONL file (examples cut to max_len tokens)."""
    from kiln.errors import InputError
    from kiln.train.finetune_data import read_jsonl

    examples = []
    for where, record in read_jsonl(path):
        if "messages" not in record:
            raise InputError(f'{where}: expected {{"messages": [...]}}, got keys {list(record)}')
        e = encode_chat(tok, check_messages(record["messages"], where), where)
        examples.append(Example(e.input_ids[:max_len], e.loss_mask[:max_len]))
    return examples


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`kiln sft`'s flags."""
    from kiln.train.finetune import add_finetune_arguments

    add_finetune_arguments(p, DEFAULT_DATA)
    p.add_argument("--pack", action="store_true", help="pack several examples per row")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (full or LoRA)")
    add_arguments(p)
    p.set_defaults(func=_cli)


def sft_args(argv: list[str]) -> argparse.Namespace:
    """The arguments `kiln sft ARGV...` runs with, for run_sft."""
    p = argparse.ArgumentParser(prog="kiln sft")
    add_arguments(p)
    return p.parse_args(argv)


def run_sft(args: argparse.Namespace) -> dict:
    """Fine-tune args.model on args.data and export the result to args.out (`kiln sft`)."""
    from kiln.train.finetune import prepare, run_training, train_config

    cfg = train_config(args)
    model, tok = prepare(args, cfg.device)
    examples = load_sft_examples(tok, args.data, args.max_seq_len)
    train_ex, val_ex = split_train_val(examples, args.val_fraction, cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    make = lambda ex: sft_batches(  # noqa: E731
        ex, cfg.batch_size, pad_id, args.max_seq_len, args.pack, cfg.seed
    )
    return run_training(
        model, tok, args, cfg, make(train_ex), sft_loss, make(val_ex) if val_ex else None
    )


def _cli(args: argparse.Namespace) -> None:
    run_sft(args)
