"""Multi-LoRA serving: many adapters over one base model, run in the same batch.

A request names its adapter with a LoRARequest (vLLM's fields). LoRAManager transforms the
runner's model once: every decoder Linear (after fusing: qkv_proj, o_proj, gate_up_proj,
down_proj) becomes a LoRAStackLinear, which holds each device slot's A and B (padded to
max_lora_rank, scaling folded into B; a fused Linear keeps each projection's slice) and adds

    out[n] += (x[n] @ A[slot[n]].T) @ B[slot[n]].T        (kiln.kernels.lora)

where slot[n] is token n's adapter slot (-1: the base model) from one device buffer the runner
fills each step (LoRAMapping; a CUDA graph reads it like its other inputs). Adapters are read
from PEFT directories (as kiln's fine-tuning writes them), checked against the base model's
shapes and max_lora_rank, kept on the host (the newest max_cpu_loras) and copied into one of
max_loras device slots when a step needs them; the scheduler runs at most max_loras distinct
adapters at once, so a slot is always free for the step's adapters.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kiln.engine.transfer import copy_to_device
from kiln.errors import CheckpointError, InputError
from kiln.kernels.lora import (
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
)
from kiln.model.lora import adapter_scaling, hf_module_names, read_adapter

log = logging.getLogger("kiln.engine")


@dataclass
class LoRARequest:
    """An adapter a request runs with: a name, a unique id >= 1, its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InputError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")


@dataclass
class AdapterWeights:
    """An adapter on the host: kiln module name -> (A [r, in], scaling * B [out, r])."""

    request: LoRARequest
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AdapterTargets:
    """What an adapter may target in a base model: HF module name -> kiln's, the decoder
    Linears' (in, out) features, and the kiln names that can carry an adapter."""

    hf_to_kiln: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    servable: set[str]

    @classmethod
    def of(cls, model: nn.Module) -> AdapterTargets:
        """From a plain (unfused) model; every decoder Linear but MoE experts is servable."""
        shapes = {
            name: (m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.")
        }
        hf_to_kiln = {hf: kiln for kiln, hf in hf_module_names(model).items()}
        return cls(hf_to_kiln, shapes, {n for n in shapes if not _routed(n)})


def _routed(name: str) -> bool:
    """A MoE expert or router: it sees some tokens (or other rows) than the step's."""
    return ".experts." in name or name.endswith(".gate")


def read_lora(
    request: LoRARequest, targets: AdapterTargets, max_rank: int, dtype: torch.dtype | None = None
) -> AdapterWeights:
    """Read `request`'s PEFT adapter and check it fits (InputError naming the adapter and the
    module if not): kiln names, (A, scaling * B) in `dtype`."""
    name = request.lora_name
    try:
        cfg, weights = read_adapter(request.lora_path)
    except CheckpointError as e:
        raise InputError(f"LoRA adapter {name!r}: {e}", "lora_path") from None
    layers, rank = {}, 0
    for hf_name, (a, b) in weights.items():
        kiln_name = targets.hf_to_kiln.get(hf_name)
        if kiln_name is None or kiln_name not in targets.shapes:
            made_for = cfg.get("base_model_name_or_path")
            raise InputError(f"LoRA adapter {name!r} targets {hf_name}, which this base "
                             f"model lacks (made for {made_for})", "lora_path")  # fmt: skip
        if kiln_name not in targets.servable:
            raise InputError(f"LoRA adapter {name!r} targets {hf_name}, which kiln serves "
                             "no adapters on (quantized or MoE expert)", "lora_path")  # fmt: skip
        in_f, out_f = targets.shapes[kiln_name]
        r = a.shape[0]
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise InputError(
                f"LoRA adapter {name!r} does not fit the base model at {hf_name}: lora_A "
                f"{tuple(a.shape)}, lora_B {tuple(b.shape)}, the layer is {in_f} -> {out_f}",
                "lora_path",
            )
        if r > max_rank:
            raise InputError(f"LoRA adapter {name!r} has rank {r} at {hf_name}, above "
                             f"max_lora_rank {max_rank}", "lora_path")  # fmt: skip
        b = b.float() * adapter_scaling(cfg, r)
        layers[kiln_name] = (a.to(dtype or a.dtype), b.to(dtype or a.dtype))
        rank = max(rank, r)
    return AdapterWeights(request, rank, layers)


def check_lora(model_config, request: LoRARequest, max_rank: int) -> None:
    """read_lora against a model of `model_config` built on the meta device (no weights):
    how an API process checks an adapter before the engine core loads it."""
    from kiln.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_config)
    read_lora(request, AdapterTargets.of(model), max_rank)


