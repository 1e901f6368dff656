"""LoRA as a transformation of the plain model: wrap nn.Linear modules by name, in place.

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: [r, in], B: [out, r], B starts at zero

Adapters are saved and loaded in PEFT's format (adapter_config.json + adapter_model.safetensors,
keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so an adapter
kiln trains loads in `peft` on the `transformers` model, and one `peft` made loads in kiln. HF
module names come from the loader's own kiln_to_hf, so every family maps the way its weights do.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kiln.config import ALL_LINEAR, LoraConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.model.hf_format import kiln_to_hf, read_tensors

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; merge() folds it into the weight."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dtype=None):
        super().__init__()
        self.base_layer = base
        kw = dict(bias=False, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.merged = False
        self.disabled = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        if not torch.is_autocast_enabled(x.device.type):  # autocast picks the matmul dtype itself
            x = x.to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, in float32: [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        assert not self.merged, "adapter already merged"
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        assert self.merged, "adapter not merged"
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoraLinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside the decoder layers (lm_head excluded)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("layers.") and ".lora_" not in name
    ]


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list entry matches the whole name or its last dotted components."""
    if targets == ALL_LINEAR:
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and wrap its target Linear modules with LoRA (in place); returns the names."""
    if any(True for _ in lora_layers(model)):
        raise ConfigError("model already has LoRA adapters")
    candidates = linear_names(model)
    names = [n for n in candidates if matches(n, config.target_modules)]
    if not names:
        existing = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(
            f"target_modules {config.target_modules!r} match no Linear module; "
            f"this model has: {', '.join(existing)} (or 'all-linear')"
        )
    hf_names = hf_module_names(model)
    for name in names:
        base = model.get_submodule(name)
        if config.r > min(base.in_features, base.out_features):
            raise ConfigError(
                f"LoRA rank {config.r} exceeds {name}'s dimensions "
                f"({base.in_features} -> {base.out_features})"
            )
        if name not in hf_names:
            raise ConfigError(
                f"cannot save LoRA on {name!r} in PEFT's format for {model.config.model_type}: "
                "its checkpoint fuses it with other weights (GPT-2's c_attn); target other modules"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        # trainable adapters stay in float32 over a half-precision base, as PEFT keeps them
        layer = LoraLinear(base, config.r, config.lora_alpha, config.lora_dropout, torch.float32)
        layer.train(base.training)
        setattr(parent, child, layer)
    return names


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then costs nothing extra)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): subtract every adapter from its base weight again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain Linear modules back (for kiln.save_model)."""
    for name, layer in list(lora_layers(model)):
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict (kiln names) with every adapter folded into its weight;
    `model` itself is left as it is (what an engine serving the adapted model loads)."""
    state = {}
    layers = dict(lora_layers(model))
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        module, _, kind = name.rpartition(".")
        parent = module.removesuffix(".base_layer")
        layer = layers.get(parent)
        if layer is not None and kind == "weight" and not layer.merged:
            t = (t.float() + layer.delta_weight()).to(t.dtype)
        state[f"{parent}.{kind}" if layer is not None else name] = t
    return state


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model: inside this block every (unmerged) adapter is switched off."""
    layers = [layer for _, layer in lora_layers(model)]
    assert not any(layer.merged for layer in layers), "unmerge before disabling adapters"
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """kiln Linear module name -> its Hugging Face module name, via the loader's kiln_to_hf.

    Each weight is replaced by a 1x1 tensor holding its index, so the mapping (renames,
    Conv1D transposes, Mixtral experts) is the loader's; fused weights (GPT-2's c_attn, whose
    tensor comes back with three entries) have no one-to-one name and are left out.
    """
    names = [n.replace(".base_layer.", ".") for n in model.state_dict()]
    names = [n for n in names if ".lora_" not in n]
    tagged = {n: torch.full((1, 1), float(i)) for i, n in enumerate(names)}
    out = {}
    for hf_name, t in kiln_to_hf(model.config, tagged).items():
        kiln_name = names[int(t.flatten()[0])]
        if t.numel() == 1 and kiln_name.endswith(".weight"):
            out[kiln_name.removesuffix(".weight")] = hf_name.removesuffix(".weight")
    return out


def save_adapter(
    model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapters as a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    layers = dict(lora_layers(model))
    if not layers:
        raise ConfigError("model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    assert all((lay.r, lay.lora_alpha) == (first.r, first.lora_alpha) for lay in layers.values()), (
        "one rank and alpha for every adapter"
    )
    hf = hf_module_names(model)
    tensors = {}
    for name, layer in layers.items():
        key = PEFT_PREFIX + hf[name]
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": dropout,
        "target_modules": _peft_targets([hf[n] for n in layers], list(hf.values())),
        "bias": "none",
        "fan_in_fan_out": model.config.model_type == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), {"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _peft_targets(wrapped: list[str], all_modules: list[str]) -> list[str]:
    """Short names ("q_proj") when they select exactly `wrapped` in HF's model, else full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    selected = {n for n in all_modules if matches(n, short) and n.startswith("model.layers.")}
    return short if selected == set(wrapped) else sorted(wrapped)


def read_adapter(
    path: str | os.PathLike,
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA directory's checked config and its HF module name -> (lora_A, lora_B)."""
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights_file.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a PEFT adapter: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}, kiln loads LORA")
    for unsupported in ("use_dora", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(unsupported):
            raise CheckpointError(f"{cfg_file}: {unsupported} is not supported by kiln")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file}: bias={cfg['bias']!r} is not supported (only 'none')")
    return cfg, _adapter_tensors(weights_file)


def adapter_scaling(cfg: dict, r: int) -> float:
    """PEFT's scaling of B @ A: alpha / r (alpha / sqrt(r) with use_rslora)."""
    alpha = cfg.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a PEFT LoRA adapter directory to `model` (unmerged, frozen); returns the model."""
    cfg, weights = read_adapter(path)
    path = Path(path)
    kiln_names = {hf: kiln for kiln, hf in hf_module_names(model).items()}
    for p in model.parameters():
        p.requires_grad_(False)
    base_name = cfg.get("base_model_name_or_path")
    for hf_name, (a, b) in weights.items():
        name = kiln_names.get(hf_name)
        if name is None or not isinstance(model.get_submodule(name), nn.Linear):
            raise CheckpointError(
                f"adapter in {str(path)!r} targets {hf_name!r}, which this model lacks: "
                f"was it made for another base model ({base_name})?"
            )
        base = model.get_submodule(name)
        r = a.shape[0]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise CheckpointError(
                f"adapter in {str(path)!r} does not fit this base model ({base_name}): {hf_name} "
                f"has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, the model's layer is "
                f"{base.in_features} -> {base.out_features}"
            )
        layer = LoraLinear(base, r, cfg.get("lora_alpha", 8)).train(base.training)
        layer.scaling = adapter_scaling(cfg, r)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        layer.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def _adapter_tensors(file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name -> (lora_A [r, in], lora_B [out, r]) from a PEFT safetensors file."""
    state = dict(read_tensors(file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{file.name}: unexpected tensor {key!r} (kiln loads lora_A/B)")
        if t.dim() != 2:
            raise CheckpointError(f"{file.name}: {key!r} has shape {tuple(t.shape)}, not a matrix")
        pairs.setdefault(module, {})[part[0]] = t
    incomplete = [m for m, p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise CheckpointError(f"{file.name}: {incomplete[0]!r} lacks lora_A or lora_B")
    if not pairs:
        raise CheckpointError(f"{file.name}: holds no LoRA weights")
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}
