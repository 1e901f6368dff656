"""DPO: the loss against TRL's own code, the LoRA reference, data errors, and learning."""

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import kiln
from kiln.cli import main as kiln_main
from kiln.errors import InputError
from kiln.model.lora import LoraConfig, apply_lora
from kiln.train import dpo


def _trl_loss(loss_type, beta, per_token, completion_mask, ref_chosen, ref_rejected):
    """Run TRL's DPOTrainer._compute_loss on fixed per-token log-probs (a stand-in model)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n, t = completion_mask.shape
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(n, t - 1),
        mean_logits=torch.zeros(n, t - 1),
        is_top1=torch.zeros(n, t - 1, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device="cpu", gather=identity, gather_for_metrics=identity, unwrap_model=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_matches_trl(loss_type):
    g = torch.Generator().manual_seed(0)
    b, t, beta = 4, 12, 0.3
    completion_mask = torch.zeros(2 * b, t, dtype=torch.long)
    for row in range(2 * b):
        start = int(torch.randint(2, 6, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        completion_mask[row, start:end] = 1
    per_token = -torch.rand(2 * b, t - 1, generator=g) * 3 * completion_mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * b, generator=g)
    want, metrics = _trl_loss(loss_type, beta, per_token, completion_mask, *ref.chunk(2))
    logps = per_token.sum(1)
    lens = completion_mask.sum(1)
    losses, chosen_r, rejected_r = dpo.dpo_loss(
        *logps.chunk(2), *ref.chunk(2), beta, loss_type, *lens.chunk(2)
    )
    torch.testing.assert_close(losses.mean(), want, atol=1e-6, rtol=1e-6)
    assert math.isclose(chosen_r.mean().item(), metrics["rewards/chosen"][0], rel_tol=1e-6)
    assert math.isclose(
        (chosen_r > rejected_r).float().mean().item(), metrics["rewards/accuracies"][0]
    )


@pytest.fixture(scope="module")
def chat_model(hf_model_dir, tmp_path_factory):
    from chat_tokenizer import model_with_tokenizer

    return model_with_tokenizer(hf_model_dir("llama")[0], tmp_path_factory.mktemp("dpo_llama"))


def test_lora_reference_is_the_base_and_starts_at_log2(chat_model):
    tok = kiln.load_tokenizer(chat_model)
    pairs = dpo.load_pairs(tok, dpo.DEFAULT_DATA, 256)[:4]
    batch = dpo.pair_batches(pairs, 4, 0, seed=0)(0)
    model = kiln.load_model(chat_model)
    base = dpo.sequence_logps(model, batch)
    apply_lora(model, LoraConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)  # B nonzero: the policy now differs from the base
    loss_fn = dpo.DPOLoss(beta=0.1)
    torch.testing.assert_close(loss_fn.reference_logps(model, batch), base)
    assert not torch.allclose(dpo.sequence_logps(model, batch), base)
    fresh = kiln.load_model(chat_model)
    apply_lora(fresh, LoraConfig(r=4))
    loss, metrics = loss_fn(fresh, batch)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert metrics["rewards/margins"].item() == 0


def test_bad_records_are_refused(chat_model, tmp_path):
    tok = kiln.load_tokenizer(chat_model)
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "a"}) + "\n")
    with pytest.raises(InputError, match=r"prefs.jsonl:1: missing key\(s\) rejected"):
        dpo.load_pairs(tok, data, 64)
    with pytest.raises(InputError, match="beta must be > 0"):
        dpo.DPOLoss(beta=0)


def _learnable_prefs(path, n=48):
    """Chosen answers say yes, rejected ones say no: a signal a tiny model can learn."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(4))
            prompt = [{"role": "user", "content": f"Is {word} a word?"}]
            f.write(json.dumps({"prompt": prompt, "chosen": "yes", "rejected": "no"}) + "\n")


def test_dpo_raises_reward_accuracy(chat_model, tmp_path):
    data, out = tmp_path / "prefs.jsonl", tmp_path / "out"
    _learnable_prefs(data)
    args = ["dpo", "--model", str(chat_model), "--data", str(data), "--out", str(out)]
    args += ["--lora-r", "8", "--lr", "1e-2", "--max-steps", "15", "--batch-size", "8"]
    args += ["--warmup-steps", "2", "--val-fraction", "0", "--beta", "0.1"]
    assert kiln_main(args) == 0
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(log[-1])
    tok = kiln.load_tokenizer(chat_model)
    batch = dpo.pair_batches(dpo.load_pairs(tok, data, 64), 48, 0, seed=0)(0)
    loss_fn = dpo.DPOLoss(0.1, reference=kiln.load_model(chat_model))
    with torch.no_grad():
        _, metrics = loss_fn(kiln.load_model(chat_model, lora=out), batch)
    assert metrics["rewards/accuracies"].item() > 0.9
    assert metrics["rewards/margins"].item() > 0


def test_full_finetune_dpo_on_bundled_set_runs(chat_model, tmp_path):
    out = tmp_path / "out"
    args = ["dpo", "--model", str(chat_model), "--out", str(out), "--loss-type", "ipo"]
    args += ["--max-steps", "2", "--batch-size", "2", "--eval-steps", "1", "--lr", "1e-4"]
    assert kiln_main(args) == 0
    assert kiln.load_model(out).config.num_layers == 2
