"""MoE training: the router losses against transformers, load statistics, Switch routing."""

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from kiln.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.train.moe import load_balancing_loss, moe_loss, router_logits, router_z_loss
from kiln.train.pretrain import lm_loss


@pytest.mark.parametrize("top_k,experts", [(2, 4), (1, 8), (3, 5)])
def test_load_balancing_loss_equals_transformers(top_k, experts):
    g = torch.Generator().manual_seed(top_k)
    logits = [torch.randn(37, experts, generator=g) * 2 for _ in range(3)]
    ref = load_balancing_loss_func(tuple(logits), experts, top_k)
    assert torch.allclose(load_balancing_loss(logits, top_k), ref, atol=1e-6)


def test_router_z_loss():
    logits = [torch.zeros(4, 8), torch.full((2, 8), 3.0)]
    lse0, lse1 = torch.log(torch.tensor(8.0)), 3 + torch.log(torch.tensor(8.0))
    expected = (4 * lse0**2 + 2 * lse1**2) / 6
    assert torch.allclose(router_z_loss(logits), expected)


def _tiny_moe(top_k=2, renormalize=True):
    hf = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
              moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=top_k,
              norm_topk_prob=renormalize)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(hf))
    model.init_weights()
    return model


def test_moe_loss_adds_router_losses_and_logs_load():
    model = _tiny_moe().train()
    x = torch.randint(0, 64, (2, 12))
    loss_fn = moe_loss(lm_loss, top_k=2, aux_coef=0.01, z_coef=0.001)
    loss, metrics = loss_fn(model, (x, x))
    base, _ = lm_loss(model, (x, x))
    logits = router_logits(model)
    assert len(logits) == 2 and logits[0].shape == (24, 4)
    expected = base + 0.01 * metrics["aux_loss"] + 0.001 * metrics["z_loss"]
    assert torch.allclose(loss, expected)
    loads = [metrics[f"expert_load_{e}"] for e in range(4)]
    assert abs(sum(loads).item() - 1) < 1e-6
    assert metrics["expert_load_max"] == max(loads) * 4
    loss.backward()  # the aux loss reaches the router
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(x)
    assert router_logits(model) == []  # nothing kept outside training


def test_aux_loss_balances_the_router():
    """Minimising the aux loss alone spreads a skewed router's load."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    routers = [torch.nn.Linear(16, 4) for _ in range(2)]
    with torch.no_grad():
        for r in routers:
            r.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # expert 0 takes most tokens
    opt = torch.optim.Adam([p for r in routers for p in r.parameters()], lr=0.05)

    def load_max():
        with torch.no_grad():
            counts = torch.stack(
                [r(x).topk(2).indices.flatten().bincount(minlength=4) for r in routers]
            )
        return (counts.sum(0).max() / counts.sum() * 4).item()

    before = load_max()
    for _ in range(50):
        aux = load_balancing_loss([r(x) for r in routers], 2)
        opt.zero_grad()
        aux.backward()
        opt.step()
    assert before > 1.6 and load_max() < 1.25


def test_switch_routing_weights_are_router_probabilities():
    model = _tiny_moe(top_k=1, renormalize=False).eval()
    moe = model.layers[0].mlp
    x = torch.randn(5, 32)
    probs = torch.softmax(moe.gate(x), dim=-1)
    p, e = probs.max(-1)
    expected = torch.stack([p[i] * moe.experts[e[i]](x[i]) for i in range(5)])
    with torch.no_grad():
        assert torch.allclose(moe(x), expected, atol=1e-6)


@pytest.mark.parametrize("model_type,switch", [("mixtral", False), ("qwen3_moe", True)])
def test_pretrain_moe_logs_load_and_exports(tmp_path, model_type, switch):
    import json

    from train.pretrain_helpers import make_corpus

    import kiln
    from kiln.train.config import load_config
    from kiln.train.pretrain import run_pretrain

    make_corpus(tmp_path / "corpus")
    overrides = dict(
        corpus=str(tmp_path / "corpus"), tokenizer="bpe", vocab_size="300",
        out_dir=str(tmp_path / "run"), model_type=model_type, num_layers="2", num_heads="2",
        hidden_size="32", block_size="32", max_steps="2", batch_size="2", eval_interval="2",
        eval_steps="1", log_interval="1", ckpt_interval="2", device="cpu", num_experts="4",
        switch_routing=str(switch).lower(), router_z_loss_coef="0.001",
    )  # fmt: skip
    run_pretrain(load_config(None, overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    step = next(r for r in records if "loss" in r)
    assert {"aux_loss", "z_loss", "expert_load_max", "expert_load_3"} <= set(step)
    assert abs(sum(step[f"expert_load_{e}"] for e in range(4)) - 1) < 1e-5
    out = tmp_path / "run" / "model"
    ours = kiln.load_model(out, device="cpu")
    assert ours.config.num_experts_per_tok == (1 if switch else 2)
    assert ours.config.norm_topk_prob == (not switch)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
