"""Kahneman-Tversky Optimization: `kiln kto --model DIR --data FILE.jsonl --out DIR`.

Unpaired feedback: each line is `{"prompt", "completion", "label"}` with label true for a
desirable completion and false for an undesirable one (TRL's unpaired format); a preference
file (`{"prompt", "chosen", "rejected"}`, kiln dpo's) is read as one desirable and one
undesirable example per pair. With logratio = log pi(y|x) - log pi_ref(y|x) summed over the
completion, the losses are TRL's:

    kto                desirable 1 - sigmoid(beta (logratio - z)),
                       undesirable 1 - sigmoid(beta (z - logratio))
    apo_zero_unpaired  desirable 1 - sigmoid(beta logratio), undesirable sigmoid(beta logratio)

weighted by desirable_weight / undesirable_weight and averaged. The reference point z is
TRL's KL estimate: each batch also scores mismatched pairs, every prompt with the previous
row's completion (x_i, y_{i-1}), and z = max(0, mean(logratio of those)), without gradient.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kiln.errors import InputError
from kiln.flags import add_flags, flags_given
from kiln.train.config import KTO_LOSS_TYPES, KTOConfig
from kiln.train.default_model import DPO_DATA
from kiln.train.finetune_data import Batches, Example, split_train_val
from kiln.train.reference import reference_model

DEFAULT_DATA = str(DPO_DATA)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, rewards beta * logratio of the desirable rows, of the undesirable rows)
    over completion logps [B] of the policy and the reference, labels [B] (bool) and z."""
    logratios = logps - ref_logps
    chosen, rejected = logratios[labels], logratios[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - F.sigmoid(beta * chosen)
        rejected_losses = F.sigmoid(beta * rejected)
    else:
        raise InputError(f"loss_type must be one of {', '.join(KTO_LOSS_TYPES)}, got {loss_type!r}")
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return losses.nanmean(), beta * chosen.detach(), beta * rejected.detach()


class KTOLoss:
    """The loop's loss_fn; a batch holds B rows, then their B mismatched (KL) rows."""

    def __init__(self, cfg: KTOConfig, reference=None):
        if cfg.beta <= 0:
            raise InputError(f"beta must be > 0, got {cfg.beta}")
        if cfg.loss_type not in KTO_LOSS_TYPES:
            raise InputError(f"loss_type must be one of {', '.join(KTO_LOSS_TYPES)}")
        self.cfg, self.reference = cfg, reference

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        from kiln.train.dpo import sequence_logps

        cfg = self.cfg
        matched, mismatched = _halves(batch)
        with torch.no_grad():
            with reference_model(model, self.reference) as ref:
                ref_logps = sequence_logps(ref, batch)
            kl_logps = sequence_logps(model, mismatched)
        ref_matched, ref_mismatched = ref_logps.chunk(2)
        kl = (kl_logps - ref_mismatched).mean().clamp(min=0)
        logps = sequence_logps(model, matched)
        labels = batch["desirable"]
        loss, chosen, rejected = kto_loss(
            logps, ref_matched, labels, kl, cfg.beta, cfg.loss_type,
            cfg.desirable_weight, cfg.undesirable_weight,
        )  # fmt: skip
        metrics = {"kl": kl, "num_tokens": batch["num_tokens"]}
        if chosen.numel():
            metrics["rewards/chosen"] = chosen.mean()
        if rejected.numel():
            metrics["rewards/rejected"] = rejected.mean()
        return loss, metrics


def _halves(batch: dict) -> tuple[dict, dict]:
    """The matched rows and the mismatched (KL) rows of a batch, as batches of their own."""
    keys = ("input_ids", "labels", "positions")
    first, second = zip(*(batch[k].chunk(2) for k in keys))
    return dict(zip(keys, first)), dict(zip(keys, second))


def load_kto_examples(tok, path, max_len: int) -> list[tuple[str | list, str, bool]]:
    """(prompt, completion, desirable) from unpaired records or from preference pairs."""
    from kiln.train.dpo import _completion
    from kiln.train.finetune_data import check_messages, read_jsonl

    out = []
    for where, record in read_jsonl(path):
        prompt = record.get("prompt")
        if prompt is None:
            raise InputError(f"{where}: missing key prompt")
        if not isinstance(prompt, str):
            prompt = check_messages(prompt, where, need_assistant=False)
        if {"chosen", "rejected"} <= set(record):
            out.append((prompt, _completion(record["chosen"], where, "chosen"), True))
            out.append((prompt, _completion(record["rejected"], where, "rejected"), False))
        elif {"completion", "label"} <= set(record):
            if not isinstance(record["label"], bool):
                raise InputError(f"{where}: label must be true or false")
            completion = _completion(record["completion"], where, "completion")
            out.append((prompt, completion, record["label"]))
        else:
            raise InputError(f"{where}: expected completion and label (or chosen and rejected)")
    return out


def kto_batches(tok, examples, batch_size: int, max_len: int, pad_id: int, seed: int) -> Batches:
    """batch(i): B matched rows, then B mismatched rows (prompt i with completion i - 1)."""
    from kiln.train.finetune_data import encode_prompt_completion
    from kiln.train.sft import collate

    def encode(prompt, completion) -> Example:
        e = encode_prompt_completion(tok, prompt, completion)
        if not any(e.loss_mask[:max_len]):
            raise InputError(f"a prompt fills all {max_len} tokens (--max-seq-len)")
        return Example(e.input_ids[:max_len], e.loss_mask[:max_len])

    def collate_kto(picked):
        rows = [encode(p, c) for p, c, _ in picked]
        shifted = [picked[-1]] + picked[:-1]
        rows += [encode(p, c) for (p, _, _), (_, c, _) in zip(picked, shifted)]
        desirable = torch.tensor([d for _, _, d in picked])
        return collate(rows, pad_id) | {"desirable": desirable}

    return Batches(examples, batch_size, collate_kto, seed)


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.train.finetune import add_finetune_arguments

    p = sub.add_parser("kto", help="KTO on unpaired desirable / undesirable completions")
    add_finetune_arguments(p, DEFAULT_DATA)
    add_flags(p, KTOConfig, "kto")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    from kiln.train.finetune import lora_config_from_args, prepare, run_training, train_config
    from kiln.train.reference import make_reference

    cfg, kto_cfg = train_config(args), KTOConfig(**flags_given(KTOConfig, args))
    model, tok = prepare(args, cfg.device)
    loss_fn = KTOLoss(kto_cfg, make_reference(model, lora=lora_config_from_args(args) is not None))
    examples = load_kto_examples(tok, args.data, args.max_seq_len)
    train_ex, val_ex = split_train_val(examples, args.val_fraction, cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    make = lambda ex: kto_batches(tok, ex, cfg.batch_size, args.max_seq_len, pad_id, cfg.seed)  # noqa: E731
    run_training(model, tok, args, cfg, make(train_ex), loss_fn, make(val_ex) if val_ex else None)
