"""`kiln train-draft`: train a speculative draft over a frozen target's hidden states.

    kiln train-draft --model DIR --method medusa|eagle|early_exit --out DRAFT [--self-distill]
    kiln serve --model DIR --speculative-config '{"method": "eagle", "model": "DRAFT",
               "num_speculative_tokens": 4}'

The target runs frozen over windows of text and gives, at each position, its final hidden state
and its next-token distribution p; the draft (kiln.engine.spec_decode.heads) learns p where it
will propose (KL(p || draft): what the rejection sampler accepts is the overlap with p):
- medusa: head i over h_t learns p_{t+1+i} (the token t + 2 + i);
- eagle: its layer over (x_{t+1}, h_t + noise) learns h_{t+1} (smooth L1) and p_{t+1};
- early_exit: norm + head over the output of layer exit_layer at t learns p_t.
Windows come from the bundled corpus (or --corpus, through the model's tokenizer), or with
--self-distill from the target's own greedy continuations of corpus prompts (random prompts for
a model without a tokenizer): the text the draft will see at inference. Training runs in the
shared loop (kiln.train.loop: warmup + cosine, AdamW, tqdm, log.jsonl, OUT/run/ checkpoint,
--resume); OUT gets the draft directory (draft_config.json + draft.safetensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.engine.spec_decode.heads import (
    DraftHead,
    EagleDraft,
    EarlyExitHead,
    MedusaHeads,
    save_draft,
)
from kiln.errors import InputError, MissingTokenizerError
from kiln.flags import add_flags, flags_given
from kiln.model.transformer import Transformer
from kiln.train.config import TrainConfig, _retuned

DRAFT_METHODS = ("medusa", "eagle", "early_exit")
EAGLE_NOISE = 0.1  # uniform noise on EAGLE's input features (its paper's U(-0.1, 0.1))
MEDUSA_DECAY = 0.8  # head i's loss weighs 0.8^i (Medusa's lambda_k)
# TrainConfig fields that have no say here (one process, no validation split)
SKIPPED = ("fsdp", "pipeline_parallel", "pipeline_schedule", "eval_interval", "eval_steps")


@dataclass
class DraftTrainConfig(TrainConfig):
    """TrainConfig with train-draft's defaults (a small head on a frozen target learns fast),
    and what the draft is and learns from. A None is derived from the run (`resolve`)."""

    method: str = field(
        default="eagle",
        metadata={"choices": list(DRAFT_METHODS), "help": "the draft (kiln.engine.spec_decode)"},
    )
    num_heads: int = field(default=4, metadata={"help": "medusa: heads (most tokens proposed)"})
    exit_layer: int | None = field(
        default=None, metadata={"help": "early_exit: layers the draft runs (num_layers // 4)"}
    )
    corpus: str | None = field(
        default=None, metadata={"help": ".txt file or directory (the bundled corpus if unset)"}
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per training window"})
    self_distill: bool = field(
        default=False, metadata={"help": "train on the target's own greedy continuations"}
    )
    num_prompts: int = field(default=256, metadata={"help": "self-distill: continuations"})
    prompt_len: int = field(default=32, metadata={"help": "self-distill: prompt tokens"})
    out_dir: str | None = field(
        default=None, metadata={"help": "where the checkpoint and log go (OUT/run if unset)"}
    )
    max_steps: int = _retuned("max_steps", 300)
    batch_size: int = _retuned("batch_size", 8)
    lr: float = _retuned("lr", 1e-3)
    min_lr: float = _retuned("min_lr", 1e-4)
    warmup_steps: int = _retuned("warmup_steps", 20)
    weight_decay: float = _retuned("weight_decay", 0.0)
    log_interval: int = _retuned("log_interval", 20)
    ckpt_interval: int | None = field(
        default=None, metadata={"help": "steps between checkpoints (max_steps if unset)"}
    )

    def resolve(self, out: str | Path, num_layers: int) -> DraftTrainConfig:
        """A copy with every None filled in and the draft's fields checked, for a run that
        writes its draft to `out` over a target of `num_layers` layers."""
        exit_layer = self.exit_layer if self.exit_layer is not None else max(1, num_layers // 4)
        if self.method == "early_exit" and not 1 <= exit_layer < num_layers:
            raise InputError(
                f"--exit-layer must be between 1 and {num_layers - 1} (the target has "
                f"{num_layers} layers), got {exit_layer}"
            )
        if self.num_heads < 1 or self.seq_len < 2:
            raise InputError(
                f"--num-heads must be >= 1 and --seq-len >= 2, got {self.num_heads} and "
                f"{self.seq_len}"
            )
        if self.self_distill and not 1 <= self.prompt_len < self.seq_len:
            raise InputError(
                f"--prompt-len must be between 1 and --seq-len - 1 = {self.seq_len - 1}, got "
                f"{self.prompt_len}"
            )
        return dataclasses.replace(
            self,
            exit_layer=exit_layer,
            out_dir=self.out_dir if self.out_dir is not None else str(Path(out) / "run"),
            ckpt_interval=self.ckpt_interval if self.ckpt_interval is not None else self.max_steps,
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-draft", help="train a Medusa / EAGLE / early-exit draft for speculative decoding"
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the target (HF directory)")
    p.add_argument("--out", required=True, metavar="DIR", help="the draft directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/run")
    add_flags(p, DraftTrainConfig, "draft training", skip=SKIPPED)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    cfg = DraftTrainConfig(**flags_given(DraftTrainConfig, args))
    result = train_draft(args.model, args.out, cfg, resume=args.resume)
    print(
        f"saved the {cfg.method} draft to {args.out}: loss {result['first_loss']:.4f} -> "
        f"{result['train_loss']:.4f} over {result['step']} steps"
    )


def train_draft(model_dir: str, out: str, cfg: DraftTrainConfig, resume: bool = False) -> dict:
    """Train a draft for the target in `model_dir` and write it to `out`; the loop's result
    (train_loss: the last logged loss) plus first_loss and every logged loss."""
    from kiln.model.loader import load_model
    from kiln.train.distributed import resolve_device
    from kiln.train.loop import train

    device = resolve_device(cfg.device)
    target = load_model(model_dir, device=device).requires_grad_(False)
    cfg = cfg.resolve(out, target.config.num_layers)
    stream = _token_stream(model_dir, cfg, device)
    if len(stream) <= cfg.seq_len:
        raise InputError(
            f"the training text holds {len(stream)} tokens, fewer than --seq-len {cfg.seq_len}"
        )
    module = DraftLoss(target, cfg)

    def batch(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size,), generator=g)
        return torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])

    result = train(module, cfg, batch, lambda m, ids: m(ids), resume=resume)
    save_draft(out, module.draft, target.config)
    lines = Path(result["log"]).read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    return result | {"first_loss": losses[0], "losses": losses}


def _token_stream(model_dir: str, cfg: DraftTrainConfig, device):
    """The training text as one int64 tensor: the corpus through the model's tokenizer, or
    the target's greedy continuations of prompts (corpus windows; random ids without one)."""
    from kiln.tokenizer.hf import load_tokenizer
    from kiln.train.data import corpus_files
    from kiln.train.default_model import CORPUS

    try:
        tok = load_tokenizer(model_dir)
    except MissingTokenizerError:
        if not cfg.self_distill:
            raise InputError(
                f"{model_dir!r} has no tokenizer.json to read the corpus with: pass "
                "--self-distill (the target's own continuations of random prompts)"
            ) from None
        tok = None
    g = torch.Generator().manual_seed(cfg.seed)
    corpus = None
    if tok is not None:
        files = corpus_files(cfg.corpus or CORPUS)
        ids = [t for f in files for t in tok.encode(f.read_text(), add_special_tokens=False)]
        corpus = torch.tensor(ids, dtype=torch.long)
        if not cfg.self_distill:
            return corpus
    return torch.tensor(_continuations(model_dir, cfg, device, corpus, g), dtype=torch.long)