class LoRAMapping:
    """Each token's adapter slot (-1: none), in one device buffer the LoRA layers read."""

    def __init__(self, size: int, device: torch.device):
        self.slots = torch.full((size,), -1, dtype=torch.int32, device=device)  # [size]
        self.active = True  # False: no token of the (eager) step has an adapter

    def stage(self, row_slots: list[int], rows: list[int], size: int) -> None:
        """Token slots for a step of `size` rows: row_slots[i] for rows[i] consecutive tokens
        (a graph's padding rows get -1)."""
        host = np.full(size, -1, dtype=np.int32)
        host[: sum(rows)] = np.repeat(row_slots, rows)
        copy_to_device(self.slots[:size], host)


class LoRAStackLinear(nn.Module):
    """A base Linear plus every slot's LoRA update for the tokens that name one.

    `slices` are the projections the base Linear holds (one, or q/k/v, or gate/up), each
    (kiln module name, output features), in output order."""

    def __init__(self, base: nn.Linear, slices, num_slots: int, max_rank: int, mapping, ops):
        super().__init__()
        self.base_layer, self.mapping = base, mapping
        self.max_rank = max_rank
        self.names = [name for name, _ in slices]
        self.sizes = [n for _, n in slices]
        assert sum(self.sizes) == base.out_features, (slices, base.out_features)
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        a = torch.zeros(num_slots, len(slices) * max_rank, base.in_features, **kw)
        self.register_buffer("lora_a", a)  # [slots, slices * R, in]
        self.register_buffer("lora_b", torch.zeros(num_slots, base.out_features, max_rank, **kw))
        triton = ops.name == "triton"
        self.shrink = lora_shrink_triton if triton else lora_shrink_ref
        self.expand = lora_expand_triton if triton else lora_expand_ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if x.dim() != 2 or not self.mapping.active:  # (embeddings run the base model)
            return out
        slots = self.mapping.slots[: x.shape[0]]
        y = self.shrink(x, self.lora_a, slots)  # [P, N, slices * R] float32 partial sums
        self.expand(y, self.lora_b, slots, out, self.sizes)  # every slice, one launch
        return out

    @torch.no_grad()
    def set_slot(self, slot: int, adapter: AdapterWeights | None) -> None:
        """Write an adapter's weights (zeros where it has none) into `slot`."""
        r = self.max_rank
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for i, (name, lo, hi) in enumerate(zip(self.names, self.offsets, self.offsets[1:])):
            if adapter is not None and name in adapter.layers:
                a, b = adapter.layers[name]
                self.lora_a[slot, i * r : i * r + a.shape[0]].copy_(a)
                self.lora_b[slot, lo:hi, : b.shape[1]].copy_(b)


def _slices(name: str, linear: nn.Linear, mc) -> list[tuple[str, int]]:
    """The projections a (possibly fused) decoder Linear holds."""
    prefix, _, leaf = name.rpartition(".")
    if leaf == "qkv_proj":
        q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        return [(f"{prefix}.q_proj", q), (f"{prefix}.k_proj", kv), (f"{prefix}.v_proj", kv)]
    if leaf == "gate_up_proj":
        half = linear.out_features // 2
        return [(f"{prefix}.gate_proj", half), (f"{prefix}.up_proj", half)]
    return [(name, linear.out_features)]


