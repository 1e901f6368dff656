"""Structured pruning: remove whole attention heads or MLP channels, so the model really shrinks
(a config with fewer heads or a narrower MLP, a checkpoint transformers loads as it is).

Every layer keeps the same number (the config has one num_heads and one intermediate_size).
What goes is what contributes least to the layer's output on calibration text:

    head h:     sum_t ||W_o[:, h] a_t,h||^2 = <W_o,h^T W_o,h, sum_t a_t,h a_t,h^T>  (a: the
                head's attention output, o_proj's input; a [D, D] Gram per head suffices)
    channel j:  sum_t ||W_down[:, j] a_t,j||^2 = ||W_down[:, j]||^2 * sum_t a_t,j^2

Under grouped-query attention each KV group loses the same number of query heads (the KV
heads stay); under multi-head attention a head goes with its key and value. Layers are scored
block by block on the outputs of the blocks already pruned (kiln.quant.quantize
.calibrate_blocks): a removed head or channel is first masked (its o_proj / down_proj columns
zeroed, which computes exactly what removing it computes), then all are cut out at the end.
"""

from __future__ import annotations

import torch

from kiln.compress.stats import HeadGram, InputNorms
from kiln.config import ModelConfig
from kiln.errors import InputError
from kiln.model.transformer import Transformer
from kiln.quant.quantize import calibrate_blocks


def head_scores(o_weight: torch.Tensor, gram: HeadGram) -> torch.Tensor:
    """Each head's summed squared contribution to o_proj's output [heads]."""
    heads, d, _ = gram.s.shape
    w = o_weight.double().view(-1, heads, d)  # [hidden, heads, D]
    return torch.einsum("ohd,ohe,hde->h", w, w, gram.s)


def channel_scores(down_weight: torch.Tensor, norms: InputNorms) -> torch.Tensor:
    """Each MLP channel's summed squared contribution to down_proj's output [intermediate]."""
    return down_weight.double().pow(2).sum(0) * norms.sq


def removed_count(sparsity: float, total: int, what: str) -> int:
    """round(sparsity * total) units to remove; InputError unless 0 < that < total."""
    r = round(sparsity * total)
    if sparsity > 0 and r == 0:
        raise InputError(f"--sparsity {sparsity} removes none of {total} {what}", "sparsity")
    if r >= total:
        raise InputError(f"--sparsity {sparsity} would remove all {total} {what}", "sparsity")
    return r


def kept_heads(scores: torch.Tensor, num_kv_heads: int, remove: int):
    """(query heads kept, KV heads kept), sorted: `remove` query heads of each KV group
    (grouped-query), or `remove` heads with their K/V (multi-head, num_kv_heads == heads)."""
    heads = len(scores)
    if num_kv_heads == heads:
        keep = torch.topk(scores, heads - remove).indices.sort().values
        return keep, keep
    group = heads // num_kv_heads
    top = torch.topk(scores.view(num_kv_heads, group), group - remove, dim=1).indices
    keep = (top.sort(dim=1).values + group * torch.arange(num_kv_heads)[:, None]).flatten()
    return keep, torch.arange(num_kv_heads)


