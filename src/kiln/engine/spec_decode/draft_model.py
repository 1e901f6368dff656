"""Draft-model proposals: a smaller model with the target's vocabulary proposes k tokens, one
forward each, over its own paged KV pool.

The draft's pool has as many blocks as the target's and shares its block tables: a token's
K/V sits at the same slot in both pools, so the scheduler's allocation, copy-on-write, prefix
sharing and roll-back cover the draft too. `seq.num_draft_computed` counts the tokens whose
draft K/V is in place; a proposal first catches the draft up on the tokens it has not seen
(the prompt, the tokens the last verify step settled on), then decodes k - 1 more. Its
tokens stay on the device between those forwards (the next one reads them as in-flight
input ids); the proposal is read back once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.engine.attention import KVCache
from kiln.engine.config import EngineConfig
from kiln.engine.model_runner import ModelRunner, PreviousTokens
from kiln.engine.sampler import Sampler
from kiln.engine.scheduler import SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.engine.spec_decode.config import SpeculativeConfig
from kiln.engine.transfer import to_device
from kiln.errors import ConfigError
from kiln.model.transformer import Transformer


def load_draft_model(
    spec: SpeculativeConfig | None,
    target: ModelConfig,
    target_dir: Path,
    max_model_len: int,
    net: Transformer,
) -> Transformer | None:
    """The draft checkpoint of method "draft_model" (None for other configs), in the target
    `net`'s dtype and device, once it is known to share the target's vocabulary (size, and
    the tokens themselves where both have a tokenizer.json) and to cover max_model_len."""
    from kiln.model.loader import load_model

    if spec is None or spec.method != "draft_model":
        return None
    path = spec.model
    draft = ModelConfig.from_dir(path)
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(
            f"draft model {path!r} has vocab_size {draft.vocab_size}, the target "
            f"{target.vocab_size}: a draft must share the target's tokenizer"
        )
    mine, theirs = Path(path) / "tokenizer.json", target_dir / "tokenizer.json"
    if mine.is_file() and theirs.is_file() and _vocab(mine) != _vocab(theirs):
        raise ConfigError(
            f"draft model {path!r} has a different tokenizer vocabulary than the target: a "
            "draft must share the target's tokenizer"
        )
    if draft.max_position_embeddings < max_model_len:
        raise ConfigError(
            f"draft model {path!r} has a context of {draft.max_position_embeddings} tokens, "
            f"shorter than max_model_len={max_model_len}: lower max_model_len"
        )
    param = next(net.parameters())
    return load_model(path, dtype=param.dtype, device=param.device)


def _vocab(tokenizer_json: Path) -> dict:
    data = json.loads(tokenizer_json.read_text())
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return {**data.get("model", {}).get("vocab", {}), **added}


def kv_bytes_per_block(model: Transformer, block_size: int) -> int:
    """What a block of the draft's KV pool takes (the target's pool is sized for both)."""
    mc, dtype = model.config, next(model.parameters()).dtype
    return KVCache.bytes_per_block(mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim, dtype)


class DraftModelProposer:
    """Proposals from a draft model, sampled from its distribution processed like the
    target's (temperature, top-k/top-p/min-p; greedy rows take its argmax)."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        max_model_len: int,
        num_blocks: int,
        **runner_args,
    ):
        """`runner_args`: ModelRunner's keep_hidden / kv_cache (the drafts of
        kiln.engine.spec_decode.hidden run this loop too)."""
        # It runs only while at most disable_by_batch_size sequences are live, and its steps
        # with more than one token per sequence are mostly catch-ups of one or two: no CUDA
        # graphs for larger batches, nor for steps of more than 256 tokens (prompts).
        most = config.speculative.disable_by_batch_size
        config = dataclasses.replace(
            config, num_kv_blocks=num_blocks, speculative_config=None, enable_lora=False,
            max_cuda_graph_batch_size=min(config.max_cuda_graph_batch_size, most),
            max_cuda_graph_tokens=min(config.max_cuda_graph_tokens, 256),
        )  # fmt: skip
        self.runner = ModelRunner(model, config, max_model_len, **runner_args)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.runner.kv_cache.copy_blocks(copies)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int], sampler: Sampler) -> list[list[int]]:
        """ks[i] tokens for seqs[i] (their slots are allocated); sets each one's spec_probs
        (None for greedy rows) and num_draft_computed."""
        views = [self._view(seq) for seq in seqs]
        steps = []  # per forward: (tokens [B] on the device, row of each view, q rows)
        prev = None
        for j in range(max(ks)):
            active = [v for v, k in zip(views, ks) if k > j]
            num_new = [len(v) - v.num_computed_tokens for v in active]
            out = SchedulerOutput(active, num_new, num_spec_tokens=[0] * len(active))
            step = self.runner.execute(out, prev, sampler, logits_only=True)
            rows, logits = step.seqs, step.logits
            tokens, q = _sample(sampler, logits, rows)
            for v, n in zip(active, num_new):
                v.num_computed_tokens += n
                v.num_pending += 1
            if j + 1 < max(ks):
                self._forwarded(rows)
            where = {v.seq_id: r for r, v in enumerate(rows)}
            prev = PreviousTokens(tokens, where)
            steps.append((tokens, where, q))
        host = torch.cat([t for t, _, _ in steps]).tolist()  # waits for the draft
        offsets = [0]
        for tokens, _, _ in steps:
            offsets.append(offsets[-1] + tokens.shape[0])
        proposals = []
        for seq, view, k in zip(seqs, views, ks):
            rows = [steps[j][1][seq.seq_id] for j in range(k)]
            proposals.append([host[offsets[j] + r] for j, r in enumerate(rows)])
            seq.num_draft_computed = self._num_exact(seq, view)
            seq.spec_probs = None
            if not seq.params.greedy:
                seq.spec_probs = torch.stack([steps[j][2][r] for j, r in enumerate(rows)])
        return proposals

    @staticmethod
    def _view(seq: Sequence) -> Sequence:
        """The sequence as the draft sees it: its tokens, its blocks, the draft's K/V count."""
        view = Sequence(seq.seq_id, seq.request_id, seq.index, seq.token_ids, seq.params)
        view.num_prompt_tokens = seq.num_prompt_tokens
        view.generator = seq.generator
        view.block_table = seq.block_table
        view.num_computed_tokens = seq.num_draft_computed
        return view

    def _forwarded(self, rows: list[Sequence]) -> None:
        """After a forward that another follows (`rows`: its views, by row)."""

    @staticmethod
    def _num_exact(seq: Sequence, view: Sequence) -> int:
        """The rows of the draft's K/V that stay valid after the proposal (its own tokens' K/V
        are a draft model's as much as the settled ones'; the verify step keeps or trims)."""
        return view.num_computed_tokens


def _sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]):
    """The draft's token for each row ([B] on the device) and the distribution [B, V] it was
    drawn from (rows of greedy sequences: unused; None when every row is greedy)."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not sampled:
        return tokens, None
    q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    idx = to_device(sampled, torch.long, logits.device)
    chosen = [seqs[i] for i in sampled]
    q[idx] = sampler.probs(logits[idx].float(), chosen)
    tokens[idx] = sampler.draw(q[idx], chosen)  # q[idx] is a copy: draw consumes it
    return tokens, q
