"""Engine flags come from EngineConfig's fields: every option is reachable from `kiln serve`
and `kiln bench offline`, and a default lives only in the dataclass."""

from dataclasses import fields

import pytest

from kiln.cli import build_parser
from kiln.engine.config import EngineConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_engine_option_is_a_serve_flag_and_unset_flags_keep_the_defaults():
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m"])
    assert EngineConfig.args_from(args) == {}  # nothing passed: EngineConfig's defaults rule
    argv = ["serve", "--model", "m"]
    expected = {}
    for f in fields(EngineConfig):
        if "bool" in str(f.type):
            argv.append("--no-" + _flag(f.name)[2:])
            expected[f.name] = False
        elif "choices" in f.metadata:  # attention_backend, kv_cache_dtype, kv_eviction
            value = f.metadata["choices"][1]
            argv += [_flag(f.name), value]
            expected[f.name] = value
        else:
            value = 0.5 if "float" in str(f.type) else 7
            argv += [_flag(f.name), str(value)]
            expected[f.name] = value
    assert EngineConfig.args_from(parser.parse_args(argv)) == expected


def test_bench_offline_takes_the_engine_flags_too():
    args = build_parser().parse_args(
        ["bench", "offline", "--model", "m", "--max-num-seqs", "3", "--no-use-cuda-graph"]
    )
    assert EngineConfig.args_from(args) == {"max_num_seqs": 3, "use_cuda_graph": False}


def test_a_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--attention-backend", "cuda"])
    assert "invalid choice" in capsys.readouterr().err
