"""Reward models: `kiln reward --model DIR --data PREFS.jsonl --out DIR`.

A reward model is the Transformer without its LM head and with `score`, a bias-free Linear
from the hidden size to one scalar: transformers' XForSequenceClassification (num_labels=1).
A sequence's reward is the score at its last token that is not the pad token, transformers'
rule, so a kiln reward model and the transformers model loaded from its directory agree.
Trained on preference pairs (kiln dpo's JSONL) with TRL's Bradley-Terry loss

    -log sigmoid(r(chosen) - r(rejected))  [+ c * mean((r(chosen) + r(rejected))^2)]

and saved in transformers' format (config.json naming LlamaForSequenceClassification, ...,
and `score.weight` beside the trunk's `model.*` tensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import CheckpointError, ConfigError
from kiln.flags import add_flags, flags_given
from kiln.train.config import RewardConfig
from kiln.train.default_model import DPO_DATA

DEFAULT_DATA = str(DPO_DATA)


def classification_architecture(causal: str) -> str:
    """transformers' sequence-classification class of a causal LM class."""
    if causal == "GPT2LMHeadModel":
        return "GPT2ForSequenceClassification"
    if not causal.endswith("ForCausalLM") or causal.startswith("Mamba"):
        raise ConfigError(f"{causal} has no sequence-classification form kiln saves")
    return causal.removesuffix("ForCausalLM") + "ForSequenceClassification"


class RewardModel(nn.Module):
    """`model` (the Transformer, its LM head dropped) and `score` [1, hidden]; forward gives
    one reward per row [B], read at each row's last token that is not `pad_token_id`."""

    def __init__(self, trunk: nn.Module, pad_token_id: int):
        super().__init__()
        trunk.lm_head = nn.Identity()  # a reward model scores; it predicts no tokens
        self.model = trunk
        self.config = trunk.config
        self.pad_token_id = pad_token_id
        w = trunk.embed_tokens.weight
        self.score = nn.Linear(self.config.hidden_size, 1, bias=False, device=w.device)
        nn.init.normal_(self.score.weight, std=0.02)  # transformers' initializer_range

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None):
        hidden = self.model.hidden_states(input_ids, positions)  # [B, T, H]
        last = last_token_index(input_ids, self.pad_token_id)  # [B]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, last].to(self.score.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def score_examples(self, examples) -> torch.Tensor:
        """Rewards [B] of tokenized examples (kiln.train.finetune_data.Example)."""
        from kiln.train.sft import collate

        batch = collate(examples, self.pad_token_id)
        device = self.score.weight.device
        return self(batch["input_ids"].to(device), batch["positions"].to(device)).float().cpu()


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Each row's last position holding a token other than the pad (transformers' rule)."""
    not_pad = (input_ids != pad_token_id).int()
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * not_pad).argmax(-1)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float | None = None
) -> torch.Tensor:
    """TRL RewardTrainer's loss over rewards [B] of the chosen and the rejected rows."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


class RewardLoss:
    """The loop's loss_fn over kiln dpo's pair batches (B chosen rows, then B rejected)."""

    def __init__(self, center_rewards_coefficient: float | None = None):
        self.center = center_rewards_coefficient

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        rewards = model(batch["input_ids"], batch["positions"]).float()
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, self.center)
        metrics = {
            "accuracy": (chosen > rejected).float().mean().detach(),
            "margin": (chosen - rejected).mean().detach(),
            "mean_reward": rewards.mean().detach(),
            "num_tokens": batch["num_tokens"],
        }
        return loss, metrics


def save_reward_model(model: RewardModel, out_dir: str | Path) -> Path:
    """A transformers XForSequenceClassification directory (num_labels=1)."""
    from kiln.model.hf_format import kiln_to_hf
    from kiln.model.loader import save_checkpoint_files

    config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.model.state_dict().items()}
    hf_state = kiln_to_hf(config, state)
    hf_state["score.weight"] = (
        model.score.weight.detach().contiguous().cpu().to(next(iter(hf_state.values())).dtype)
    )
    dtype = str(hf_state["score.weight"].dtype).removeprefix("torch.")
    hf_config = config.replace(dtype=dtype, pad_token_id=model.pad_token_id).to_hf()
    hf_config["architectures"] = [classification_architecture(hf_config["architectures"][0])]
    hf_config |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    return save_checkpoint_files(out_dir, hf_state, hf_config)


def load_reward_model(path: str | Path, dtype=None, device=None) -> RewardModel:
    """A reward model directory (save_reward_model's or transformers') as a RewardModel."""
    from kiln.config import ModelConfig
    from kiln.model.hf_format import hf_to_kiln, read_tensors, weight_files
    from kiln.model.loader import assign_tensor, default_device, resolve_dtype
    from kiln.model.transformer import Transformer

    path = Path(path)
    config = ModelConfig.from_dir(path)
    hf = config.hf_config
    arch = (hf.get("architectures") or [""])[0]
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if not arch.endswith("ForSequenceClassification") or labels != 1:
        raise CheckpointError(f"{path} is not a reward model (one-label sequence classifier)")
    if config.pad_token_id is None:
        raise CheckpointError(f"{path}/config.json has no pad_token_id to find the last token")
    device = torch.device(device or default_device())
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = RewardModel(Transformer(config), config.pad_token_id)
    expected = dict(model.model.named_parameters())
    loaded = set()
    for file in weight_files(path):
        for hf_name, tensor in read_tensors(file):
            if hf_name == "score.weight":
                model.score.weight = nn.Parameter(tensor.to(device, dtype), requires_grad=False)
                loaded.add(hf_name)
                continue
            for name, t in hf_to_kiln(config, hf_name, tensor):
                assign_tensor(model.model, expected, name, t, dtype, device)
                loaded.add(name)
    missing = sorted((set(expected) | {"score.weight"}) - loaded)
    if missing:
        raise CheckpointError(f"reward model {str(path)!r} lacks tensor {missing[0]!r}")
    model.model.reset_buffers(device)
    return model.eval()


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.train.finetune import add_finetune_arguments

    p = sub.add_parser("reward", help="train a reward model on preference JSONL (Bradley-Terry)")
    add_finetune_arguments(p, DEFAULT_DATA)
    add_flags(p, RewardConfig, "reward")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    from kiln.model.lora import merge_and_unload
    from kiln.train.distributed import init
    from kiln.train.dpo import load_pairs, pair_batches
    from kiln.train.finetune import prepare, train_config
    from kiln.train.finetune_data import split_train_val
    from kiln.train.loop import train

    cfg = train_config(args)
    reward_cfg = RewardConfig(**flags_given(RewardConfig, args))
    trunk, tok = prepare(args, cfg.device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = RewardModel(trunk, pad_id)
    model.score.requires_grad_(True)
    pairs = load_pairs(tok, args.data, args.max_seq_len)
    train_pairs, val_pairs = split_train_val(pairs, args.val_fraction, cfg.seed)
    train_batches = pair_batches(train_pairs, cfg.batch_size, pad_id, cfg.seed)
    val_batches = pair_batches(val_pairs, cfg.batch_size, pad_id, cfg.seed) if val_pairs else None
    loss_fn = RewardLoss(reward_cfg.center_rewards_coefficient)
    train(model, cfg, train_batches, loss_fn, val_batches, resume=args.resume)
    if init(cfg.device).is_main:
        merge_and_unload(model.model)  # LoRA: folded in; transformers loads one directory
        if model.config.dtype in ("bfloat16", "float16"):
            model.to(getattr(torch, model.config.dtype))
        tok.save(args.out)
        save_reward_model(model, args.out)
    print(f"saved reward model to {args.out}")
