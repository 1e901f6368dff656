"""Reward models (saved as transformers' sequence classifiers, learned from the bundled count
preferences) and PPO against one; KTO and rejection sampling on the same toy task."""

import json

import pytest
import torch
from train.rl_toy import toy_model_dir

import kiln
from kiln.cli import main as kiln_main
from kiln.errors import CheckpointError
from kiln.train.default_model import RL_DATA
from kiln.train.dpo import load_pairs
from kiln.train.kto import load_kto_examples
from kiln.train.reward import RewardModel, load_reward_model, save_reward_model
from kiln.train.rewards import RewardModelScorer
from kiln.train.rft import best_of_n

PREFS = RL_DATA / "count_prefs.jsonl"


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "mixtral"])
def test_reward_model_loads_in_transformers_with_the_same_scores(hf_model_dir, tmp_path, name):
    import transformers

    path, _ = hf_model_dir(name)
    model = RewardModel(kiln.load_model(path, device="cpu"), pad_token_id=0)
    out = save_reward_model(model, tmp_path / "rm")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 11), generator=g)
    ids[0, 7:] = 0  # right padding
    ids[1, 4:] = 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__.endswith("ForSequenceClassification")
    with torch.no_grad():
        want = hf(ids).logits.squeeze(-1)
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_reward_model(out, device="cpu")(ids), want, atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_model_dir(tmp_path_factory.mktemp("toy_rm"))


def _log(out):
    return [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_model(toy, tmp_path_factory):
    """`kiln reward` on the bundled count preferences."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    args = ["reward", "--model", str(toy), "--out", str(out), "--data", str(PREFS)]
    args += ["--max-steps", "60", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "5"]
    args += ["--val-fraction", "0.1", "--log-interval", "10"]
    assert kiln_main(args) == 0
    return out


def test_reward_model_learns_the_bundled_preferences(toy, reward_model):
    # the loss falls and the margin opens (a log row's accuracy is over its last 10 batches
    # of 16 pairs: too noisy to compare two of them; the pairs' accuracy is checked below)
    train = [row for row in _log(reward_model) if "loss" in row]
    assert train[-1]["loss"] < train[0]["loss"] - 0.1 and train[-1]["margin"] > 0.5
    tok = kiln.load_tokenizer(reward_model)
    pairs = load_pairs(tok, PREFS, 64)
    rm = load_reward_model(reward_model, device="cpu")
    chosen = rm.score_examples([c for c, _ in pairs])
    rejected = rm.score_examples([r for _, r in pairs])
    assert (chosen > rejected).float().mean() > 0.65
    scorer = RewardModelScorer(str(reward_model), device="cpu")  # what --reward-model runs
    first = json.loads(PREFS.read_text().splitlines()[0])
    got = scorer([first["prompt"]] * 2, [first["chosen"], first["rejected"]])
    assert got == pytest.approx([chosen[0].item(), rejected[0].item()], abs=1e-5)


def test_ppo_raises_the_reward_models_score_with_a_bounded_kl(toy, reward_model, tmp_path):
    out = tmp_path / "ppo"
    args = ["ppo", "--model", str(toy), "--out", str(out), "--reward-model", str(reward_model)]
    args += ["--max-steps", "30", "--batch-size", "32", "--max-completion-length", "2"]
    args += ["--lr", "3e-3", "--warmup-steps", "2", "--num-ppo-epochs", "2"]
    assert kiln_main(args) == 0
    log = [r for r in _log(out) if "reward" in r]
    start = sum(r["reward"] for r in log[:5]) / 5
    end = sum(r["reward"] for r in log[-5:]) / 5
    assert end > start + 0.5, (start, end)
    assert max(r["kl"] for r in log) < 2.0
    assert {"vf_loss", "pg_clipfrac", "entropy", "completion_length"} <= set(log[-1])
    assert kiln.load_model(out).config.num_layers == 2  # the policy, without its value head


def test_ppo_with_lora_exports_an_adapter(toy, tmp_path):
    out = tmp_path / "ppo_lora"
    args = [
        "ppo",
        "--model",
        str(toy),
        "--out",
        str(out),
        "--reward",
        "kiln.train.rewards:count_continues",
        "--lora-r",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--max-completion-length",
        "2",
        "--num-ppo-epochs",
        "1",
    ]
    assert kiln_main(args) == 0
    assert (out / "adapter_model.safetensors").is_file()
    kiln.load_model(toy, lora=out)


def test_kto_reads_pairs_and_unpaired_records_and_trains(toy, tmp_path):
    tok = kiln.load_tokenizer(toy)
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text(
        json.dumps({"prompt": "1 2", "completion": " 3", "label": True})
        + "\n"
        + json.dumps({"prompt": "1 2", "completion": " 5", "label": False})
    )
    assert [d for *_, d in load_kto_examples(tok, unpaired, 64)] == [True, False]
    assert len(load_kto_examples(tok, PREFS, 64)) == 2 * len(PREFS.read_text().splitlines())
    out = tmp_path / "kto"
    args = ["kto", "--model", str(toy), "--out", str(out), "--data", str(PREFS)]
    args += ["--max-steps", "20", "--batch-size", "16", "--lr", "3e-3", "--val-fraction", "0"]
    args += ["--log-interval", "5"]
    assert kiln_main(args) == 0
    last = _log(out)[-1]
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["kl"] >= 0


def test_best_of_n_keeps_each_groups_best():
    samples = list("abcdef")
    assert best_of_n(samples, [0, 2, 1, 5, 5, 0], 3, None) == [("b", 2), ("d", 5)]
    assert best_of_n(samples, [0, 2, 1, 5, 5, 0], 3, 3.0) == [("d", 5)]


def test_rft_fine_tunes_on_the_best_of_n(toy, tmp_path):
    out, data = tmp_path / "rft", tmp_path / "count.jsonl"
    data.write_text("".join((RL_DATA / "count.jsonl").read_text().splitlines(True)[:64]))
    args = ["rft", "--model", str(toy), "--out", str(out), "--num-generations", "8"]
    args += ["--data", str(data)]
    args += ["--max-completion-length", "1", "--min-reward", "1", "--max-steps", "10"]
    args += ["--batch-size", "16", "--lr", "1e-2", "--warmup-steps", "1"]
    assert kiln_main(args) == 0
    kept = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert kept and all(r["reward"] == 1.0 for r in kept)
    assert kiln.load_model(out).config.num_layers == 2
