"""kiln.flags: a config dataclass's fields as command-line flags, a default only in the
dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from kiln.flags import add_flags, flags_given


@dataclass
class Knobs:
    max_steps: int = field(default=10, metadata={"help": "steps"})
    lr: float | None = None
    backend: str = field(default="auto", metadata={"choices": ["auto", "torch"]})
    use_graph: bool = True


def _parser(config_keys: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, Knobs, "knobs", config_keys=config_keys)
    return parser


def _given(argv: list[str], config_keys: bool = False) -> dict:
    return flags_given(Knobs, _parser(config_keys).parse_args(argv))


def test_a_flag_left_out_is_not_given_and_one_set_is_typed():
    assert _given([]) == {}
    argv = ["--max-steps", "3", "--lr", "1e-3", "--backend", "torch", "--no-use-graph"]
    assert _given(argv) == {"max_steps": 3, "lr": 1e-3, "backend": "torch", "use_graph": False}
    assert _given(["--use-graph"]) == {"use_graph": True}


def test_help_comes_from_the_field_metadata_and_default():
    assert "steps (default: 10)" in " ".join(_parser().format_help().split())


@pytest.mark.parametrize(
    "argv, config_keys",
    [
        (["--backend", "cuda"], False),
        (["--max-steps", "many"], False),
        (["--use-graph", "true"], False),  # a value only with config_keys
        (["--use-graph", "yes"], True),
    ],
)
def test_bad_values_are_refused_by_the_parser(argv, config_keys, capsys):
    with pytest.raises(SystemExit):
        _parser(config_keys).parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, given",
    [
        (["--max_steps", "3"], {"max_steps": 3}),
        (["--max-steps", "3"], {"max_steps": 3}),
        (["--use_graph", "false"], {"use_graph": False}),
        (["--use-graph", "true"], {"use_graph": True}),
        (["--use-graph"], {"use_graph": True}),
        (["--no-use-graph"], {"use_graph": False}),
    ],
)
def test_config_keys_spell_each_flag_as_its_toml_key_too(argv, given):
    assert _given(argv, config_keys=True) == given


def test_the_verb_table_matches_what_each_module_registers():
    """kiln --help lists verbs from kiln.cli.COMMANDS without importing their modules: the table's
    module and help for each verb must be what that module really registers."""
    import importlib

    from kiln.cli import COMMANDS

    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        helps = {a.dest: a.help for a in sub._choices_actions}
        table = {verb: help_ for verb, (m, help_) in COMMANDS.items() if m == module}
        assert helps == table, module


def test_kiln_help_and_a_light_verb_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, kiln.cli\n"
        "for argv in ([], ['tokenizer']):\n"
        "    kiln.cli.build_parser(argv)\n"
        "assert 'torch' not in sys.modules, 'kiln --help imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lora_flags_come_from_lora_config():
    from kiln.config import LoraConfig
    from kiln.errors import InputError
    from kiln.train.finetune import add_lora_arguments, lora_config_from_args

    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    assert lora_config_from_args(parser.parse_args([])) is None  # a full fine-tune
    cfg = lora_config_from_args(
        parser.parse_args(["--lora-r", "4", "--target-modules", "q_proj,v_proj"])
    )
    assert cfg == LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"])
    with pytest.raises(InputError, match="--lora-alpha needs --lora-r"):
        lora_config_from_args(parser.parse_args(["--lora-alpha", "4"]))