def _continuations(model_dir, cfg: DraftTrainConfig, device, corpus, g) -> list[int]:
    """num_prompts prompts of prompt_len tokens, each continued greedily by the target to
    seq_len tokens, end to end."""
    from kiln.config import ModelConfig
    from kiln.engine import LLM, SamplingParams

    n, length = cfg.num_prompts, cfg.prompt_len
    if corpus is not None and len(corpus) > length:
        starts = torch.randint(0, len(corpus) - length, (n,), generator=g).tolist()
        prompts = [corpus[s : s + length].tolist() for s in starts]
    else:
        vocab = ModelConfig.from_dir(model_dir).vocab_size
        prompts = torch.randint(0, vocab, (n, length), generator=g).tolist()
    llm = LLM(model_dir, device=str(device))
    params = SamplingParams(temperature=0.0, max_tokens=cfg.seq_len - length, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=True)
    del llm  # its KV pool goes before training starts
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [t for p, o in zip(prompts, outs) for t in p + o.outputs[0].token_ids]


def _kl(logits, p):
    """KL(p || softmax(logits)), mean over positions: logits [..., V] against the target's
    distributions p [..., V] (0: the draft proposes as the target samples)."""
    return (p * (p.clamp_min(1e-30).log() - logits.float().log_softmax(-1))).sum(-1).mean()


