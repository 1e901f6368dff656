"""PPO for language models: `kiln ppo --model DIR --data PROMPTS --reward-model RM`.

The policy carries a value head (a Linear on its last hidden states: V_t for every token).
Each rollout, kiln's engine samples completions; the reward model (or a Python reward) scores
each, and TRL v0.23's PPOTrainer turns the scores into per-token rewards and advantages, over
the completion positions t = 0 .. R-1 (R = max_completion_length; `end` the last token):

    KL_t    = logp_t - ref_t (k1) or exp(ref_t - logp_t) - 1 - (ref_t - logp_t) (k3),
              the reference being the starting policy (LoRA: the adapters disabled)
    r_t     = -kl_coef KL_t, plus the score at end + 1 (at end when that is past R)
    A_t     = GAE(r, V; gamma, lam), returns = A + V; A whitened over the rollout's tokens
    loss    = mean_t max(-A rho_t, -A clip(rho_t, 1 +- cliprange))
              + vf_coef 0.5 mean_t max((V'_t - ret_t)^2, (clip(V'_t, V_t +- cliprange_value)
              - ret_t)^2)

with TRL's masks: log-probs count through `end`, values through `end + 1`. Each rollout is
used for num_ppo_epochs passes of micro-batches through the shared loop.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from kiln.flags import add_flags, flags_given
from kiln.train.config import PPOConfig
from kiln.train.grpo import DEFAULT_DATA
from kiln.train.rl import masked_mean, rollout_metrics, token_logps

INVALID_LOGPROB = 1.0  # TRL's fill for log-probs past the end (their KL is then 0)


class PolicyWithValue(nn.Module):
    """The policy and a value head over its hidden states; forward -> (logits, values [B, T])."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        w = policy.embed_tokens.weight
        self.value_head = nn.Linear(policy.config.hidden_size, 1, device=w.device)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, positions=None):
        hidden = self.policy.hidden_states(input_ids, positions)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return self.policy.compute_logits(hidden), values


def response_view(x: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Per-position values [B, T] read at the completion's positions [B, width]: column k is
    the position that predicts completion token k (prompt_length - 1 + k), clamped to T - 1."""
    k = torch.arange(width, device=x.device)
    index = (prompt_lengths[:, None] - 1 + k).clamp(max=x.shape[1] - 1)
    return x.gather(1, index)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's unbiased masked variance."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    return masked_mean((values - mean) ** 2, mask) * n / (n - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True):
    """TRL's masked whitening: (x - mean) / sqrt(var + 1e-8), the mean kept unless shift_mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def ppo_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    sequence_lengths: torch.Tensor,
    cfg: PPOConfig,
) -> dict[str, torch.Tensor]:
    """TRL v0.23's rollout arithmetic over [B, R] completion tensors (sequence_lengths: the
    index of each completion's last token): masks, KL, rewards, advantages, returns."""
    idx = torch.arange(logprobs.shape[1], device=logprobs.device).expand_as(logprobs)
    padding_mask = idx > sequence_lengths[:, None]
    padding_mask_p1 = idx > (sequence_lengths + 1)[:, None]
    logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    values = values.masked_fill(padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if cfg.kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -cfg.kl_coef * kl
    rewards = non_score_reward.clone()
    end = sequence_lengths + 1
    end = torch.where(end < rewards.shape[1], end, sequence_lengths)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), end] += scores
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = rewards.masked_fill(padding_mask_p1, 0)
    advantages = gae(rewards, values, cfg.gamma, cfg.lam)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)
    return {
        "logprobs": logprobs, "values": values, "returns": returns, "advantages": advantages,
        "kl": kl, "non_score_reward": non_score_reward, "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
    }  # fmt: skip


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalized advantage estimation over [B, R], the value past the end taken as 0."""
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    return torch.stack(out[::-1], dim=1)


def ppo_loss(
    new_logprobs: torch.Tensor,
    vpred: torch.Tensor,
    batch: dict[str, torch.Tensor],
    cfg: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL v0.23's clipped policy and value objectives over a micro-batch's [B, R] tensors
    (`batch`: ppo_advantages' logprobs, values, returns, advantages and masks)."""
    pad, pad_p1 = batch["padding_mask"], batch["padding_mask_p1"]
    new_logprobs = new_logprobs.masked_fill(pad, INVALID_LOGPROB)
    vpred = vpred.masked_fill(pad_p1, 0)
    values, returns, adv = batch["values"], batch["returns"], batch["advantages"]
    vpred_clipped = torch.clamp(vpred, values - cfg.cliprange_value, values + cfg.cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpred_clipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~pad_p1)
    log_ratio = new_logprobs - batch["logprobs"]
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~pad)
    loss = pg_loss + cfg.vf_coef * vf_loss
    with torch.no_grad():
        stats = {
            "pg_loss": pg_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "pg_clipfrac": masked_mean((pg_losses2 > pg_losses).float(), ~pad),
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), ~pad_p1),
            "approxkl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


