"""Group Relative Policy Optimization: `kiln grpo --model DIR --data PROMPTS --reward FN`.

Each rollout samples G = num_generations completions of each prompt with kiln's engine and
scores them (a verifiable Python reward, or a reward model). A completion's advantage is its
reward against its group's (TRL's scale_rewards):

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      std over the group ("group"),
                                                             the rollout ("batch"), or none

and the loss is TRL's GRPO loss over the completion tokens, with the ratio
rho_t = pi(y_t) / pi_old(y_t) (pi_old: the policy that sampled, detached) and the k3 KL
estimate to the reference, KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1:

    l_t = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t

aggregated per loss_type: "grpo" the mean of each completion's token mean, "bnpo" the mean
over the micro-batch's tokens, "dr_grpo" the sum over rows * max_completion_length, "dapo" the
sum over the rollout's tokens (each micro-batch normalized by the rollout's tokens per
micro-batch, so a step's accumulated gradient is the rollout's token mean).
"""

from __future__ import annotations

import argparse

import torch

from kiln.errors import InputError
from kiln.flags import add_flags, flags_given
from kiln.train.config import GRPO_LOSS_TYPES, GRPOConfig
from kiln.train.default_model import RL_DATA
from kiln.train.finetune_data import IGNORE
from kiln.train.rl import masked_mean, rollout_metrics, token_logps

DEFAULT_DATA = str(RL_DATA / "count.jsonl")
DEFAULT_REWARD = "kiln.train.rewards:count_continues"


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Rewards [N] (groups of `group` adjacent completions) -> advantages [N]."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale == "none":
        return rewards - mean
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        raise InputError(f"scale_rewards must be group, batch or none, got {scale!r}")
    return (rewards - mean) / (std + 1e-4)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    max_completion_length: int,
    tokens_per_micro_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(loss, per-token KL [B, T] or None, ratio [B, T]) over per-token logps [B, T] of the
    policy, the sampling policy and the reference, advantages [B] and the completion mask."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        assert ref_logps is not None, "beta != 0 needs the reference's logps"
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        assert tokens_per_micro_batch is not None, "dapo normalizes by the rollout's tokens"
        loss = (per_token * mask).sum() / torch.as_tensor(tokens_per_micro_batch).clamp(min=1.0)
    else:
        raise InputError(
            f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {loss_type!r}"
        )
    return loss, kl, ratio


class GRPOLoss:
    """The loop's loss_fn over rollout micro-batches (kiln.train.rl.RolloutBatches)."""

    def __init__(self, cfg: GRPOConfig, max_completion_length: int, temperature: float = 1.0):
        if cfg.loss_type not in GRPO_LOSS_TYPES:
            raise InputError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}")
        self.cfg, self.max_len, self.temperature = cfg, max_completion_length, temperature
        self.epsilon_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        from kiln.train.rl import logprob_gap

        logits = model(batch["input_ids"], batch["positions"])
        logps, entropy = token_logps(logits, batch["labels"], self.temperature)
        mask = (batch["labels"] != IGNORE).float()
        old = batch.get("old_logps", logps.detach())
        loss, kl, ratio = grpo_loss(
            logps, old, batch.get("ref_logps"), batch["advantages"], mask, self.cfg.beta,
            self.cfg.epsilon, self.epsilon_high, self.cfg.loss_type, self.max_len,
            batch.get("tokens_per_micro_batch"),
        )  # fmt: skip
        adv = batch["advantages"].unsqueeze(1)
        low = (ratio < 1 - self.cfg.epsilon) & (adv < 0)
        high = (ratio > 1 + self.epsilon_high) & (adv > 0)
        metrics = rollout_metrics(batch) | {
            "entropy": masked_mean(entropy, mask),
            "clip_ratio": masked_mean((low | high).float(), mask).detach(),
            "logprob_gap": logprob_gap(logps, batch),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
        return loss, metrics


class GRPORollouts:
    """make_rollout(r) for RolloutBatches: sample, score, group advantages, and the reference's
    (beta != 0) and the sampling policy's (more than one micro-batch or pass) logps."""

    def __init__(self, run, cfg: GRPOConfig, micro_batches: int):
        group = run.rollout.num_generations
        rows = run.rollout_rows()
        if rows % group:
            raise InputError(
                f"a rollout of {rows} completions (batch_size * grad_accum * "
                f"rollout_steps) is not a whole number of groups of {group}"
            )
        if group < 2:
            raise InputError("GRPO compares completions of a prompt: num_generations >= 2")
        self.run, self.cfg, self.micro_batches = run, cfg, micro_batches
        self.prompts = run.prompt_batches(rows // group)
        self.keep_old = micro_batches * cfg.num_iterations > 1

    @torch.no_grad()
    def __call__(self, r: int) -> dict:
        from kiln.train.loop import autocast, to_device
        from kiln.train.reference import reference_model
        from kiln.train.rl import sample_batch

        run = self.run
        samples, rewards = run.sample(self.prompts(r))
        rewards = torch.tensor(rewards, dtype=torch.float32)
        batch = sample_batch(samples, run.pad_id) | {
            "rewards": rewards,
            "advantages": group_advantages(rewards, run.rollout.num_generations,
                                           self.cfg.scale_rewards),
        }  # fmt: skip
        batch = to_device(batch, run.device)
        mask = batch["labels"] != IGNORE
        batch["tokens_per_micro_batch"] = mask.sum().float() / self.micro_batches
        temp = run.rollout.temperature
        with autocast(run.cfg, run.device):
            if self.cfg.beta != 0.0:
                with reference_model(run.policy, run.reference) as ref:
                    logits = ref(batch["input_ids"], batch["positions"])
                    batch["ref_logps"] = token_logps(logits, batch["labels"], temp)[0]
            if self.keep_old:
                logits = run.policy(batch["input_ids"], batch["positions"])
                batch["old_logps"] = token_logps(logits, batch["labels"], temp)[0]
        return batch


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.train.rl import add_rl_arguments

    p = sub.add_parser("grpo", help="GRPO: group-relative policy optimization with a reward")
    add_rl_arguments(p, DEFAULT_DATA)
    add_flags(p, GRPOConfig, "grpo")
    p.set_defaults(func=_cli)


def run_grpo(args: argparse.Namespace) -> dict:
    """`kiln grpo`: the policy trained on engine rollouts, exported to --out."""
    from kiln.train.rl import RLRun, RolloutBatches

    if args.reward is None and args.reward_model is None:
        args.reward = DEFAULT_REWARD
    cfg = GRPOConfig(**flags_given(GRPOConfig, args))
    run = RLRun(args)
    micro_batches = run.cfg.grad_accum * run.rollout.rollout_steps
    batches = RolloutBatches(GRPORollouts(run, cfg, micro_batches), micro_batches,
                             cfg.num_iterations, run.cfg.seed)  # fmt: skip
    loss_fn = GRPOLoss(cfg, run.rollout.max_completion_length, run.rollout.temperature)
    return run.train(run.policy, batches, loss_fn)


def _cli(args: argparse.Namespace) -> None:
    run_grpo(args)
