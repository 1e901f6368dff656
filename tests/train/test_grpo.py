"""GRPO and the rollout machinery: reward functions, the engine synced to the policy, and a
verifiable toy task (continue the count) learned from a random tiny model."""

import json
import textwrap

import pytest
import torch
from train.rl_toy import toy_model_dir

import kiln
from kiln.cli import main as kiln_main
from kiln.errors import InputError
from kiln.model.lora import LoraConfig, apply_lora
from kiln.train import rewards
from kiln.train.config import RolloutConfig
from kiln.train.finetune_data import IGNORE
from kiln.train.grpo import DEFAULT_DATA
from kiln.train.rl import RolloutBatches, logprob_gap, sample_batch, token_logps
from kiln.train.rollout import RolloutEngine, load_prompts


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_model_dir(tmp_path_factory.mktemp("toy"))


def test_verifiable_rewards():
    prompts = ["3 4 5", "7+8=", "1 2"]
    assert rewards.count_continues(prompts, [" 6 7", "junk", "3"]) == [1.0, 0.0, 1.0]
    assert rewards.number_sum(prompts, ["12", " 15 ", "3"]) == [1.0, 1.0, 1.0]
    assert rewards.exact_match(prompts, [" 15", "15", "x"], answer=["15", 16, "x"]) == [1, 0, 1]
    assert rewards.regex_match(prompts, ["ab12", "ab", " a1 "], pattern=[r"ab\d+"] * 3) == [
        1.0, 0.0, 0.0]  # fmt: skip

    @rewards.unit_test
    def returns_answer(completion, answer):
        assert int(completion) == answer

    assert returns_answer(prompts, ["15", "x", "2"], answer=[15, 1, 3]) == [1.0, 0.0, 0.0]


def test_reward_functions_load_from_a_module_or_a_file(tmp_path):
    assert rewards.load_reward("kiln.train.rewards:number_sum") is rewards.number_sum
    path = tmp_path / "my_reward.py"
    path.write_text("def longer(prompts, completions, **kw):\n"
                    "    return [float(len(c)) for c in completions]\n")  # fmt: skip
    assert rewards.load_reward(f"{path}:longer")(["p"], ["abc"]) == [3.0]
    for bad, why in [
        ("number_sum", "module:function"),
        ("kiln.nope:f", "cannot import"),
        ("kiln.train.rewards:nope", "no function"),
        (f"{tmp_path}/x.py:f", "no file"),
    ]:
        with pytest.raises(InputError, match=why):
            rewards.load_reward(bad)
    with pytest.raises(InputError, match="one of --reward"):
        rewards.make_reward(None, None)


def _greedy_engine(toy):
    tok = kiln.load_tokenizer(toy)
    cfg = RolloutConfig(num_generations=2, max_completion_length=6, temperature=1.0)
    return tok, RolloutEngine(str(toy), tok, cfg, "cpu")


@pytest.mark.parametrize("lora", [False, True])
def test_engine_samples_from_the_synced_policy_with_its_logprobs(toy, lora):
    tok, engine = _greedy_engine(toy)
    policy = kiln.load_model(toy, device="cpu")
    if lora:
        apply_lora(policy, LoraConfig(r=4))
    with torch.no_grad():  # the policy moves away from the weights the engine started from
        for name, p in policy.named_parameters():
            if lora == ("lora_" in name):
                p.add_(0.3 * torch.randn_like(p))
    prompts = load_prompts(tok, DEFAULT_DATA, 32)[:4]
    engine.sync(policy)
    samples = engine.sample(prompts)
    assert [s.prompt for s in samples] == [p for p in prompts for _ in range(2)]
    batch = sample_batch(samples, tok.pad_token_id)
    with torch.no_grad():
        logps, _ = token_logps(policy(batch["input_ids"], batch["positions"]), batch["labels"])
    # the engine sampled from the synced weights: its log-probabilities are the policy's
    assert logprob_gap(logps, batch) < 1e-4
    assert ((batch["labels"] != IGNORE).sum(1) == batch["completion_lengths"]).all()


def test_rollout_batches_reuse_a_rollout_for_its_passes_then_make_the_next():
    made = []

    def make(r):
        made.append(r)
        ids = torch.arange(8)[:, None].repeat(1, 5)
        return {"input_ids": ids, "seq_lengths": torch.full((8,), 5), "rollout": r}

    batches = RolloutBatches(make, micro_batches=2, epochs=3, seed=0)
    rows = [batches(i)["input_ids"][:, 0].tolist() for i in range(6)]
    assert made == [0]
    for epoch in range(3):  # each pass visits every row once
        assert sorted(rows[2 * epoch] + rows[2 * epoch + 1]) == list(range(8))
    assert batches(6)["rollout"] == 1 and made == [0, 1]


def _log(out):
    return [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]


def test_grpo_raises_the_count_reward_of_a_random_model(toy, tmp_path):
    out = tmp_path / "grpo"
    args = ["grpo", "--model", str(toy), "--out", str(out), "--max-steps", "25"]
    args += ["--batch-size", "128", "--num-generations", "8", "--max-completion-length", "1"]
    args += ["--lr", "2e-2", "--warmup-steps", "2"]
    assert kiln_main(args) == 0
    log = [r for r in _log(out) if "reward" in r]
    assert len(log) == 25 and {"kl", "entropy", "completion_length", "loss"} <= set(log[-1])
    start, end = log[0]["reward"], sum(r["reward"] for r in log[-5:]) / 5
    assert start < 0.15 and end > 0.4, (start, end)
    assert (out / "run" / "rl.png").stat().st_size > 0
    trained = kiln.LLM(str(out), device="cpu")  # the export is the trained policy
    prompts = [json.loads(line)["prompt"] for line in open(DEFAULT_DATA)][:32]
    outs = trained.generate(prompts, kiln.SamplingParams(temperature=0, max_tokens=1))
    greedy = rewards.count_continues(prompts, [o.outputs[0].text for o in outs])
    assert sum(greedy) / len(greedy) > 0.5


def test_grpo_refuses_a_rollout_of_partial_groups(toy, tmp_path, capsys):
    args = ["grpo", "--model", str(toy), "--out", str(tmp_path / "o"), "--batch-size", "6"]
    args += ["--num-generations", "4", "--max-completion-length", "1", "--max-steps", "1"]
    assert kiln_main(args) == 2
    assert "not a whole number of groups of 4" in capsys.readouterr().err


def test_grpo_takes_a_reward_function_from_a_file(toy, tmp_path):
    data = tmp_path / "sum.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    fn = tmp_path / "checks.py"
    fn.write_text(
        textwrap.dedent("""
        from kiln.train.rewards import unit_test

        @unit_test
        def is_answer(completion, answer):
            assert completion.strip() == answer
    """)
    )
    out = tmp_path / "out"
    args = ["grpo", "--model", str(toy), "--out", str(out), "--data", str(data)]
    args += ["--reward", f"{fn}:is_answer", "--batch-size", "4", "--num-generations", "4"]
    args += ["--max-completion-length", "2", "--max-steps", "2", "--beta", "0"]
    assert kiln_main(args) == 0
    assert all(0 <= r["reward"] <= 1 for r in _log(out) if "reward" in r)
