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
