"""The training CLIs' flags come from TrainConfig's fields (FinetuneConfig's and the loss
configs' for `kiln sft`, `kiln dpo` and the alignment verbs): every field is a flag of each
verb, a flag left out keeps the dataclass default, and fine-tuning's own defaults live in
FinetuneConfig alone."""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import pytest

from kiln.cli import build_parser
from kiln.flags import flags_given
from kiln.train import finetune
from kiln.train.config import (
    DPOConfig,
    FinetuneConfig,
    GRPOConfig,
    KTOConfig,
    PPOConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
)
from kiln.train.pretrain import config_from_args

FINETUNE = ["--model", "m", "--out", "out"]
VERBS = {
    "pretrain": [],
    **dict.fromkeys(["sft", "dpo", "kto", "reward", "grpo", "ppo", "rft"], FINETUNE),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def effective(verb: str, argv: list[str]) -> TrainConfig:
    """The TrainConfig `kiln VERB ARGV` would train with."""
    args = build_parser().parse_args([verb, *VERBS[verb], *argv])
    return config_from_args(args).train if verb == "pretrain" else finetune.train_config(args)


def every_field_set() -> tuple[list[str], dict]:
    """A command line that sets each TrainConfig field to a value unlike its defaults."""
    argv, expected = [], {}
    for i, f in enumerate(fields(TrainConfig)):
        kind = str(f.type)
        if kind == "bool":
            argv.append(_flag(f.name) if not f.default else "--no-" + _flag(f.name)[2:])
            expected[f.name] = not f.default
            continue
        if "choices" in f.metadata:
            value = next(c for c in f.metadata["choices"] if c != f.default)
        else:
            value = {"int": 1000 + i, "float": 0.001 * (i + 1), "str": f"x{i}"}[kind]
        argv += [_flag(f.name), str(value)]
        expected[f.name] = value
    return argv, expected


@pytest.mark.parametrize("verb", VERBS)
def test_every_train_config_field_is_a_flag_of_each_training_cli(verb):
    argv, expected = every_field_set()
    assert dataclasses.asdict(effective(verb, argv)) == expected


@pytest.mark.parametrize("verb", VERBS)
def test_a_flag_left_out_keeps_the_dataclass_default(verb):
    args = build_parser().parse_args([verb, *VERBS[verb]])
    assert {f.name: getattr(args, f.name) for f in fields(TrainConfig)} == {
        f.name: None for f in fields(TrainConfig)
    }  # no default in argparse: the dataclass fills it in
    if verb == "pretrain":
        assert effective(verb, []) == TrainConfig()
    else:
        assert effective(verb, []) == FinetuneConfig().resolve("out", lora=False)
        assert effective(verb, ["--lora-r", "8"]) == FinetuneConfig().resolve("out", lora=True)


def test_finetune_defaults_differ_from_pretraining_and_come_from_finetune_config(monkeypatch):
    sft = effective("sft", [])
    assert (sft.warmup_steps, sft.weight_decay) == (10, 0.0)
    assert (TrainConfig.warmup_steps, TrainConfig.weight_decay) == (100, 0.1)
    assert (sft.lr, sft.min_lr, sft.ckpt_interval, sft.out_dir) == (2e-5, 2e-5 / 10, 200, "out/run")

    @dataclasses.dataclass
    class Retuned(FinetuneConfig):
        warmup_steps: int = 7
        weight_decay: float = 0.25

    monkeypatch.setattr(finetune, "FinetuneConfig", Retuned)
    for verb in VERBS.keys() - {"pretrain"}:
        cfg = effective(verb, [])
        assert (cfg.warmup_steps, cfg.weight_decay) == (7, 0.25)
        assert effective(verb, ["--warmup-steps", "3"]).warmup_steps == 3


def test_dpo_loss_flags_come_from_dpo_config():
    def dpo_config(argv):
        return DPOConfig(**flags_given(DPOConfig, build_parser().parse_args(["dpo", *argv])))

    assert dpo_config(FINETUNE) == DPOConfig()
    argv = [*FINETUNE, "--beta", "0.5", "--loss-type", "ipo"]
    assert dpo_config(argv) == DPOConfig(beta=0.5, loss_type="ipo")


def test_pretrain_flags_sit_over_the_config_file_and_keep_their_toml_key_spelling(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nnum_layers = 3\n[train]\nmax_steps = 5\nlr = 1e-2\nfsdp = true\n")
    argv = ["pretrain", "--config", str(path), "--set", "train.lr=1e-3", "--set", "max_steps=6"]
    argv += ["--max_steps", "7", "--fsdp", "false", "--compile", "--tie_word_embeddings", "false"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.model.num_layers, cfg.train.max_steps, cfg.train.lr) == (3, 7, 1e-3)
    assert (cfg.train.fsdp, cfg.train.compile, cfg.model.tie_word_embeddings) == (
        False,
        True,
        False,
    )
    cfg = config_from_args(build_parser().parse_args(["pretrain", "--max-steps", "8", "--fsdp"]))
    assert (cfg.train.max_steps, cfg.train.fsdp) == (8, True)


@pytest.mark.parametrize(
    "verb, cls, argv, want",
    [
        ("grpo", GRPOConfig, ["--beta", "0", "--loss-type", "grpo"],
         {"beta": 0.0, "loss_type": "grpo"}),
        ("ppo", PPOConfig, ["--kl-estimator", "k3", "--whiten-rewards"],
         {"kl_estimator": "k3", "whiten_rewards": True}),
        ("kto", KTOConfig, ["--desirable-weight", "2"], {"desirable_weight": 2.0}),
        ("reward", RewardConfig, ["--center-rewards-coefficient", "0.01"],
         {"center_rewards_coefficient": 0.01}),
        ("grpo", RolloutConfig, ["--num-generations", "4", "--reward", "m:f"],
         {"num_generations": 4, "reward": "m:f"}),
    ],
)  # fmt: skip
def test_alignment_loss_flags_come_from_their_configs(verb, cls, argv, want):
    def config(extra):
        return cls(**flags_given(cls, build_parser().parse_args([verb, *FINETUNE, *extra])))

    assert config([]) == cls()
    assert config(argv) == dataclasses.replace(cls(), **want)
