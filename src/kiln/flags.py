"""Command-line flags from a config dataclass, so that a default lives only in the dataclass.

One --flag per field, dashes for underscores (max_num_seqs -> --max-num-seqs), its help and
allowed values from the field's metadata ("help", "choices"). Every flag defaults to None: a flag
left out is not passed on (`flags_given`) and the field keeps its default. EngineConfig's fields
become `kiln serve`'s and `kiln bench offline`'s flags; TrainConfig's (and its kin's) those of
`kiln pretrain`, `kiln sft` and `kiln dpo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


TYPES = {"int": int, "float": float, "str": str, "dict": _json_object}


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    skip: tuple[str, ...] = (),
    config_keys: bool = False,
) -> None:
    """Add a flag for each field of the dataclass `cls` not in `skip`, in a group named `title`.

    Booleans take --x / --no-x. With config_keys a flag is also spelled as the field's key in a
    TOML config, --max_steps 100, and booleans take a value too, --fsdp true (`kiln pretrain`'s
    spelling, like its --set train.max_steps=100).
    """
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
        names = [flag, "--" + f.name] if config_keys and "_" in f.name else [flag]
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})".strip()
        kind = base_type(f)
        if kind == "bool" and config_keys:
            group.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True, default=None,
                               metavar="BOOL", help=help_)  # fmt: skip
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                               default=None, help=f"--{flag[2:]} false")  # fmt: skip
        elif kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_)  # fmt: skip
        else:
            choices = f.metadata.get("choices")
            short = config_keys and not choices  # one word after each of the two spellings
            metavar = "JSON" if kind == "dict" else kind.upper() if short else None
            group.add_argument(*names, dest=f.name, type=TYPES[kind], default=None, choices=choices,
                               metavar=metavar, help=help_)  # fmt: skip


def flags_given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that a parsed namespace sets (a flag left out keeps the default)."""
    given = vars(args)
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if given.get(f.name) is not None}


def base_type(f: dataclasses.Field) -> str:
    """A field's type name without None: "int" for `int | None`."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return next(t.strip() for t in kind.split("|") if t.strip() != "None")


def _bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text == "true"