class LoRAManager:
    """The adapters: their host copies, the device slots, and the model's LoRA layers.

    Built on the plain model (it reads the HF module names there), then `wrap` the model the
    runner runs (fused or not)."""

    def __init__(self, model: nn.Module, config, device: torch.device):
        self.max_loras, self.max_cpu_loras = config.max_loras, config.max_cpu_loras
        self.max_rank = config.max_lora_rank
        self.model_config = model.config
        self.targets = AdapterTargets.of(model)
        self.targets.servable = set()  # until wrap() says which Linears carry adapters
        size = config.max_num_batched_tokens + config.max_num_seqs  # any step's token rows
        self.mapping = LoRAMapping(size, device)
        self.layers: list[LoRAStackLinear] = []
        self.cpu: OrderedDict[int, AdapterWeights] = OrderedDict()  # newest last
        self.slot_ids: list[int | None] = [None] * self.max_loras  # lora_int_id in each slot
        self.slot_last_use = [0] * self.max_loras
        self.steps = 0

    def wrap(self, model: nn.Module, ops) -> None:
        """Replace the decoder Linears (not MoE experts, not packed quantized ones) in place."""
        for name, m in list(model.named_modules()):
            if not isinstance(m, nn.Linear) or not name.startswith("layers."):
                continue
            if _routed(name):
                continue
            slices = _slices(name, m, self.model_config)
            if not all(n in self.targets.shapes for n, _ in slices):
                continue
            layer = LoRAStackLinear(m, slices, self.max_loras, self.max_rank, self.mapping, ops)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            self.layers.append(layer)
            self.targets.servable.update(n for n, _ in slices)
        for block in model.layers:  # the fused small-batch GEMVs read plain Linear weights
            if hasattr(block, "gemv_max_batch"):
                block.gemv_max_batch = 0

    # ------------------------------------------------------------------ adapters

    def add(self, request: LoRARequest) -> None:
        """Read and check `request`'s adapter (InputError naming it and the module if it does
        not fit) unless it is on the host already."""
        known = self.cpu.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise InputError(
                    f"lora_int_id {request.lora_int_id} is adapter {known.request.lora_name!r} "
                    f"({known.request.lora_path}); {request.lora_name!r} needs another id"
                )
            self.cpu.move_to_end(request.lora_int_id)
            return
        self.cpu[request.lora_int_id] = self._read(request)
        resident = {i for i in self.slot_ids if i is not None}
        for old in list(self.cpu):
            if len(self.cpu) <= self.max_cpu_loras:
                break
            if old not in resident and old != request.lora_int_id:
                del self.cpu[old]  # read again from its path if a request names it later

    def _read(self, request: LoRARequest) -> AdapterWeights:
        dtype = self.layers[0].lora_a.dtype if self.layers else None
        return read_lora(request, self.targets, self.max_rank, dtype)

    def remove(self, lora_int_id: int) -> None:
        """Forget an adapter (the caller made sure no sequence still runs with it)."""
        self.cpu.pop(lora_int_id, None)
        if lora_int_id in self.slot_ids:
            self.slot_ids[self.slot_ids.index(lora_int_id)] = None

    # ------------------------------------------------------------------ one step

    def stage(
        self, requests: list[LoRARequest | None], rows: list[int], size: int, graph: bool
    ) -> None:
        """Make the step's adapters resident and stage each token's slot: requests[i] covers
        rows[i] consecutive tokens of a step of `size` rows (a CUDA graph's, or the tokens)."""
        self.steps += 1
        step = {r.lora_int_id: r for r in requests if r is not None}
        slot_of = {i: self._activate(r, set(step)) for i, r in step.items()}
        # an eager step of base-model tokens only skips the LoRA kernels (a graph runs them)
        self.mapping.active = bool(step) or graph
        if self.mapping.active:
            row_slots = [slot_of[r.lora_int_id] if r is not None else -1 for r in requests]
            self.mapping.stage(row_slots, rows, size)

    def _activate(self, request: LoRARequest, step_ids: set[int]) -> int:
        """The device slot holding the adapter, copying it in (over the least recently used
        slot that this step does not need) if it is not there."""
        lora_int_id = request.lora_int_id
        if lora_int_id in self.slot_ids:
            slot = self.slot_ids.index(lora_int_id)
        else:
            free = [s for s, i in enumerate(self.slot_ids) if i is None or i not in step_ids]
            assert free, "more adapters in one step than max_loras"
            slot = min(free, key=lambda s: (self.slot_ids[s] is not None, self.slot_last_use[s]))
            if lora_int_id not in self.cpu:  # dropped from the host cache since it was added
                self.add(request)
            adapter = self.cpu[lora_int_id]
            for layer in self.layers:
                layer.set_slot(slot, adapter)
            self.slot_ids[slot] = lora_int_id
            log.info("LoRA adapter %r -> device slot %d", adapter.request.lora_name, slot)
        self.slot_last_use[slot] = self.steps
        return slot
