"""Direct Preference Optimization: `kiln dpo --model DIR --data FILE.jsonl --out DIR`.

Each line is `{"prompt", "chosen", "rejected"}`: the prompt is text or chat messages, each
completion text (or a one-message assistant list, TRL's conversational form). With logratio
= log pi(y|x) - log pi_ref(y|x) summed over the completion's tokens and
delta = logratio(chosen) - logratio(rejected), the losses are TRL's:

    sigmoid  -log sigmoid(beta * delta)                         (Rafailov et al., 2023)
    hinge    relu(1 - beta * delta)                             (SLiC)
    ipo      (delta / completion length - 1 / (2 * beta))^2     (Azar et al., 2023)

The reference is the same model with its LoRA adapters disabled (no second copy of the
weights), or a frozen copy of the starting weights under full fine-tuning.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import InputError
from kiln.flags import add_flags, flags_given
from kiln.train.config import DPO_LOSS_TYPES, DPOConfig
from kiln.train.default_model import DPO_DATA
from kiln.train.finetune_data import (
    IGNORE,
    Batches,
    Example,
    check_messages,
    encode_prompt_completion,
    split_train_val,
)
from kiln.train.sft import collate, token_losses

DEFAULT_DATA = str(DPO_DATA)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lens: torch.Tensor | None = None,
    rejected_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and implicit rewards beta * logratio for chosen and rejected [B]."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        assert chosen_lens is not None and rejected_lens is not None, "ipo needs lengths"
        per_token = chosen_logratios / chosen_lens.clamp(min=1)
        per_token = per_token - rejected_logratios / rejected_lens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise InputError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's trained (completion) tokens [2B]."""
    return -token_losses(model, batch).sum(-1)


class DPOLoss:
    """The loop's loss_fn; batches hold the B chosen rows, then the B rejected rows."""

    def __init__(self, beta: float, loss_type: str = "sigmoid", reference: nn.Module | None = None):
        if beta <= 0:
            raise InputError(f"beta must be > 0, got {beta}")
        if loss_type not in DPO_LOSS_TYPES:
            raise InputError(
                f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}"
            )
        self.beta, self.loss_type, self.reference = beta, loss_type, reference

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        from kiln.train.reference import reference_model

        with reference_model(model, self.reference) as ref:
            return sequence_logps(ref, batch)

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        ref_chosen, ref_rejected = self.reference_logps(model, batch).chunk(2)
        chosen, rejected = sequence_logps(model, batch).chunk(2)
        chosen_lens, rejected_lens = (batch["labels"] != IGNORE).sum(-1).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
            chosen_lens, rejected_lens,
        )  # fmt: skip
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
            "num_tokens": batch["num_tokens"],
        }
        return losses.mean(), metrics


def _completion(value, where: str, key: str) -> str:
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", ...}]
        msgs = check_messages(value, f"{where} ({key})")
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise InputError(f"{where}: {key} must be text or one assistant message")
        value = msgs[0]["content"]
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: {key} must be a non-empty string")
    return value


def load_pairs(tok, path, max_len: int) -> list[tuple[Example, Example]]:
    """Read, validate and tokenize a preference JSONL file into (chosen, rejected) examples."""
    from kiln.train.finetune_data import read_jsonl

    pairs = []
    for where, record in read_jsonl(path):
        missing = {"prompt", "chosen", "rejected"} - set(record)
        if missing:
            raise InputError(f"{where}: missing key(s) {', '.join(sorted(missing))}")
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            prompt = check_messages(prompt, where, need_assistant=False)
        pair = []
        for key in ("chosen", "rejected"):
            e = encode_prompt_completion(tok, prompt, _completion(record[key], where, key), where)
            pair.append(Example(e.input_ids[:max_len], e.loss_mask[:max_len]))
        if not any(pair[0].loss_mask) or not any(pair[1].loss_mask):
            raise InputError(f"{where}: the prompt fills all {max_len} tokens (--max-seq-len)")
        pairs.append(tuple(pair))
    return pairs


def pair_batches(pairs, batch_size: int, pad_id: int, seed: int) -> Batches:
    """batch(i): B chosen rows then B rejected rows, padded together."""

    def collate_pairs(picked):
        return collate([c for c, _ in picked] + [r for _, r in picked], pad_id)

    return Batches(pairs, batch_size, collate_pairs, seed)


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.train.finetune import add_finetune_arguments

    p = sub.add_parser("dpo", help="direct preference optimization on preference JSONL")
    add_finetune_arguments(p, DEFAULT_DATA)
    add_flags(p, DPOConfig, "dpo")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    from kiln.train.finetune import lora_config_from_args, prepare, run_training, train_config
    from kiln.train.reference import make_reference

    cfg, dpo_cfg = train_config(args), DPOConfig(**flags_given(DPOConfig, args))
    model, tok = prepare(args, cfg.device)
    reference = make_reference(model, lora=lora_config_from_args(args) is not None)
    loss_fn = DPOLoss(dpo_cfg.beta, dpo_cfg.loss_type, reference)
    pairs = load_pairs(tok, args.data, args.max_seq_len)
    train_pairs, val_pairs = split_train_val(pairs, args.val_fraction, cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_batches = pair_batches(train_pairs, cfg.batch_size, pad_id, cfg.seed)
    val_batches = pair_batches(val_pairs, cfg.batch_size, pad_id, cfg.seed) if val_pairs else None
    run_training(model, tok, args, cfg, train_batches, loss_fn, val_batches)
