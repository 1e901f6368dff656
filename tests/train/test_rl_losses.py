"""The RL and preference losses against TRL's on the same inputs, within 1e-6.

Reward (Bradley-Terry), GRPO and KTO run TRL 1.16's own trainer methods on stand-in models
and trainers (as test_dpo does for DPO). TRL 1.x dropped PPOTrainer, and GRPO's advantages sit
inside a long generation method: those are TRL's formulas written out here, cited by file.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from kiln.train import grpo, kto, ppo, reward
from kiln.train.config import GRPOConfig, PPOConfig

identity = lambda x: x  # noqa: E731
ACCELERATOR = SimpleNamespace(
    device="cpu", gather=identity, gather_for_metrics=identity, unwrap_model=identity,
    reduce=lambda x, reduction: x, num_processes=1, sync_gradients=True,
)  # fmt: skip


def _masked(b, t, g, start_max=3):
    """A [b, t] completion mask: each row 1 over a random span."""
    mask = torch.zeros(b, t)
    for row in range(b):
        start = int(torch.randint(0, start_max, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[row, start:end] = 1
    return mask


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_matches_trl(center):
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 6, 1, generator=g) * 2
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=ACCELERATOR,
        args=SimpleNamespace(center_rewards_coefficient=center),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": torch.ones(12, 4, dtype=torch.long),
              "attention_mask": torch.ones(12, 4, dtype=torch.long)}  # fmt: skip
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    want = RewardTrainer.compute_loss(trainer, model, inputs)
    got = reward.bradley_terry_loss(*logits.squeeze(-1).chunk(2), center)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    metrics = trainer._metrics["train"]
    chosen, rejected = logits.squeeze(-1).chunk(2)
    assert math.isclose((chosen > rejected).float().mean().item(), metrics["accuracy"][0])


def _trl_grpo_loss(loss_type, beta, logps, old, ref, advantages, mask, eps, eps_high, max_len):
    """TRL 1.16 GRPOTrainer._compute_loss on fixed completion log-probs (a stand-in model)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, c = logps.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (logps, torch.rand(b, c), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model=SimpleNamespace(
        training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, max_completion_length=max_len, accelerator=ACCELERATOR,
        _metrics={"train": defaultdict(list)},
    )  # fmt: skip
    trainer.args.steps_per_generation = 1
    inputs = {
        "prompt_ids": torch.ones(b, 3, dtype=torch.long),
        "prompt_mask": torch.ones(b, 3, dtype=torch.long),
        "completion_ids": torch.ones(b, c, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, beta):
    g = torch.Generator().manual_seed(1)
    b, c, eps, eps_high, max_len = 8, 10, 0.2, 0.28, 12
    mask = _masked(b, c, g)
    logps = -torch.rand(b, c, generator=g) * 3
    old = logps + 0.3 * torch.randn(b, c, generator=g)  # ratios on both sides of the clip
    ref = logps + 0.5 * torch.randn(b, c, generator=g)
    advantages = torch.randn(b, generator=g)
    want, metrics = _trl_grpo_loss(loss_type, beta, logps, old, ref, advantages, mask, eps,
                                   eps_high, max_len)  # fmt: skip
    got, kl, _ = grpo.grpo_loss(logps, old, ref, advantages, mask, beta, eps, eps_high, loss_type,
                                max_len, tokens_per_micro_batch=mask.sum())  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if beta:
        kiln_kl = ((kl * mask).sum() / mask.sum()).item()
        assert math.isclose(kiln_kl, metrics["kl"][0], rel_tol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trls_formula(scale):
    # trl/trainer/grpo_trainer.py (1.16), _generate_and_score_completions:
    # advantages = rewards - mean over the group; divided by (std + 1e-4) unless "none", the
    # std (nanstd, Bessel-corrected) over the group ("group") or the whole batch ("batch")
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(2)
    rewards, n = torch.rand(24, generator=g).round(), 4
    mean = torch.nanmean(rewards.view(-1, n), dim=1).repeat_interleave(n)
    std = {"group": nanstd(rewards.view(-1, n), dim=1).repeat_interleave(n),
           "batch": nanstd(rewards).expand_as(rewards), "none": None}[scale]  # fmt: skip
    want = rewards - mean if std is None else (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(grpo.group_advantages(rewards, n, scale), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_matches_trl(loss_type):
    """TRL 1.16 KTOTrainer._compute_loss with precomputed reference log-probs."""
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(3)
    n, t, beta, dw, uw = 6, 9, 0.2, 1.0, 1.5
    mask = _masked(n, t, g).long()
    kl_mask = _masked(n, t, g).long()
    per_token = -torch.rand(n, t - 1, generator=g) * 2 * mask[:, 1:]
    kl_per_token = -torch.rand(n, t - 1, generator=g) * 2 * kl_mask[:, 1:]
    labels = torch.tensor([True, False, True, True, False, False])
    ref = per_token.sum(1) + torch.randn(n, generator=g)
    ref_kl = kl_per_token.sum(1) - torch.rand(n, generator=g)  # a positive KL estimate
    ids, kl_ids = torch.ones(n, t, dtype=torch.long), 2 * torch.ones(n, t, dtype=torch.long)

    def outputs(logps):
        zeros = torch.zeros(n, t - 1)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)

    def model(input_ids, **kw):
        return outputs(kl_per_token if input_ids is kl_ids else per_token)

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=ACCELERATOR, calculate_KL=True,
        aux_loss_enabled=False, precompute_ref_logps=True, loss_type=loss_type, beta=beta,
        desirable_weight=dw, undesirable_weight=uw, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_mask, "label": labels, "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }  # fmt: skip
    want = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    kl = (kl_per_token.sum(1) - ref_kl).mean().clamp(min=0)
    got, chosen, rejected = kto.kto_loss(per_token.sum(1), ref, labels, kl, beta, loss_type, dw, uw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    metrics = trainer._metrics["train"]
    assert math.isclose(kl.item(), metrics["kl"][0], rel_tol=1e-6)
    assert math.isclose(chosen.mean().item(), metrics["rewards/chosen"][0], rel_tol=1e-6)
    assert math.isclose(rejected.mean().item(), metrics["rewards/rejected"][0], rel_tol=1e-6)


# TRL v0.23, trl/trainer/ppo_trainer.py (PPOTrainer.train) and trl/core.py, written out.
INVALID_LOGPROB = 1.0


def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_masked_whiten(values, mask, shift_mean=True):
    mean = _trl_masked_mean(values, mask)
    var = _trl_masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _trl_ppo(args, scores, logprobs, ref_logprobs, values, sequence_lengths, new_logprobs, vpred):
    """One rollout's rewards, GAE and one micro-batch's loss, as PPOTrainer.train has them."""
    response_idxs = torch.arange(logprobs.shape[1]).repeat(logprobs.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1,
                             sequence_lengths)  # fmt: skip
    rewards[actual_start, actual_end] += scores  # TRL: rewards[[actual_start, actual_end]]
    if args.whiten_rewards:
        rewards = _trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = logprobs.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    # one micro-batch: the whole rollout
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - args.cliprange_value, values + args.cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * _trl_masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = _trl_masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    return pg_loss + args.vf_coef * vf_loss, advantages, returns, kl


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_objectives_match_trl_v023(kl_estimator, whiten_rewards):
    g = torch.Generator().manual_seed(4)
    b, r = 10, 7
    cfg = PPOConfig(kl_estimator=kl_estimator, whiten_rewards=whiten_rewards, gamma=0.99,
                    lam=0.9, kl_coef=0.1)  # fmt: skip
    sequence_lengths = torch.randint(0, r, (b,), generator=g)
    sequence_lengths[0] = r - 1  # a completion cut at the length limit
    logprobs = -torch.rand(b, r, generator=g) * 3
    ref_logprobs = logprobs + 0.4 * torch.randn(b, r, generator=g)
    values = torch.randn(b, r, generator=g)
    scores = torch.randn(b, generator=g) * 2
    new_logprobs = logprobs + 0.3 * torch.randn(b, r, generator=g)
    vpred = values + 0.5 * torch.randn(b, r, generator=g)
    want, adv, ret, kl = _trl_ppo(cfg, scores, logprobs, ref_logprobs, values, sequence_lengths,
                                  new_logprobs, vpred)  # fmt: skip
    out = ppo.ppo_advantages(scores, logprobs, ref_logprobs, values, sequence_lengths, cfg)
    torch.testing.assert_close(out["advantages"], adv, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["returns"], ret, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["kl"], kl, atol=1e-6, rtol=1e-6)
    got, stats = ppo.ppo_loss(new_logprobs, vpred, out, cfg)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert 0 < stats["pg_clipfrac"] < 1


def test_grpo_config_defaults_are_trls_where_kiln_keeps_them():
    from trl import GRPOConfig as TRLConfig

    trl = {name: f.default for name, f in TRLConfig.__dataclass_fields__.items()}
    ours = GRPOConfig()
    assert (ours.epsilon, ours.loss_type, ours.scale_rewards, ours.num_iterations) == (
        trl["epsilon"], trl["loss_type"], trl["scale_rewards"], trl["num_iterations"])  # fmt: skip
