"""Rejection-sampling fine-tuning: `kiln rft --model DIR --data PROMPTS --reward FN --out DIR`.

Best-of-n: kiln's engine samples num_generations completions of every prompt, the reward
(a Python function or a reward model) scores them, and each prompt keeps its best completion
when it scores at least --min-reward. The kept pairs are written to OUT/best_of_n.jsonl
(prompt, completion, reward) and the model is fine-tuned on them with SFT's loss in the
shared loop (the completion's tokens only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kiln.errors import InputError
from kiln.train.grpo import DEFAULT_DATA, DEFAULT_REWARD


def best_of_n(samples, rewards: list[float], n: int, min_reward: float | None):
    """(sample, reward) of each group's best of its n samples (the first among ties), kept
    when it reaches min_reward."""
    kept = []
    for start in range(0, len(samples), n):
        group = list(zip(samples[start : start + n], rewards[start : start + n]))
        best = max(group, key=lambda sr: sr[1])
        if min_reward is None or best[1] >= min_reward:
            kept.append(best)
    return kept


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.train.rl import add_rl_arguments

    p = sub.add_parser("rft", help="rejection-sampling fine-tuning: best-of-n by reward, SFT")
    add_rl_arguments(p, DEFAULT_DATA)
    p.add_argument("--min-reward", type=float, default=None,
                   help="keep a prompt's best completion only from this reward on")  # fmt: skip
    p.set_defaults(func=_cli)


def run_rft(args: argparse.Namespace) -> dict:
    """`kiln rft`: sample, select, write OUT/best_of_n.jsonl, then SFT on the selection."""
    from kiln.train.finetune import run_training
    from kiln.train.finetune_data import Batches, Example
    from kiln.train.rl import RLRun
    from kiln.train.sft import collate, sft_loss

    if args.reward is None and args.reward_model is None:
        args.reward = DEFAULT_REWARD
    run = RLRun(args, reference=False)
    samples, rewards = run.sample(run.prompts)
    kept = best_of_n(samples, rewards, run.rollout.num_generations, args.min_reward)
    if not kept:
        raise InputError(f"no prompt's best completion reached --min-reward {args.min_reward}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "best_of_n.jsonl", "w") as f:
        for s, r in kept:
            f.write(json.dumps({"prompt": s.prompt.prompt, "completion": s.completion,
                                "reward": r}) + "\n")  # fmt: skip
    examples = [
        Example(s.prompt.ids + s.completion_ids, [False] * len(s.prompt.ids)
                + [True] * len(s.completion_ids))
        for s, _ in kept
    ]  # fmt: skip
    mean = sum(rewards) / len(rewards)
    best = sum(r for _, r in kept) / len(kept)
    print(f"best of {run.rollout.num_generations}: kept {len(kept)} of {len(run.prompts)} "
          f"prompts, mean reward {mean:.3f} -> {best:.3f}")  # fmt: skip
    batches = Batches(
        examples, run.cfg.batch_size, lambda ex: collate(ex, run.pad_id), run.cfg.seed
    )
    result = run_training(run.policy, run.tok, args, run.cfg, batches, sft_loss)
    return result | {"sample_reward": mean, "selected_reward": best, "kept": len(kept)}


def _cli(args: argparse.Namespace) -> None:
    run_rft(args)
