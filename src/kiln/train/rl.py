"""What the RL verbs (`kiln grpo`, `kiln ppo`) share, on top of the shared loop.

    RolloutBatches   the loop's train_batch: a fresh rollout every `epochs` passes of
                     `micro_batches` micro-batches, sliced from it in a seeded order
    sample_batch     Samples -> rows of prompt + completion, next-token labels on the completion
    token_logps      per-token log-probabilities [B, T] (0 off the completion) and entropies
    plot_rl_curves   reward, KL, entropy and completion length against step, from log.jsonl

Rollout-level numbers ride in the batch as one value per row (`rewards`, `completion_lengths`,
...), so a loss function reports their means as metrics and the loop's log.jsonl holds them
per step beside the loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kiln.errors import InputError
from kiln.train.finetune_data import IGNORE, Example
from kiln.train.rollout import Sample

CURVES = ("reward", "kl", "entropy", "completion_length", "loss")
# per-token tensors [rows, T] aligned with input_ids: sliced to the longest row of a slice
TOKEN_KEYS = ("input_ids", "labels", "positions", "old_logps", "ref_logps")


def sample_batch(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per sample: its prompt and completion, right-padded; labels (next token, or
    IGNORE) train the completion only. Adds per-row `prompt_lengths`, `completion_lengths`,
    `seq_lengths`, `engine_logps` (the engine's completion log-probability) and `truncated`."""
    from kiln.train.sft import collate

    examples = [
        Example(s.prompt.ids + s.completion_ids,
                [False] * len(s.prompt.ids) + [True] * len(s.completion_ids))
        for s in samples
    ]  # fmt: skip
    batch = collate(examples, pad_id)

    def per_row(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype)

    return batch | {
        "prompt_lengths": per_row([len(s.prompt.ids) for s in samples]),
        "completion_lengths": per_row([len(s.completion_ids) for s in samples]),
        "seq_lengths": per_row([len(e) for e in examples]),
        "engine_logps": per_row([s.logprob for s in samples], torch.float32),
        "truncated": per_row([s.finish_reason == "length" for s in samples], torch.float32),
    }


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) [B, T] (0 where the label is IGNORE) of logits [B, T, V] / temperature,
    and the distribution's entropy [B, T] (no gradient: a metric)."""
    logp = (logits.float() / temperature).log_softmax(-1)
    trained = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return picked * trained, entropy * trained


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` (TRL's masked_mean over all axes)."""
    return (values * mask).sum() / mask.sum()


class RolloutBatches:
    """train_batch(i) for the loop: rollout r = make_rollout(r) serves `epochs` passes of
    `micro_batches` micro-batches (its rows in a seeded order each pass), then rollout r + 1 is
    made from the policy as it is by then. Per-row tensors are sliced, the padding beyond the
    slice's longest row dropped; other values pass through."""

    def __init__(self, make_rollout: Callable[[int], dict], micro_batches: int, epochs: int,
                 seed: int):  # fmt: skip
        self.make_rollout, self.micro_batches, self.epochs = make_rollout, micro_batches, epochs
        self.seed = seed
        self.index, self.rollout = -1, {}

    def __call__(self, i: int) -> dict:
        r, j = divmod(i, self.micro_batches * self.epochs)
        if r != self.index:
            self.rollout, self.index = self.make_rollout(r), r
        epoch, m = divmod(j, self.micro_batches)
        rows = self.rollout["input_ids"].shape[0]
        if rows % self.micro_batches:
            raise InputError(f"a rollout of {rows} rows does not split into "
                             f"{self.micro_batches} micro-batches")  # fmt: skip
        g = torch.Generator().manual_seed(self.seed * 100_003 + r * 1_009 + epoch)
        size = rows // self.micro_batches
        picked = torch.randperm(rows, generator=g)[m * size : (m + 1) * size]
        picked = picked.to(self.rollout["input_ids"].device)
        width = int(self.rollout["seq_lengths"][picked].max())
        out = {}
        for k, v in self.rollout.items():
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows:
                v = v[picked]
            out[k] = v[:, :width] if k in TOKEN_KEYS else v
        out["num_tokens"] = int(out["seq_lengths"].sum())
        return out


def rollout_metrics(batch: dict) -> dict[str, torch.Tensor]:
    """Means of the rollout's per-row numbers over a micro-batch."""
    return {
        "reward": batch["rewards"].mean(),
        "reward_std": batch["rewards"].std() if batch["rewards"].numel() > 1 else 0.0,
        "completion_length": batch["completion_lengths"].float().mean(),
        "truncated_ratio": batch["truncated"].mean(),
        "num_tokens": batch["num_tokens"],
    }


def logprob_gap(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean |trainer - engine| log-probability per completion token: how far the engine's
    sampling distribution is from the one trained (bf16 vs float32 kernels, a stale sync)."""
    gap = (logps.detach().sum(-1) - batch["engine_logps"]).abs()
    return (gap / batch["completion_lengths"].clamp(min=1)).mean()


def plot_rl_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """One panel per logged curve (reward, KL, entropy, completion length, loss) by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    curves = [k for k in CURVES if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
    for ax, key in zip(axes[0], curves):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def add_rl_arguments(p, default_data: str) -> None:
    """The RL verbs' flags: fine-tuning's (model, data, LoRA, training) and RolloutConfig's."""
    from kiln.flags import add_flags
    from kiln.train.config import RolloutConfig
    from kiln.train.finetune import add_finetune_arguments

    add_finetune_arguments(p, default_data)
    add_flags(p, RolloutConfig, "rollout")


class RLRun:
    """What an RL run starts from: the training config (a log line every step unless
    --log-interval says otherwise), policy and tokenizer, the rollout engine, the reward, the
    prompts and the reference policy."""

    def __init__(self, args, reference: bool = True):
        import dataclasses

        from kiln.flags import flags_given
        from kiln.train.config import RolloutConfig
        from kiln.train.distributed import resolve_device
        from kiln.train.finetune import lora_config_from_args, prepare, train_config
        from kiln.train.reference import make_reference
        from kiln.train.rewards import make_reward
        from kiln.train.rollout import RolloutEngine, load_prompts

        cfg = train_config(args)
        self.cfg = (
            cfg if args.log_interval is not None else dataclasses.replace(cfg, log_interval=1)
        )
        self.rollout = RolloutConfig(**flags_given(RolloutConfig, args))
        self.device = resolve_device(cfg.device)
        self.policy, self.tok = prepare(args, cfg.device)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.lora = lora_config_from_args(args) is not None
        self.reward_fn = make_reward(self.rollout.reward, self.rollout.reward_model, self.device)
        room = args.max_seq_len - self.rollout.max_completion_length
        if room < 1:
            raise InputError(
                f"--max-completion-length {self.rollout.max_completion_length} "
                f"leaves no room for a prompt in --max-seq-len {args.max_seq_len}"
            )
        self.prompts = load_prompts(self.tok, args.data, room)
        self.engine = RolloutEngine(args.model, self.tok, self.rollout, self.device)
        self.reference = make_reference(self.policy, self.lora) if reference else None
        self.args = args

    def rollout_rows(self) -> int:
        """Completions in a rollout: batch_size * grad_accum * rollout_steps."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.rollout.rollout_steps

    def prompt_batches(self, num_prompts: int):
        """prompts(r): the prompts of rollout r (seeded epochs over the prompt set)."""
        from kiln.train.finetune_data import Batches

        return Batches(self.prompts, num_prompts, list, self.cfg.seed)

    def sample(self, prompts) -> tuple[list[Sample], list[float]]:
        """The policy's current weights synced into the engine, then its samples and rewards."""
        from kiln.train.rewards import score

        self.engine.sync(self.policy)
        samples = self.engine.sample(prompts)
        rewards = score(
            self.reward_fn,
            [s.prompt.prompt for s in samples],
            [s.completion for s in samples],
            [s.prompt.record for s in samples],
        )
        return samples, rewards

    def train(self, model: nn.Module, rollout_batches: RolloutBatches, loss_fn) -> dict:
        """The shared loop over the rollouts; then the policy exported to --out, and the
        curves drawn to OUT/run/rl.png."""
        from kiln.train.distributed import init
        from kiln.train.finetune import export
        from kiln.train.loop import train

        result = train(model, self.cfg, rollout_batches, loss_fn, resume=self.args.resume)
        if init(self.cfg.device).is_main:
            export(self.policy, self.tok, self.args.out, self.args.model, self.lora)
            result["rl_plot"] = str(
                plot_rl_curves(result["log"], Path(self.cfg.out_dir) / "rl.png")
            )
        print(f"saved {'LoRA adapter' if self.lora else 'model'} to {self.args.out}")
        return result
