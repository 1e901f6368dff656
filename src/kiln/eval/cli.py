"""`kiln eval <ppl|mc|gen|judge>`: evaluate a model directory (in process) or an
OpenAI-compatible server (--base-url) on tasks that are plain data files (kiln.eval.tasks).

Every verb prints a table, and with --json FILE writes one JSON object a line per task
({"task": ..., metrics ...}); --plot FILE saves a bar chart of the tasks' headline metrics.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HEADLINE = {"ppl": "bits_per_byte", "mc": "acc", "gen": None, "judge": "win_rate"}


def _source_args(p: argparse.ArgumentParser, engine: bool = True) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (in process)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server instead")
    p.add_argument("--served-model", default=None, help="the server's model name (default: first)")
    p.add_argument("--tokenizer", default=None, help="with --base-url: tokenizer directory "
                   "(default: the server's /tokenize)")  # fmt: skip
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    if engine:
        from kiln.engine.config import EngineConfig

        EngineConfig.add_arguments(p)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="FILE", help="one JSON object a task per line")
    p.add_argument("--plot", default=None, metavar="FILE", help="bar chart of the results (PNG)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, generation, "
                       "LLM-as-judge")  # fmt: skip
    verbs = p.add_subparsers(dest="eval_command", required=True, metavar="KIND")

    ppl = verbs.add_parser("ppl", help="perplexity and bits per byte of a text (sliding window)")
    _source_args(ppl, engine=False)
    ppl.add_argument("--text", required=True, help="UTF-8 text file to score")
    ppl.add_argument(
        "--max-len", type=int, default=None, help="window length (default min(1024, context))"
    )
    ppl.add_argument(
        "--stride", type=int, default=None, help="window step (default min(512, max_len // 2))"
    )
    _output_args(ppl)
    ppl.set_defaults(func=_ppl_cli)

    mc = verbs.add_parser("mc", help="multiple choice by log-likelihood (acc, acc_norm)")
    mc.add_argument("--task", action="append", default=None,
                    help="task file (.jsonl/.csv: context, choices, answer) or bundled name; "
                    "repeatable (default: shakespeare_next_line)")  # fmt: skip
    _source_args(mc)
    _output_args(mc)
    mc.set_defaults(func=_mc_cli)

    gen = verbs.add_parser("gen", help="greedy generation: exact match, BLEU, ROUGE-L")
    gen.add_argument("--task", action="append", default=None,
                     help="task file (.jsonl/.csv: prompt, target) or bundled name; repeatable "
                     "(default: shakespeare_quotes and shakespeare_continue)")  # fmt: skip
    gen.add_argument("--metrics", default=None, help="comma-separated of exact_match, bleu, "
                     "rouge_l (default: a bundled task's own, else exact_match)")  # fmt: skip
    gen.add_argument("--regex", default=None, help="exact match compares the first match of "
                     "this regex (its group 1 if any) in output and target")  # fmt: skip
    gen.add_argument("--max-tokens", type=int, default=None, help="default 16 (bundled: own)")
    gen.add_argument("--stop", action="append", default=None, help="stop string (default \\n\\n)")
    _source_args(gen)
    _output_args(gen)
    gen.set_defaults(func=_gen_cli)

    judge = verbs.add_parser("judge", help="pairwise LLM-as-judge: A's win rate over B")
    judge.add_argument("--task", default="shakespeare_continue",
                       help="prompts (.jsonl/.csv with prompt; answer_a/answer_b if already "
                       "answered) or a bundled task name")  # fmt: skip
    judge.add_argument("--a", default=None, help="model A: a model directory or server URL")
    judge.add_argument("--b", default=None, help="model B: a model directory or server URL")
    judge.add_argument("--judge-url", required=True, help="the judge's OpenAI-compatible server")
    judge.add_argument("--judge-model", default=None, help="judge model name (default: first)")
    judge.add_argument("--judge-api-key", default=None, help="default: $OPENAI_API_KEY")
    judge.add_argument("--max-tokens", type=int, default=64, help="answer length")
    judge.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    judge.add_argument("--device", default=None)
    _output_args(judge)
    judge.set_defaults(func=_judge_cli)


def _examples(task: str, kind: str, limit: int | None):
    from kiln.eval import tasks

    name, path, bundled = tasks.resolve(task, kind)
    rows = tasks.load(path, kind)
    return name, rows[:limit] if limit else rows, bundled


def _ppl_cli(args: argparse.Namespace) -> None:
    from kiln.errors import InputError
    from kiln.eval.ppl import check_window, default_stride

    text_file = Path(args.text)
    if not text_file.is_file():
        raise InputError(f"--text {args.text!r}: no such file")
    text = text_file.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"--text {args.text!r} is empty")
    if args.base_url:
        from kiln.eval.backends import OpenAIBackend
        from kiln.eval.score import run_ppl

        b = OpenAIBackend(args.base_url, args.served_model, args.tokenizer)
        context = b.max_len
    else:
        from kiln.config import ModelConfig

        if args.model is None:
            raise InputError("give --model DIR or --base-url URL")
        # Check the window against the model's context before loading any weights.
        context = ModelConfig.from_dir(Path(args.model)).max_position_embeddings
    max_len = min(1024, context) if args.max_len is None else args.max_len
    stride = default_stride(max_len) if args.stride is None else args.stride
    check_window(max_len, stride, context)
    if args.base_url:
        r = run_ppl(b, text, max_len, stride)
    else:
        from kiln.eval.ppl import perplexity
        from kiln.eval.score import ppl_result
        from kiln.model.loader import load_model
        from kiln.tokenizer.hf import load_tokenizer

        ids = load_tokenizer(args.model).encode(text)
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        p = perplexity(model, ids, max_len=max_len, stride=stride)
        r = ppl_result(p["nll"] * p["tokens"], p["tokens"], text)
    _report([{"task": "ppl", **r}], args, "ppl")


def _mc_cli(args: argparse.Namespace) -> None:
    from kiln.eval.backends import backend
    from kiln.eval.score import run_mc

    todo = [_examples(t, "mc", args.limit) for t in args.task or ["shakespeare_next_line"]]
    b = backend(args)
    results = []
    for name, rows, _ in todo:
        r = run_mc(b, rows)
        r.pop("loglikelihoods")
        results.append({"task": name, **r})
    _report(results, args, "mc")


def _gen_cli(args: argparse.Namespace) -> None:
    from kiln.errors import InputError
    from kiln.eval.backends import backend
    from kiln.eval.score import METRICS, run_gen

    metrics = args.metrics.split(",") if args.metrics else None
    for m in metrics or ():
        if m not in METRICS:
            raise InputError(f"--metrics: unknown metric {m!r} (one of {', '.join(METRICS)})")
    names = args.task or ["shakespeare_quotes", "shakespeare_continue"]
    todo = [_examples(t, "gen", args.limit) for t in names]
    b = backend(args)
    results = []
    for name, rows, bundled in todo:
        r = run_gen(
            b, rows,
            metrics=metrics or (bundled.metrics if bundled else ("exact_match",)),
            max_tokens=args.max_tokens or (bundled.max_tokens if bundled else 16),
            stop=args.stop or ["\n\n"],
            regex=args.regex or (bundled.regex if bundled else None),
        )  # fmt: skip
        r.pop("outputs")
        results.append({"task": name, **r})
    _report(results, args, "gen")


def _judge_cli(args: argparse.Namespace) -> None:
    from kiln.errors import InputError
    from kiln.eval import tasks
    from kiln.eval.backends import LocalBackend, OpenAIBackend
    from kiln.eval.judge import Judge, run_judge

    if args.task in tasks.BUNDLED:
        name, path = args.task, tasks.BUNDLED_DIR / tasks.BUNDLED[args.task].file
    else:
        name, path, _ = tasks.resolve(args.task, "judge")
    rows = tasks.load(path, "judge")[: args.limit]
    prompts = [r["prompt"] for r in rows]
    answers = {}
    for side in ("a", "b"):
        src = getattr(args, side)
        if src is None:
            if any(f"answer_{side}" not in r for r in rows):
                raise InputError(f"give --{side} (a model directory or URL), or answer_{side} "
                                 "in every line of the task file")  # fmt: skip
            answers[side] = [str(r[f"answer_{side}"]) for r in rows]
            continue
        if src.startswith(("http://", "https://")):
            b = OpenAIBackend(src)
        else:
            b = LocalBackend(src, args.dtype, args.device)
        answers[side] = [o.strip() for o in b.generate(prompts, args.max_tokens, ["\n\n"])]
        del b
    judge = Judge(args.judge_url, args.judge_model, args.judge_api_key)
    r = run_judge(judge, prompts, answers["a"], answers["b"])
    _report([{"task": name, **r}], args, "judge")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _report(results: list[dict], args: argparse.Namespace, kind: str) -> None:
    """Print a table; write --json (one object a line) and --plot (bar chart)."""
    keys = list(dict.fromkeys(k for r in results for k in r))
    keys.sort(key=lambda k: (k != "task", k in ("examples", "skipped", "tokens")))
    rows = [[_fmt(r.get(k, "")) for k in keys] for r in results]
    widths = [max(len(k), *(len(row[i]) for row in rows)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results))
    if args.plot:
        plot(results, args.plot, kind)


def plot(results: list[dict], path: str, kind: str) -> None:
    """One bar per (task, metric) of the results' numeric metrics that share a scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"examples", "skipped", "tokens", "wins", "ties", "losses", "inconsistent",
            "unparsed", "perplexity", "ci_low", "ci_high"}  # fmt: skip
    labels, values, errs = [], [], []
    for r in results:
        for k, v in r.items():
            if k != "task" and k not in skip and isinstance(v, int | float):
                labels.append(f"{r['task']}\n{'bleu/100' if k == 'bleu' else k}")
                values.append(v / 100 if k == "bleu" else v)
                errs.append((v - r["ci_low"], r["ci_high"] - v) if k == "win_rate" else (0, 0))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(labels)), 3.5))
    ax.bar(range(len(values)), values, yerr=list(zip(*errs)) if errs else None, capsize=4)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_title(f"kiln eval {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