class PPOLoss:
    """The loop's loss_fn: the model is PolicyWithValue, the batch a rollout micro-batch."""

    def __init__(self, cfg: PPOConfig, width: int, temperature: float = 1.0):
        self.cfg, self.width, self.temperature = cfg, width, temperature

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        logits, values = model(batch["input_ids"], batch["positions"])
        logps, entropy = token_logps(logits, batch["labels"], self.temperature)
        view = lambda x: response_view(x, batch["prompt_lengths"], self.width)  # noqa: E731
        loss, stats = ppo_loss(view(logps), view(values.float()), batch, self.cfg)
        mask = (~batch["padding_mask"]).float()
        metrics = (
            rollout_metrics(batch)
            | stats
            | {
                "kl": batch["kl_sum"].mean(),
                "entropy": masked_mean(view(entropy), mask),
                "rlhf_reward": (batch["rewards"] + batch["non_score_reward_sum"]).mean(),
            }
        )
        return loss, metrics


class PPORollouts:
    """make_rollout(r) for RolloutBatches: sample, score, then (no gradient) the policy's
    log-probs and values and the reference's log-probs, and ppo_advantages over the rollout."""

    def __init__(self, run, model: PolicyWithValue, cfg: PPOConfig):
        self.run, self.model, self.cfg = run, model, cfg
        rows = run.rollout_rows()
        self.prompts = run.prompt_batches(max(1, rows // run.rollout.num_generations))
        self.width = run.rollout.max_completion_length

    @torch.no_grad()
    def __call__(self, r: int) -> dict:
        from kiln.train.loop import autocast, to_device
        from kiln.train.reference import reference_model
        from kiln.train.rl import sample_batch

        run, temp = self.run, self.run.rollout.temperature
        samples, scores = run.sample(self.prompts(r))
        scores = torch.tensor(scores, dtype=torch.float32)
        if self.cfg.missing_eos_penalty is not None:
            no_eos = torch.tensor([s.finish_reason == "length" for s in samples])
            scores[no_eos] -= self.cfg.missing_eos_penalty
        batch = to_device(sample_batch(samples, run.pad_id) | {"rewards": scores}, run.device)
        ids, pos, labels = batch["input_ids"], batch["positions"], batch["labels"]
        view = lambda x: response_view(x, batch["prompt_lengths"], self.width)  # noqa: E731
        with autocast(run.cfg, run.device):
            logits, values = self.model(ids, pos)
            logprobs = view(token_logps(logits, labels, temp)[0])
            with reference_model(run.policy, run.reference) as ref:
                ref_logprobs = view(token_logps(ref(ids, pos), labels, temp)[0])
        out = ppo_advantages(batch["rewards"], logprobs, ref_logprobs, view(values.float()),
                             batch["completion_lengths"] - 1, self.cfg)  # fmt: skip
        batch["kl_sum"] = out.pop("kl").sum(1)
        batch["non_score_reward_sum"] = out.pop("non_score_reward").sum(1)
        return batch | out


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.train.rl import add_rl_arguments

    p = sub.add_parser("ppo", help="PPO with a value head against a reward model or function")
    add_rl_arguments(p, DEFAULT_DATA)
    add_flags(p, PPOConfig, "ppo")
    p.set_defaults(func=_cli)


def run_ppo(args: argparse.Namespace) -> dict:
    """`kiln ppo`: the policy (and its value head) trained on engine rollouts; the policy is
    exported to --out."""
    from kiln.train.rl import RLRun, RolloutBatches

    if args.num_generations is None:
        args.num_generations = 1  # PPO's baseline is the value head, not a group
    cfg = PPOConfig(**flags_given(PPOConfig, args))
    run = RLRun(args)
    model = PolicyWithValue(run.policy)
    micro_batches = run.cfg.grad_accum * run.rollout.rollout_steps
    make = PPORollouts(run, model, cfg)
    batches = RolloutBatches(make, micro_batches, cfg.num_ppo_epochs, run.cfg.seed)
    return run.train(model, batches, PPOLoss(cfg, make.width, run.rollout.temperature))


def _cli(args: argparse.Namespace) -> None:
    run_ppo(args)
