"""The Hugging Face checkpoint format: weight files (safetensors only, sharded or not) and the
mapping between HF parameter names and kiln's, in both directions. The loader and the LoRA
adapters both read through here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kiln.config import ModelConfig
from kiln.errors import CheckpointError

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# GPT-2 HF name (after "transformer.") <-> kiln name, "{i}" the layer; c_attn is split apart.
_GPT2_NAMES = [
    ("wte.", "embed_tokens."),
    ("wpe.", "embed_positions."),
    ("ln_f.", "norm."),
    ("h.{i}.ln_1.", "layers.{i}.input_layernorm."),
    ("h.{i}.ln_2.", "layers.{i}.post_attention_layernorm."),
    ("h.{i}.attn.c_proj.", "layers.{i}.self_attn.o_proj."),
    ("h.{i}.mlp.c_fc.", "layers.{i}.mlp.up_proj."),
    ("h.{i}.mlp.c_proj.", "layers.{i}.mlp.down_proj."),
]


# Mamba / Mamba2 HF name (after "backbone.") <-> kiln name; the mixer keeps HF's names.
_MAMBA_NAMES = [
    ("embeddings.", "embed_tokens."),
    ("norm_f.", "norm."),
    ("layers.{i}.norm.", "layers.{i}.input_layernorm."),
]


def _rename(name: str, to_kiln: bool, table=_GPT2_NAMES) -> str:
    """Map a parameter name prefix through `table` (GPT-2's or Mamba's), in either direction."""
    for hf, kiln in table:
        src, dst = (hf, kiln) if to_kiln else (kiln, hf)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        name, hits = re.subn(pattern, dst.replace("{i}", r"\1"), name)
        if hits:
            break
    return name


_MIXTRAL_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


# A quantized KV cache's scales in a checkpoint (vLLM's and TGI's names; `kv_scale`: older,
# one for both): read by the engine (kiln.engine.kv_scales), not model weights.
KV_SCALE_NAMES = ("self_attn.k_scale", "self_attn.v_scale", "self_attn.kv_scale")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; refuses pickle-based weights."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = shard_names(index)
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    unsafe = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
    if unsafe:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(unsafe)}); kiln never unpickles "
            "weights: convert them to safetensors"
        )
    raise CheckpointError(f"no model.safetensors in {str(path)!r}")


def shard_names(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json maps tensors to, each inside its folder.

    Names are checked as written: an absolute path or a `..` part is refused, while a shard
    that is a symlink is followed (the Hugging Face cache links every file to its blob store).
    """
    try:
        data = json.loads(index.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{index}: not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
            raise CheckpointError(
                f"{index}: shard {name!r} is not a file name inside the model directory"
            )
    return shards


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each tensor in a safetensors file; CheckpointError if it is corrupt."""
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e


def hf_to_kiln(
    config: ModelConfig, name: str, tensor: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one HF checkpoint tensor to kiln (name, tensor) pairs (GPT-2's c_attn gives three)."""
    if config.model_type == "gpt2":
        name = name.removeprefix("transformer.")
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            return  # old GPT-2 checkpoints store the causal mask as a buffer
        m = re.match(r"^h\.(\d+)\.attn\.c_attn\.(weight|bias)$", name)
        conv1d = re.match(r"^h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", name)
        ndim = 2 if name.endswith(".weight") else 1
        if (m or conv1d) and tensor.dim() != ndim:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {ndim} dimension(s)"
            )
        if m:
            layer, kind = m.groups()
            t = tensor.t() if kind == "weight" else tensor  # Conv1D: [in, out]
            for proj, part in zip(("q", "k", "v"), t.chunk(3, dim=0)):
                yield f"layers.{layer}.self_attn.{proj}_proj.{kind}", part
            return
        yield _rename(name, to_kiln=True), tensor.t() if conv1d else tensor
        return
    if config.model_type in ("mamba", "mamba2"):
        yield _rename(name.removeprefix("backbone."), True, _MAMBA_NAMES), tensor
        return
    name = name.removeprefix("model.")
    m = re.match(r"^(layers\.\d+)\.block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight$", name)
    if m:
        layer, part = m.groups()
        if part != "gate":
            expert, w = part.rsplit(".", 1)
            part = f"{expert}.{_MIXTRAL_EXPERT[w]}"
        name = f"{layer}.mlp.{part}.weight"
    yield name, tensor


def kiln_to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_kiln over a whole state dict (tied lm_head dropped)."""
    out: dict[str, torch.Tensor] = {}
    state = {
        k: v for k, v in state.items() if k != "lm_head.weight" or not config.tie_word_embeddings
    }
    if config.model_type in ("mamba", "mamba2"):
        return {
            k if k == "lm_head.weight" else "backbone." + _rename(k, False, _MAMBA_NAMES): v
            for k, v in state.items()
        }
    if config.model_type != "gpt2":
        for name, t in state.items():
            m = re.match(r"^(layers\.\d+)\.mlp\.(gate|experts\.\d+)\.?(\w+_proj)?\.weight$", name)
            if config.model_type == "mixtral" and m:
                layer, part, proj = m.groups()
                inv = {v: k for k, v in _MIXTRAL_EXPERT.items()}
                sub = "gate" if part == "gate" else f"{part}.{inv[proj]}"
                name = f"{layer}.block_sparse_moe.{sub}.weight"
            out[name if name.startswith("lm_head") else f"model.{name}"] = t
        return out
    for i in range(config.num_layers):
        pre = f"layers.{i}.self_attn"
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{pre}.{p}_proj.{kind}") for p in "qkv"]
            fused = torch.cat(parts, dim=0)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
    for name, t in state.items():
        if name == "lm_head.weight":
            out[name] = t
            continue
        conv1d = re.match(
            r"^layers\.\d+\.(self_attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.weight$", name
        )
        out[f"transformer.{_rename(name, to_kiln=False)}"] = t.t() if conv1d else t
    return {k: v.contiguous() for k, v in out.items()}
