"""Load Hugging Face checkpoints (safetensors only) into the one Transformer, and export back.

Weights stream tensor by tensor from (possibly sharded) safetensors files onto a model built
on the meta device, so the weights are allocated once, in the target dtype and device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.model.compressed_tensors import install_w8a8, is_w8a8_part, read_compressed_tensors
from kiln.model.hf_format import (
    KV_SCALE_NAMES,
    hf_to_kiln,
    kiln_to_hf,
    read_tensors,
    weight_files,
)
from kiln.model.quant_layers import build_layer, quant_layer_factory
from kiln.model.quantized import dequantize_tensors, read_quant_config
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


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    lora: str | os.PathLike | None = None,
    quantization: str | None = "none",
) -> Transformer:
    """Load a Hugging Face model directory (config.json + safetensors) as a kiln Transformer.

    A GPTQ / AWQ checkpoint's Linears are dequantized at load time with quantization "none"
    (the default); with None (the engine's default: as the checkpoint says) or the method's
    name they stay packed on the device (kiln.model.quant_layers)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    config = ModelConfig.from_dir(path)
    device = torch.device(device or default_device())
    dtype = resolve_dtype(dtype, config, device)
    w8a8 = read_compressed_tensors(config.hf_config)  # W8A8 (SmoothQuant, FP8)
    spec = read_quant_config(config.hf_config) if w8a8 is None else None  # GPTQ / AWQ
    make_layer = quant_layer_factory(spec, quantization, config)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    packed: dict[str, dict[str, torch.Tensor]] = {}  # HF prefix -> its GPTQ/AWQ tensors
    quantized: dict[str, dict[str, torch.Tensor]] = {}  # W8A8 Linears' tensors, by HF prefix
    tensors = _checkpoint_tensors(path, config, packed if make_layer else None, w8a8 is None)
    for where, hf_name, hf_tensor in tensors:
        if w8a8 is not None and is_w8a8_part(hf_name, hf_tensor):
            prefix, _, part = hf_name.rpartition(".")
            quantized.setdefault(prefix, {})[part] = hf_tensor
            continue
        try:
            for name, tensor in hf_to_kiln(config, hf_name, hf_tensor):
                assign_tensor(model, expected, name, tensor, dtype, device)
                loaded.add(name)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
    for hf_prefix, parts in packed.items():
        ((name, _),) = hf_to_kiln(config, f"{hf_prefix}.weight", torch.empty(0))
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected quantized layer {hf_prefix!r}")
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        module = model.get_submodule(parent)
        parts = {k: t.to(device) for k, t in parts.items()}
        bias = getattr(module, attr).bias
        layer = build_layer(make_layer, hf_prefix, parts, spec, bias)
        setattr(module, attr, layer)
        loaded.add(name)
    if quantized:
        loaded |= install_w8a8(model, config, w8a8, quantized, device)
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
        from kiln.model.lora import load_adapter

        load_adapter(model, lora)
    return model


def _checkpoint_tensors(
    path: Path,
    config: ModelConfig,
    packed: dict[str, dict[str, torch.Tensor]] | None = None,
    dequantize: bool = True,
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(where, HF name, tensor) of every weight; a GPTQ/AWQ checkpoint's quantized Linears come
    last, dequantized to float32 as `<prefix>.weight` (the torch reference path), or, given
    `packed`, are gathered there instead (HF prefix -> {part: tensor}); with `dequantize`
    False every tensor comes as stored."""
    spec = read_quant_config(config.hf_config) if dequantize else None
    quantized: list[tuple[str, torch.Tensor]] = []
    for file in weight_files(path):
        for name, t in read_tensors(file):
            if spec is not None and name.rpartition(".")[2] in spec.parts:
                quantized.append((name, t))
            else:
                yield file, name, t
    if packed is not None:
        for name, t in quantized:
            prefix, _, part = name.rpartition(".")
            packed.setdefault(prefix, {})[part] = t
    elif spec is not None:
        conv1d = config.model_type == "gpt2"
        for name, t in dequantize_tensors(spec, iter(quantized), conv1d):
            yield path, name, t


def assign_tensor(model, expected, name, tensor, dtype, device) -> None:
    """Put a checkpoint tensor in place of `model`'s parameter `name` (built on meta), checked
    against `expected` (name -> parameter)."""
    if name not in expected:
        if name.endswith(("rotary_emb.inv_freq", *KV_SCALE_NAMES)):
            return  # KV cache scales are the engine's (kiln.engine.kv_scales)
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
    config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    hf_state = kiln_to_hf(config, state)
    dtype = next(iter(hf_state.values())).dtype
    hf_config = config.replace(dtype=str(dtype).removeprefix("torch.")).to_hf()
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    gen |= generation_config or {}
    return save_checkpoint_files(out_dir, hf_state, hf_config, gen, max_shard_bytes)


def save_checkpoint_files(
    out_dir: str | os.PathLike,
    hf_state: dict[str, torch.Tensor],
    hf_config: dict,
    generation_config: dict | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write HF tensors (sharded past max_shard_bytes) and configs atomically, config.json
    last: its presence marks a complete directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    if generation_config is not None:
        _write_json(out_dir / "generation_config.json", generation_config)
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
