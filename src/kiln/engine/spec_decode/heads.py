"""Drafts that read the target's own hidden states, and the directory they are saved in.

- MedusaHeads (Cai et al. 2024): K residual blocks over the target's final hidden state h_t,
  each read out by the target's LM head; head i (from 0) proposes token t + 2 + i (the target's
  own head gives t + 1). One forward proposes all K, blind to the tokens before them.
- EagleDraft (Li et al. 2024): one decoder layer over fc([embed(x_{t+1}), h_t]) that predicts
  the target's next hidden state h_{t+1}, read out by the target's LM head (token t + 2); it
  runs autoregressively on its own predictions, attending over its own K/V of the sequence.
- EarlyExitHead (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2024): a norm
  and an LM head after the target's first `exit_layer` layers. The draft is the target cut
  there: self-speculation, whose layers' K/V are the target's own.

A draft directory holds draft.safetensors (the head's own tensors: what it borrows from the
target, embeddings and LM head, is not saved) and draft_config.json: {"method", the head's
own sizes, "target": the shapes of the target it was trained for}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.model.attention import DENSE_CAUSAL
from kiln.model.layers import make_norm
from kiln.model.transformer import Block, Transformer

CONFIG_FILE = "draft_config.json"
WEIGHTS_FILE = "draft.safetensors"
# What a draft records of its target, and checks against the one it is loaded for.
TARGET_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def first_layers(config: ModelConfig, num_layers: int) -> ModelConfig:
    """The config of the model's first `num_layers` layers."""
    return config.replace(
        num_layers=num_layers,
        sliding_windows=config.sliding_windows[:num_layers],
        layer_types=config.layer_types[:num_layers],
        dense_mlp_layers=[i for i in config.dense_mlp_layers if i < num_layers],
    )


class DraftHead(nn.Module):
    """A draft over the target's hidden states; `shared` names the target's modules it
    borrows (bound by `bind`, never saved with it)."""

    method = ""
    shared: tuple[str, ...] = ()

    def bind(self, target: nn.Module) -> DraftHead:
        """Borrow the target's shared modules (the engine's transformed ones, or the plain
        model's in training)."""
        for name in self.shared:
            setattr(self, name, getattr(target, name))
        return self

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are the draft's own (what save_draft writes)."""
        return {
            k: v for k, v in self.state_dict().items() if k.partition(".")[0] not in self.shared
        }

    def sizes(self) -> dict[str, Any]:
        """The head's own sizes, as draft_config.json records them."""
        return {}


class ResBlock(nn.Module):
    """Medusa's block: x + SiLU(W x); W starts at zero (the block starts as the identity)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MedusaHeads(DraftHead):
    method = "medusa"
    shared = ("lm_head",)

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_heads))
        self.lm_head: nn.Module | None = None

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, hidden: torch.Tensor, num: int | None = None) -> torch.Tensor:
        """The first `num` heads' logits [..., num, vocab] over final hidden states [..., H]."""
        x = torch.stack([block(hidden) for block in self.blocks[:num]], dim=-2)
        return self.lm_head(x)

    def sizes(self) -> dict[str, Any]:
        return {"num_heads": self.num_heads}


def eagle_layer_config(target: ModelConfig) -> ModelConfig:
    """The config of EAGLE's decoder layer: the target's last layer (its attention window
    too), with a dense MLP."""
    return first_layers(target, 1).replace(
        num_experts=0, dense_mlp_layers=[], sliding_windows=target.sliding_windows[-1:]
    )