class DraftLoss(nn.Module):
    """The frozen target and the draft it trains; forward(ids [B, T]) -> (loss, metrics),
    metrics["agree"]: how often the draft's first proposal is the target's argmax."""

    def __init__(self, target: Transformer, cfg: DraftTrainConfig):
        super().__init__()
        self.target, self.method = target, cfg.method
        config = target.config
        if cfg.method == "medusa":
            draft = MedusaHeads(config.hidden_size, cfg.num_heads)
        elif cfg.method == "eagle":
            draft = EagleDraft(config)
        else:
            draft = EarlyExitHead(config, cfg.exit_layer)
        param = next(target.parameters())
        self.draft = draft.to(device=param.device, dtype=torch.float32).bind(target)
        init_from_target(self.draft, target)
        self._exit = None  # early_exit: the output of layer exit_layer, caught by a hook
        if cfg.method == "early_exit":
            target.layers[cfg.exit_layer - 1].register_forward_hook(self._catch_exit)

    def _catch_exit(self, module, args, output) -> None:
        self._exit = output

    def forward(self, ids: torch.Tensor):
        with torch.no_grad():
            hidden = self.target.hidden_states(ids)  # [B, T, H]
            p = self.target.compute_logits(hidden).float().softmax(-1)  # [B, T, V]
        if self.method == "medusa":
            return self._medusa(hidden, p)
        if self.method == "eagle":
            return self._eagle(ids, hidden, p)
        logits = self.draft(self._exit)
        return _kl(logits, p), {"agree": _agree(logits, p)}

    def _medusa(self, hidden, p):
        logits = self.draft(hidden)  # [B, T, K, V]: head i at t proposes token t + 2 + i
        t, k = hidden.shape[1], logits.shape[2]
        weights = [MEDUSA_DECAY**i for i in range(min(k, t - 1))]
        loss = sum(w * _kl(logits[:, : t - 1 - i, i], p[:, 1 + i :]) for i, w in enumerate(weights))
        return loss / sum(weights), {"agree": _agree(logits[:, :-1, 0], p[:, 1:])}

    def _eagle(self, ids, hidden, p):
        # row t: token x_{t+1} and h_t (noised: at inference it reads its own predictions)
        features = hidden[:, :-1] + EAGLE_NOISE * (2 * torch.rand_like(hidden[:, :-1]) - 1)
        positions = torch.arange(ids.shape[1] - 1, device=ids.device).expand_as(ids[:, 1:])
        predicted = self.draft(ids[:, 1:], features, positions)  # ~ h_{t+1}
        logits = self.draft.compute_logits(predicted)
        regression = F.smooth_l1_loss(predicted.float(), hidden[:, 1:].float())
        loss = _kl(logits, p[:, 1:]) + regression
        return loss, {"agree": _agree(logits, p[:, 1:])}


@torch.no_grad()
def init_from_target(draft: DraftHead, target: Transformer) -> None:
    """Start from the target: EAGLE's input projection passes h_t through and its layer and
    norm are the target's last (where shapes match); an exit head is the target's own norm
    and LM head (Medusa's blocks start as the identity already)."""
    if isinstance(draft, EagleDraft):
        h = target.config.hidden_size
        draft.fc.weight.zero_()
        draft.fc.weight[:, h:].copy_(torch.eye(h))
        _copy_matching(draft.layers[0], target.layers[-1])
        _copy_matching(draft.norm, target.norm)
    elif isinstance(draft, EarlyExitHead):
        _copy_matching(draft.norm, target.norm)
        _copy_matching(draft.lm_head, target.lm_head)


def _copy_matching(dst: nn.Module, src: nn.Module) -> None:
    theirs = src.state_dict()
    for name, t in dst.state_dict().items():
        if name in theirs and theirs[name].shape == t.shape:
            t.copy_(theirs[name])


def _agree(logits, p) -> torch.Tensor:
    return (logits.argmax(-1) == p.argmax(-1)).float().mean().detach()
