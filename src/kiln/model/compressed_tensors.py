"""compressed-tensors W8A8 checkpoints, as llm-compressor writes them and vLLM reads them (FP8
"float-quantized", int8 "int-quantized"): the config, and loading them as W8A8Linears.

    "quantization_config": {
      "quant_method": "compressed-tensors", "format": "float-quantized" | "int-quantized",
      "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": null,
      "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float" | "int", "symmetric": true,
                    "strategy": "channel" | "tensor", "dynamic": false, ...},
        "input_activations": {"num_bits": 8, "type": ..., "symmetric": true,
                              "strategy": "token", "dynamic": true}   # per-token, on the fly
                          or {"strategy": "tensor", "dynamic": false}  # a static input_scale
        "output_activations": null}}}

Tensors of a quantized Linear `p`: `p.weight` [out, in] float8_e4m3fn / int8, `p.weight_scale`
[out, 1] (channel) or [] / [1] (tensor; spread over the channels here), any float dtype;
`p.input_scale` [] / [1] when static. Zero points (`p.*_zero_point`, which older tools wrote
even for symmetric schemes) must be zeros and are dropped. Which Linears are quantized is read
from the tensors (a `weight_scale` beside an 8-bit weight), not from targets / ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import CheckpointError, ConfigError
from kiln.model.hf_format import hf_to_kiln
from kiln.model.w8a8 import QDTYPES, W8A8Linear, W8A8Weight

QUANT_METHOD = "compressed-tensors"
FORMATS = {"float": "float-quantized", "int": "int-quantized"}
READ_FORMATS = (*FORMATS.values(), "naive-quantized")
SCALE_PARTS = ("weight_scale", "input_scale", "weight_zero_point", "input_zero_point")


@dataclass(frozen=True)
class W8A8Scheme:
    """What a compressed-tensors config says: 8-bit float or int weights and activations, the
    activations' scale per token (dynamic) or fixed in the checkpoint (static)."""

    type: str  # "float" | "int"
    static_input: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return QDTYPES[self.type]


def _args(type_: str, strategy: str, dynamic: bool, observer: str | None) -> dict:
    """A compressed-tensors QuantizationArgs, every field written as llm-compressor does."""
    return {
        "num_bits": 8,
        "type": type_,
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": observer,
        "observer_kwargs": {},
    }


def compressed_tensors_config(type_: str, ignore: list[str]) -> dict:
    """The quantization_config of a W8A8 checkpoint kiln writes: per-channel weights, dynamic
    per-token activations, of `type_` "float" (FP8) or "int" (int8); `ignore`: HF module names
    (or "re:" patterns) left unquantized."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMATS[type_],
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _args(type_, "channel", False, "minmax"),
                "input_activations": _args(type_, "token", True, None),
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read_compressed_tensors(hf_config: dict) -> W8A8Scheme | None:
    """The W8A8Scheme of a config.json dict whose quantization_config is compressed-tensors,
    else None; ConfigError naming the field kiln cannot run."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return None
    where = "quantization_config"
    fmt = qc.get("format")
    if fmt not in READ_FORMATS:
        raise ConfigError(
            f"{where}.format {fmt!r} is not supported; kiln reads {', '.join(READ_FORMATS)}"
        )
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{where}.quantization_status {status!r}: kiln reads compressed")
    if qc.get("kv_cache_scheme") is not None:
        raise ConfigError(f"{where}.kv_cache_scheme is not supported (an FP8 KV cache)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}.config_groups must be a non-empty object")
    schemes = {_read_group(f"{where}.config_groups.{k}", g) for k, g in groups.items()}
    if len(schemes) > 1:
        raise ConfigError(f"{where}.config_groups mix schemes; kiln reads one W8A8 scheme")
    return schemes.pop()


def _read_group(where: str, group) -> W8A8Scheme:
    if not isinstance(group, dict):
        raise ConfigError(f"{where} must be an object")
    if group.get("output_activations") is not None:
        raise ConfigError(f"{where}.output_activations is not supported")
    w = _read_args(f"{where}.weights", group.get("weights"), {"channel", "tensor"}, False)
    act = group.get("input_activations")
    if act is None:
        raise ConfigError(f"{where}.input_activations is null (weight-only); kiln reads W8A8")
    static = not act.get("dynamic") if isinstance(act, dict) else False
    a = _read_args(
        f"{where}.input_activations", act, {"tensor"} if static else {"token"}, not static
    )
    if a != w:
        raise ConfigError(f"{where}.input_activations.type {a!r} differs from the weights' {w!r}")
    return W8A8Scheme(w, static)