class EagleDraft(DraftHead):
    """forward(input_ids [N], features [N, H], positions [N]) -> predicted next features
    [N, H]: row t reads token x_{t+1} and the target's h_t (or the draft's prediction of it).
    In the engine `features` holds every slot's feature (kiln.engine.attention.HiddenSlots)
    and `hidden_states` reads each row's own slot (kiln.engine.spec_decode.hidden)."""

    method = "eagle"
    shared = ("embed_tokens", "lm_head", "rotary")

    def __init__(self, target: ModelConfig):
        super().__init__()
        self.config = eagle_layer_config(target)
        h = target.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([Block(self.config, 0)])
        self.norm = make_norm(self.config)
        self.embed_tokens: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        self.rotary: nn.Module | None = None
        self.features: torch.Tensor | None = None

    def forward(self, input_ids, features, positions, backend=None) -> torch.Tensor:
        x = self.fc(torch.cat([self.embed_tokens(input_ids), features], dim=-1))
        for layer in self.layers:
            x = layer(x, positions, self.rotary, backend or DENSE_CAUSAL)
        return self.norm(x)

    def hidden_states(self, input_ids, positions, backend) -> torch.Tensor:
        """The engine's forward (ModelRunner's model interface): each row's feature is the one
        stored at its own slot (padded rows, slot -1, read the spare last row)."""
        features = self.features[backend.metadata.slot_mapping]
        return self(input_ids, features, positions, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class EarlyExitHead(DraftHead):
    """norm + LM head over the hidden state after the target's first `exit_layer` layers."""

    method = "early_exit"

    def __init__(self, target: ModelConfig, exit_layer: int):
        super().__init__()
        self.exit_layer = exit_layer
        self.norm = make_norm(target)
        self.lm_head = nn.Linear(target.hidden_size, target.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def sizes(self) -> dict[str, Any]:
        return {"exit_layer": self.exit_layer}


HEADS = {cls.method: cls for cls in (MedusaHeads, EagleDraft, EarlyExitHead)}


def save_draft(out_dir: str | os.PathLike, module: DraftHead, config: ModelConfig) -> Path:
    """Write `module` (trained for a target of `config`) as a draft directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.own_state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), {"format": "pt"})
    meta = {
        "method": module.method,
        **module.sizes(),
        "target": {"model_type": config.model_type} | {k: getattr(config, k) for k in TARGET_KEYS},
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_draft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(draft_config.json, the tensors) of a draft directory; ConfigError if it is not one."""
    path = Path(path)
    config_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise ConfigError(
            f"{str(path)!r} is not a draft directory (no {CONFIG_FILE} and {WEIGHTS_FILE}): "
            "`kiln train-draft` writes one"
        )
    try:
        meta = json.loads(config_file.read_text())
    except ValueError as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("method") not in HEADS:
        raise ConfigError(
            f"{config_file}: 'method' must be one of {', '.join(HEADS)}, got "
            f"{meta.get('method') if isinstance(meta, dict) else meta!r}"
        )
    return meta, load_file(str(weights))


def _size(meta: dict[str, Any], key: str, path) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{str(path)!r}: {CONFIG_FILE} needs {key!r} >= 1, got {value!r}")
    return value


def load_draft(
    path: str | os.PathLike, method: str, target: Transformer, exit_layer: int | None = None
) -> DraftHead:
    """The draft in `path`, built for `target` (its dtype and device, its shared modules
    bound): ConfigError where the directory holds another method's draft, was trained for
    another target, or an early-exit head for another exit_layer."""
    meta, tensors = read_draft(path)
    config = target.config
    if meta["method"] != method:
        raise ConfigError(
            f"{str(path)!r} holds a {meta['method']!r} draft, speculative_config asks for "
            f"method {method!r}"
        )
    trained = meta.get("target", {})
    for key in TARGET_KEYS:
        if trained.get(key) != getattr(config, key):
            raise ConfigError(
                f"draft {str(path)!r} was trained for a target with {key}={trained.get(key)}, "
                f"this model has {key}={getattr(config, key)}: train one for it with "
                "`kiln train-draft`"
            )
    if method == "medusa":
        module = MedusaHeads(config.hidden_size, _size(meta, "num_heads", path))
    elif method == "eagle":
        module = EagleDraft(config)
    else:
        trained_at = _size(meta, "exit_layer", path)
        if exit_layer is not None and exit_layer != trained_at:
            raise ConfigError(
                f"the exit head in {str(path)!r} reads layer {trained_at}'s output, "
                f"speculative_config exit_layer is {exit_layer}"
            )
        module = EarlyExitHead(config, trained_at)
    own = module.own_state_dict()
    if set(tensors) != set(own):
        missing = sorted(set(own) - set(tensors)) or sorted(set(tensors) - set(own))
        raise ConfigError(f"{str(path)!r}: {WEIGHTS_FILE} does not match a {method} draft "
                          f"(tensor {missing[0]!r})")  # fmt: skip
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise ConfigError(
                f"{str(path)!r}: tensor {name!r} has shape {tuple(t.shape)}, this target "
                f"expects {tuple(own[name].shape)}"
            )
    param = next(target.parameters())
    module.load_state_dict(tensors, strict=False)
    module.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
    return module.bind(target)
