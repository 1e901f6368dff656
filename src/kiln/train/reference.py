"""The reference policy that DPO, KTO, GRPO and PPO hold the trained model to: under LoRA the
model itself with its adapters disabled (no second copy of the weights), under full
fine-tuning a frozen copy of the starting weights."""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn


def make_reference(model: nn.Module, lora: bool) -> nn.Module | None:
    """The reference policy to keep: none under LoRA (the adapters are disabled instead), else a
    frozen copy of the starting weights."""
    return None if lora else copy.deepcopy(model).requires_grad_(False).eval()


@contextmanager
def reference_model(model: nn.Module, frozen: nn.Module | None):
    """The reference: `frozen` when there is one, else `model` with its adapters disabled."""
    if frozen is not None:
        yield frozen
        return
    from kiln.model.lora import disable_adapters

    with disable_adapters(model):
        yield model
