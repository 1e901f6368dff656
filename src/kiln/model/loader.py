"""Load Hugging Face checkpoints (safetensors only) into the one Transformer, and export back.

Weights stream tensor by tensor from (possibly sharded) safetensors files onto a model built
on the meta device, so the weights are allocated once, in the target dtype and device.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.model.transformer import Transformer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
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


def _rename(name: str, to_kiln: bool) -> str:
    """Map a GPT-2 parameter name prefix through _GPT2_NAMES, in either direction."""
    for hf, kiln in _GPT2_NAMES:
        src, dst = (hf, kiln) if to_kiln else (kiln, hf)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        name, hits = re.subn(pattern, dst.replace("{i}", r"\1"), name)
        if hits:
            break
    return name


_MIXTRAL_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig, device) -> torch.dtype:
    """float32 on CPU unless asked otherwise; the checkpoint's dtype on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if torch.device(device).type == "cpu" or not config.dtype:
            return torch.float32
        dtype = config.dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    if config.model_type != "gpt2":
        for name, t in state.items():
            m = re.match(r"^(layers\.\d+)\.mlp\.(gate|experts\.\d+)\.?(\w+_proj)?\.weight$", name)
            if config.num_experts and m:
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


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    lora: str | os.PathLike | None = None,
) -> Transformer:
    """Load a Hugging Face model directory (config.json + safetensors) as a kiln Transformer."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    config = ModelConfig.from_dir(path)
    device = torch.device(device or default_device())
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in weight_files(path):
        for hf_name, hf_tensor in read_tensors(file):
            try:
                for name, tensor in hf_to_kiln(config, hf_name, hf_tensor):
                    _assign(model, expected, name, tensor, dtype, device)
                    loaded.add(name)
            except CheckpointError as e:
                raise CheckpointError(f"{file}: {e}") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model.reset_buffers(device)
    model.eval()
    if lora is not None:
        from kiln.train.lora import load_adapter

        load_adapter(model, lora)
    return model


def _assign(model, expected, name, tensor, dtype, device) -> None:
    if name not in expected:
        if name.endswith("rotary_emb.inv_freq"):
            return
        raise CheckpointError(f"unexpected tensor {name!r} for this config")
    want = tuple(expected[name].shape)
    if tuple(tensor.shape) != want:
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, config expects {want}"
        )
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = torch.nn.Parameter(
        tensor.to(device=device, dtype=dtype).contiguous(), requires_grad=False
    )
    setattr(module, attr, param)


def save_model(
    model: Transformer,
    out_dir: str | os.PathLike,
    max_shard_bytes: int | None = None,
    generation_config: dict | None = None,
) -> Path:
    """Write an HF directory (config.json, safetensors, generation_config.json) atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    hf_state = kiln_to_hf(config, state)
    dtype = next(iter(hf_state.values())).dtype
    hf_config = config.replace(dtype=str(dtype).removeprefix("torch.")).to_hf()
    shards = _shard(hf_state, max_shard_bytes)
    if len(shards) == 1:
        _atomic(out_dir / "model.safetensors", lambda p: save_file(shards[0], p, {"format": "pt"}))
        (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(out_dir / fname, lambda p, s=shard: save_file(s, p, {"format": "pt"}))
            weight_map |= dict.fromkeys(shard, fname)
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out_dir / "model.safetensors.index.json", index)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    _write_json(out_dir / "generation_config.json", {**gen, **(generation_config or {})})
    _write_json(out_dir / "config.json", hf_config)
    return out_dir


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))