def heads_config(config: ModelConfig, heads: int, kv_heads: int) -> ModelConfig:
    """The config with `heads` query and `kv_heads` KV heads. transformers' LlamaConfig
    refuses a hidden_size that is not a multiple of num_attention_heads, even with head_dim
    given; Mistral's computes the same network (no sliding window, no biases) without that
    check, so such a llama is written as one. InputError for a llama with biases, which
    Mistral lacks."""
    config = config.replace(num_heads=heads, num_kv_heads=kv_heads)
    if config.model_type != "llama" or config.hidden_size % heads == 0:
        return config
    if config.qkv_bias or config.o_bias or config.mlp_bias:
        raise InputError(
            f"--method heads: {heads} heads do not divide hidden_size {config.hidden_size}, "
            "which transformers' llama requires; choose another --sparsity",
            param="sparsity",
        )
    return config.replace(
        model_type="mistral", hf_config=config.hf_config | {"sliding_window": None}
    )


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of a q/k/v projection (or o_proj columns) that the given heads own."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def prune_structured(
    model: Transformer, ids: torch.Tensor, method: str, sparsity: float, progress: bool = False
) -> Transformer:
    """A smaller Transformer: `sparsity` of the heads ("heads") or MLP channels ("channels")
    of every layer removed, scored on calibration ids [samples, len] (model is masked in
    place on the way: the removed parts' output columns zeroed)."""
    config = model.config
    if method == "heads":
        if config.model_type == "gpt2":
            raise InputError("--method heads: gpt2 derives head_dim from n_embd / n_head")
        per = config.num_heads // config.num_kv_heads
        remove = removed_count(sparsity, config.num_heads if per == 1 else per, "heads")
        left = config.num_heads - remove * (1 if per == 1 else config.num_kv_heads)
        heads_config(config, left, left if per == 1 else config.num_kv_heads)  # fail early
        target, width = "self_attn.o_proj", config.head_dim

        def stat(name, lin):
            return HeadGram(config.num_heads, width, lin.weight.device) if name == target else None
    else:
        if config.num_experts:
            raise InputError("--method channels does not prune MoE experts", param="method")
        remove = removed_count(sparsity, config.intermediate_size, "MLP channels")
        target, width = "mlp.down_proj", 1

        def stat(name, lin):
            return InputNorms(lin.in_features, lin.weight.device) if name == target else None

    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, found in calibrate_blocks(model, ids, stat, method, progress):
        if target not in found:  # an SSM layer, or a layer without an MLP
            continue
        lin, s = found[target]
        if method == "heads":
            keep = kept_heads(head_scores(lin.weight, s).cpu(), config.num_kv_heads, remove)
        else:
            keep = (torch.topk(channel_scores(lin.weight, s).cpu(), s.sq.numel() - remove)
                    .indices.sort().values,)  # fmt: skip
        kept[i] = keep
        mask = torch.ones(lin.in_features, dtype=torch.bool)
        mask[head_rows(keep[0], width)] = False
        lin.weight[:, mask.to(lin.weight.device)] = 0
    if not kept:
        raise InputError(f"--method {method}: the model has no layer to prune", param="method")
    return shrink(model, kept, method)


def shrink(model: Transformer, kept: dict, method: str) -> Transformer:
    """A new Transformer holding only the kept heads / channels of each layer (kept: layer ->
    (query heads, KV heads) or (channels,)), its config changed to match."""
    config = model.config
    state = model.state_dict()

    def take(name: str, index: torch.Tensor, dim: int = 0) -> None:
        if name in state:  # biases only where the family has them
            state[name] = state[name].index_select(dim, index.to(state[name].device))

    for i, keep in kept.items():
        if method == "heads":
            q, kv = (head_rows(k, config.head_dim) for k in keep)
            pre = f"layers.{i}.self_attn"
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                take(f"{pre}.{proj}.weight", rows)
                take(f"{pre}.{proj}.bias", rows)
            take(f"{pre}.o_proj.weight", q, dim=1)
            heads, kv_heads = len(keep[0]), len(keep[1])
        else:
            pre = f"layers.{i}.mlp"
            for proj in ("gate_proj", "up_proj"):
                take(f"{pre}.{proj}.weight", keep[0])
                take(f"{pre}.{proj}.bias", keep[0])
            take(f"{pre}.down_proj.weight", keep[0], dim=1)
            channels = len(keep[0])
    if method == "heads":
        config = heads_config(config, heads, kv_heads)
    else:
        config = config.replace(intermediate_size=channels)
    with torch.device("meta"):
        small = Transformer(config)
    small.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        small.lm_head.weight = small.embed_tokens.weight
    small.reset_buffers(next(iter(state.values())).device)
    return small.eval()
