"""Proposers over the target's own hidden states (the drafts of kiln.engine.spec_decode.heads),
on the same propose -> verify path as the draft model and prompt lookup.

- medusa: the target keeps every computed token's final hidden state by KV slot (ModelRunner
  keep_hidden "slots", its CUDA graphs too); a proposal reads h_{n-1}, the state that gave the
  sequence's newest token x_n, and the first k heads propose x_{n+1}..x_{n+k} in one forward.
- eagle: its decoder layer runs through a ModelRunner of its own (CUDA graphs included) over a
  one-layer KV pool that shares the target's block tables, like a draft model's. It runs on the
  sequence shifted by one: its row at position t reads token x_{t+1} and the feature stored at
  slot t, which is the target's h_t for every token the target computed (prefix hits,
  preempted and non-speculative steps included: the target wrote it then) and its own
  prediction for the rest, written there between its forwards (ModelRunner keep_hidden
  "rows"; the verify step then writes the target's). A proposal catches it up on the rows it
  has not seen, the last of which proposes x_{n+1}, then runs k - 1 forwards on its own
  predictions; those rows are redone from the target's states at the next proposal.
- early_exit: the target's first exit_layer layers (the target runner's transformed modules)
  and the exit head run through a ModelRunner of their own over the target's own KV pool:
  the draft writes those layers' K/V of its tokens into the slots that the verify step then
  fills with the target's (the same values where a draft token is accepted). With verify
  false the engine runs that cut model alone (`lossy_model`).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from kiln.engine.config import EngineConfig
from kiln.engine.model_runner import ModelRunner
from kiln.engine.sampler import Sampler
from kiln.engine.sequence import Sequence
from kiln.engine.spec_decode.config import HIDDEN_METHODS, SpeculativeConfig
from kiln.engine.spec_decode.draft_model import DraftModelProposer, _sample, kv_bytes_per_block
from kiln.engine.spec_decode.heads import (
    DraftHead,
    EagleDraft,
    EarlyExitHead,
    MedusaHeads,
    first_layers,
    load_draft,
)
from kiln.engine.transfer import to_device
from kiln.errors import ConfigError
from kiln.model.transformer import Transformer

log = logging.getLogger("kiln.engine")


def load_heads(spec: SpeculativeConfig | None, net: Transformer) -> DraftHead | None:
    """The draft of a medusa / eagle / early_exit config, for the target `net` (None for other
    methods, and for early_exit without a `model`: the target's own norm and LM head)."""
    if spec is None or spec.method not in HIDDEN_METHODS or not spec.model:
        return None
    head = load_draft(spec.model, spec.method, net, spec.exit_layer)
    if isinstance(head, MedusaHeads) and head.num_heads < spec.num_speculative_tokens:
        raise ConfigError(
            f"the Medusa draft in {spec.model!r} has {head.num_heads} heads: it proposes at "
            f"most that many tokens, num_speculative_tokens is {spec.num_speculative_tokens}"
        )
    return head


def exit_layer(spec: SpeculativeConfig, head: EarlyExitHead | None, num_layers: int) -> int:
    """The layers an early-exit draft runs: the config's, else its head's (1 .. num_layers - 1)."""
    layer = spec.exit_layer if spec.exit_layer is not None else head.exit_layer
    if not 1 <= layer < num_layers:
        raise ConfigError(
            f"speculative_config exit_layer must be between 1 and {num_layers - 1} (the model "
            f"has {num_layers} layers), got {layer}"
        )
    return layer


def exit_model(target: Transformer, head: EarlyExitHead | None, num_layers: int) -> Transformer:
    """The target cut after its first `num_layers` layers and read out by `head` (None: the
    target's own final norm and LM head); its modules are the target's, shared."""
    model = copy.copy(target)
    model._modules = dict(target._modules)  # (a shallow copy would share the module dict)
    model.config = first_layers(target.config, num_layers)
    model.layers = nn.ModuleList(list(target.layers)[:num_layers])
    if head is not None:
        model.norm, model.lm_head = head.norm, head.lm_head
    return model


def lossy_model(spec: SpeculativeConfig, net: Transformer, head: EarlyExitHead | None):
    """What the engine runs instead of `net` under early_exit with verify false."""
    layer = exit_layer(spec, head, net.config.num_layers)
    log.warning(
        "speculative_config verify=false: every token comes from the exit head after layer %d "
        "of %d, unverified; the output is not the model's (lossy)",
        layer, net.config.num_layers,
    )  # fmt: skip
    return exit_model(net, head, layer)


def target_runner_args(spec: SpeculativeConfig | None, head: DraftHead | None, block_size: int):
    """What the target's ModelRunner keeps for a medusa / eagle draft, and what a block of
    EAGLE's one-layer KV pool costs beside the target's own; {} for other methods."""
    if spec is None or not spec.verify or spec.method not in ("medusa", "eagle"):
        return {}
    args = {"keep_hidden": "slots"}
    if isinstance(head, EagleDraft):
        args["extra_kv_bytes_per_block"] = kv_bytes_per_block(head, block_size)
    return args


def slot_of(seq: Sequence, position: int, block_size: int) -> int:
    """The KV slot of the sequence's token at `position`."""
    return seq.block_table[position // block_size] * block_size + position % block_size


class MedusaProposer:
    """Proposals from Medusa heads over the hidden state of each sequence's newest token's
    step (kept by the target runner); sampled rows draw from each head's distribution
    processed like the target's."""

    def __init__(self, heads: MedusaHeads, target: ModelRunner):
        self.heads = heads.bind(target.model)  # the target's transformed LM head
        self.hidden = target.hidden_slots
        self.block_size = target.block_size

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int], sampler: Sampler) -> list[list[int]]:
        bs = self.block_size
        slots = [slot_of(s, s.num_computed_tokens - 1, bs) for s in seqs]
        hidden = self.hidden.data[to_device(slots, torch.long, self.hidden.data.device)]
        logits = self.heads(hidden, max(ks))  # [B, k, vocab]
        drawn = [_sample(sampler, logits[:, j], seqs) for j in range(max(ks))]
        host = torch.stack([tokens for tokens, _ in drawn], dim=1).tolist()
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            seq.spec_probs = None
            if not seq.params.greedy:
                seq.spec_probs = torch.stack([drawn[j][1][i] for j in range(k)])
        return [row[:k] for row, k in zip(host, ks)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.hidden.copy_blocks(copies)


class EagleProposer(DraftModelProposer):
    """Proposals from EAGLE's layer (module docstring), through DraftModelProposer's loop."""

    def __init__(
        self, draft: EagleDraft, target: ModelRunner, config: EngineConfig, max_model_len: int
    ):
        self.hidden = target.hidden_slots
        draft.bind(target.model).features = self.hidden.data
        super().__init__(draft, config, max_model_len, target.num_blocks, keep_hidden="rows")

    @staticmethod
    def _view(seq: Sequence) -> Sequence:
        """The sequence shifted by one: row t holds token x_{t+1}."""
        view = Sequence(seq.seq_id, seq.request_id, seq.index, seq.token_ids[1:], seq.params)
        view.num_prompt_tokens = seq.num_prompt_tokens - 1
        view.generator = seq.generator
        view.block_table = seq.block_table
        view.num_computed_tokens = seq.num_draft_computed
        return view

    def _forwarded(self, rows: list[Sequence]) -> None:
        """Each row's predicted feature at its next row's slot, which the next forward reads."""
        bs, data = self.runner.block_size, self.hidden.data
        slots = [slot_of(v, v.num_computed_tokens, bs) for v in rows]
        self.hidden.write(to_device(slots, torch.long, data.device), self.runner.last_hidden)

    @staticmethod
    def _num_exact(seq: Sequence, view: Sequence) -> int:
        # rows past the sequence's computed tokens read the draft's own predictions
        return seq.num_computed_tokens

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        super().copy_blocks(copies)
        self.hidden.copy_blocks(copies)


class EarlyExitProposer(DraftModelProposer):
    """Proposals from the target's first layers and the exit head, over the target's pool.
    Its copy_blocks copies that pool at schedule time, before the draft reads it; the target
    runner's own copy in the step repeats it (copy-on-write is rare: n > 1 siblings), and
    what that overwrites past the computed tokens the verify step writes again."""

    def __init__(
        self, model: Transformer, target: ModelRunner, config: EngineConfig, max_model_len: int
    ):
        super().__init__(model, config, max_model_len, target.num_blocks, kv_cache=target.kv_cache)

    @staticmethod
    def _view(seq: Sequence) -> Sequence:
        """The target's K/V of its first layers is the draft's: it starts where the target is."""
        view = DraftModelProposer._view(seq)
        view.num_computed_tokens = seq.num_computed_tokens
        return view


def hidden_proposer(
    spec: SpeculativeConfig,
    head: DraftHead | None,
    target: ModelRunner,
    config: EngineConfig,
    max_model_len: int,
):
    """The proposer of a medusa / eagle / early_exit config, over the target's runner."""
    if spec.method == "medusa":
        return MedusaProposer(head, target)
    if spec.method == "eagle":
        return EagleProposer(head, target, config, max_model_len)
    layer = exit_layer(spec, head, target.model_config.num_layers)
    return EarlyExitProposer(exit_model(target.model, head, layer), target, config, max_model_len)