def _read_args(where: str, args, strategies: set[str], dynamic: bool) -> str:
    """The `type` of QuantizationArgs that kiln runs, else ConfigError naming the field."""
    if not isinstance(args, dict):
        raise ConfigError(f"{where} must be an object")
    want = {"num_bits": 8, "symmetric": True, "dynamic": dynamic}
    for field, value in want.items():
        if args.get(field, value) != value:
            raise ConfigError(f"{where}.{field} {args.get(field)!r} is not supported; want {value}")
    if args.get("type") not in QDTYPES:
        raise ConfigError(f"{where}.type {args.get('type')!r} is not supported; want float or int")
    if args.get("strategy") not in strategies:
        raise ConfigError(
            f"{where}.strategy {args.get('strategy')!r} is not supported here; want "
            f"{' or '.join(sorted(strategies))}"
        )
    return args["type"]


def is_w8a8_part(name: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor belongs to a quantized Linear (its 8-bit weight or scales)."""
    part = name.rpartition(".")[2]
    return part in SCALE_PARTS or (part == "weight" and tensor.dtype in QDTYPES.values())


def w8a8_weight(prefix: str, parts: dict[str, torch.Tensor], scheme: W8A8Scheme) -> W8A8Weight:
    """The W8A8Weight of one Linear's tensors (weight_scale spread over the output channels)."""
    for need in ("weight", "weight_scale") + (("input_scale",) if scheme.static_input else ()):
        if need not in parts:
            raise CheckpointError(f"quantized layer {prefix!r} lacks tensor {need!r}")
    w, scale = parts["weight"], parts["weight_scale"]
    if w.dtype != scheme.dtype or w.dim() != 2:
        raise CheckpointError(
            f"tensor '{prefix}.weight' is {w.dtype} {tuple(w.shape)}; the config says "
            f"{scheme.dtype} [out, in]"
        )
    if scale.numel() not in (1, w.shape[0]):
        raise CheckpointError(
            f"tensor '{prefix}.weight_scale' has shape {tuple(scale.shape)}; want "
            f"[{w.shape[0]}, 1] or one scale"
        )
    for zp in ("weight_zero_point", "input_zero_point"):
        if zp in parts and parts[zp].any():
            raise CheckpointError(f"tensor '{prefix}.{zp}' is not zero (asymmetric)")
    return W8A8Weight(w, scale.float().reshape(-1, 1).expand(w.shape[0], 1).contiguous())


def install_w8a8(
    model: nn.Module,
    config: ModelConfig,
    scheme: W8A8Scheme,
    quantized: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
) -> set[str]:
    """Replace each Linear whose tensors are in `quantized` (HF module name -> part -> tensor)
    by a W8A8Linear on `device` (keeping the Linear's loaded bias); the kiln weight names
    loaded this way."""
    if config.model_type == "gpt2":
        raise CheckpointError("compressed-tensors checkpoints of gpt2 are not supported")
    loaded = set()
    for prefix, parts in quantized.items():
        q = w8a8_weight(prefix, parts, scheme)
        ((name, _),) = hf_to_kiln(config, f"{prefix}.weight", q.weight)
        module_name = name.removesuffix(".weight")
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"unexpected quantized layer {prefix!r}") from None
        if not isinstance(linear, nn.Linear) or linear.weight.shape != q.weight.shape:
            raise CheckpointError(
                f"tensor '{prefix}.weight' has shape {tuple(q.weight.shape)}, config expects "
                f"{tuple(getattr(linear, 'weight', torch.empty(0)).shape)}"
            )
        static = parts["input_scale"].to(device) if scheme.static_input else None
        layer = W8A8Linear(q.weight.to(device), q.weight_scale.to(device), linear.bias, static)
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
        loaded.add(name)
    return loaded
