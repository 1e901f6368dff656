"""The import graph of src/kiln (every import, lazy ones too, read from the AST): no circles,
and no stage imports a stage built on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# What each room may import besides itself (the stages below it). Top-level modules (cli, demo,
# generate) sit above everything and may import anything.
ALLOWED = {
    "kiln.errors": set(),
    "kiln.config": {"kiln.errors"},
    "kiln.flags": set(),  # command-line flags from config dataclasses (engine's and training's)
    "kiln.kernels": {"kiln.errors"},
    "kiln.tokenizer": {"kiln.errors"},
    "kiln.model": {"kiln.errors", "kiln.config", "kiln.kernels"},
    "kiln.engine": {
        "kiln.errors",
        "kiln.config",
        "kiln.flags",
        "kiln.kernels",
        "kiln.model",
        "kiln.tokenizer",
    },
    "kiln.train": {
        "kiln.errors",
        "kiln.config",
        "kiln.flags",
        "kiln.kernels",
        "kiln.model",
        "kiln.tokenizer",
        "kiln.engine",  # RL: the engine samples the rollouts (kiln.train.rollout)
    },
    "kiln.quant": {
        "kiln.errors",
        "kiln.config",
        "kiln.kernels",
        "kiln.model",
        "kiln.tokenizer",
        "kiln.train",  # the bundled corpus is the default calibration text
    },
    # applications over the HTTP API; the server's guardrails middleware runs their checks
    "kiln.apps": {"kiln.errors", "kiln.flags"},
    "kiln.serve": {"kiln.errors", "kiln.config", "kiln.engine", "kiln.tokenizer", "kiln.apps"},
    # the JAX decoder reads checkpoints through kiln's config and name mapping
    "kiln.jax": {"kiln.errors", "kiln.config", "kiln.model"},
    "kiln.eval": {
        "kiln.errors",
        "kiln.config",
        "kiln.model",  # perplexity loads the model itself (no engine: it needs every logit)
        "kiln.tokenizer",
        "kiln.engine",
        "kiln.serve",
    },
}


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in (SRC / "kiln").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def room(module: str) -> str | None:
    return next((r for r in ALLOWED if module == r or module.startswith(r + ".")), None)


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_imports_kiln_jax():
    """kiln.jax is an optional extra: no room of kiln may need JAX to import."""
    users = sorted(
        m
        for m, targets in import_graph().items()
        if room(m) != "kiln.jax" and m != "kiln.cli" and any(room(t) == "kiln.jax" for t in targets)
    )
    assert users == []


def test_no_stage_imports_one_above_it():
    upward = []
    for m, targets in import_graph().items():
        r = room(m)
        if r is None:
            continue
        # the root package itself (kiln/__init__: lazy re-exports by name) is free to import
        upward += [
            f"{m} -> {t}" for t in targets if t != "kiln" and room(t) not in (r, *ALLOWED[r])
        ]
    assert upward == []
