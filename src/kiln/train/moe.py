"""Mixture-of-experts training: the router's auxiliary losses and per-expert load statistics.

In training each kiln.model.layers.MoE keeps its last router logits ([N, E] for the N tokens
of the micro-batch); `moe_loss` adds to the LM loss

- the load-balancing loss of Switch Transformer / Mixtral (Fedus et al. 2021, eqs. 4-6),
  E * sum_e f_e * P_e with f_e the share of the N * k top-k assignments that go to expert e
  and P_e the mean router probability of e, over all MoE layers' tokens together: exactly
  transformers' load_balancing_loss_func (1 when perfectly balanced);
- the router z-loss of ST-MoE (Zoph et al. 2022), the mean over tokens and layers of
  logsumexp(router logits)^2, which keeps the logits small;

and logs each expert's load (its share f_e of the assignments, all layers together) and the
largest load over the mean (`expert_load_max`: 1 when balanced, E when one expert takes all).
Switch routing (top-1, the output scaled by the router probability, not renormalized) is
the model's own routing with num_experts_per_tok 1 and norm_topk_prob false (kiln pretrain's
`switch_routing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.model.layers import MoE


def router_logits(model) -> list[Tensor]:
    """Each MoE layer's router logits of the last training forward."""
    logits = [m.router_logits for m in model.modules() if isinstance(m, MoE)]
    return [x for x in logits if x is not None]


def expert_counts(logits: list[Tensor], top_k: int) -> tuple[Tensor, Tensor, int]:
    """(top-k assignments per expert [E], router probability summed per expert [E], rows),
    summed over the layers."""
    num_experts = logits[0].shape[-1]
    counts = torch.zeros(num_experts, device=logits[0].device)
    prob_sum = torch.zeros(num_experts, device=logits[0].device)
    for layer in logits:
        probs = F.softmax(layer.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counts = counts.scatter_add(0, chosen, torch.ones_like(chosen, dtype=counts.dtype))
        prob_sum = prob_sum + probs.sum(0)
    return counts, prob_sum, sum(layer.shape[0] for layer in logits)


def load_balancing_loss(logits: list[Tensor], top_k: int) -> Tensor:
    """Switch / Mixtral auxiliary loss over the layers' router logits (each [N, E])."""
    counts, prob_sum, rows = expert_counts(logits, top_k)
    num_experts = counts.numel()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(logits: list[Tensor]) -> Tensor:
    """ST-MoE's z-loss: mean of logsumexp(logits)^2 over every token of every layer."""
    z = torch.cat([torch.logsumexp(layer.float(), dim=-1) for layer in logits])
    return z.pow(2).mean()


def moe_loss(base_loss, top_k: int, aux_coef: float, z_coef: float):
    """Wrap a loop loss function `base_loss(model, batch) -> (loss, metrics)`: add the router
    losses of the MoE layers and their load statistics to the metrics."""

    def loss_fn(model, batch):
        loss, metrics = base_loss(model, batch)
        logits = router_logits(model)
        if not logits:  # evaluation (no router logits kept outside training)
            return loss, metrics
        aux, z = load_balancing_loss(logits, top_k), router_z_loss(logits)
        loss = loss + aux_coef * aux + z_coef * z
        counts = expert_counts([x.detach() for x in logits], top_k)[0]
        load = counts / counts.sum()
        metrics = dict(metrics, aux_loss=aux.detach(), z_loss=z.detach())
        metrics["expert_load_max"] = load.max() * load.numel()
        metrics |= {f"expert_load_{e}": v for e, v in enumerate(load)}
        return loss, metrics

    return loss_fn
