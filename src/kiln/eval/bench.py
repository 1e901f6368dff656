"""`kiln bench <offline|ablate|serve>`: throughput benchmarks.

`offline` runs nano-vllm's workload through kiln.LLM: N requests of random token ids, input and
output lengths uniform in [min, max], ignore_eos, and prints output tokens/s. On a model whose
context is shorter than the longest request, both ranges shrink by one factor to fit. `ablate`
is kiln.eval.ablate's (each optimization switched off in turn). `serve` is
kiln.serve.bench's (add_arguments(parser), main(args)), imported only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from kiln.engine.config import EngineConfig
from kiln.eval.workload import fit_lengths, offline_workload, run_offline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks (offline engine, serving)")
    verbs = p.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    off = verbs.add_parser("offline", help="offline engine throughput (nano-vllm's workload)")
    off.add_argument("--model", required=True, help="Hugging Face model directory")
    off.add_argument("--num-prompts", type=int, default=256)
    off.add_argument("--input-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    off.add_argument("--output-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    off.add_argument("--temperature", type=float, default=0.6)
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    off.add_argument("--device", default=None)
    off.add_argument(
        "--lockstep",
        action="store_true",
        help="read each step's tokens before scheduling the next (no async scheduling)",
    )
    EngineConfig.add_arguments(off, skip=("async_scheduling",))
    off.set_defaults(func=_offline_cli)
    ablate = verbs.add_parser(
        "ablate", help="each engine optimization switched off in turn: a table of speedups"
    )
    importlib.import_module("kiln.eval.ablate").add_arguments(ablate)
    ablate.set_defaults(func=lambda args: importlib.import_module("kiln.eval.ablate").main(args))
    serve = verbs.add_parser("serve", help="serving benchmark against a running kiln server")
    if importlib.util.find_spec("kiln.serve.bench") is not None:
        importlib.import_module("kiln.serve.bench").add_arguments(serve)
    serve.set_defaults(func=lambda args: importlib.import_module("kiln.serve.bench").main(args))


def _offline_cli(args: argparse.Namespace) -> None:
    from kiln.engine.llm import LLM
    from kiln.errors import InputError

    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            raise InputError(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        **EngineConfig.args_from(args),
        **({"async_scheduling": False} if args.lockstep else {}),
    )
    vocab, context = llm.engine.model_config.vocab_size, llm.engine.max_model_len
    asked = tuple(args.input_len), tuple(args.output_len)
    input_len, output_len = fit_lengths(*asked, context)
    if (input_len, output_len) != asked:
        print(
            f"note: requests of up to {sum(n for _, n in asked)} tokens exceed max_model_len "
            f"{context}: input lengths scaled to U{list(input_len)}, output to U{list(output_len)}"
        )
    workload = offline_workload(args.num_prompts, input_len, output_len, vocab, args.seed)
    # Warm up on mixed prefill/decode steps of several shapes.
    warmup = offline_workload(16, *fit_lengths((16, 200), (4, 16), context), vocab, args.seed + 1)
    run_offline(llm, warmup)
    before = llm.engine.stats()
    r = run_offline(llm, workload, args.temperature)
    print(
        f"{r['requests']} requests, {r['input_tokens']} input / {r['output_tokens']} output "
        f"tokens in {r['seconds']:.2f} s: {r['output_tok_s']:.0f} output tokens/s"
    )
    after = llm.engine.stats()
    if "spec_decode_num_drafts" in after:
        print(spec_decode_summary(after, before))


def spec_decode_summary(after: dict, before: dict | None = None) -> str:
    """One line on speculative decoding's acceptance between two of an engine's stats()."""

    def grown(key: str):
        a, b = after[key], (before or {}).get(key)
        if isinstance(a, list):
            return [x - y for x, y in zip(a, b or [0] * len(a))]
        return a - (b or 0)

    drafts, proposed = grown("spec_decode_num_drafts"), grown("spec_decode_num_draft_tokens")
    accepted = grown("spec_decode_num_accepted_tokens")
    rates = ", ".join(
        f"{n / max(drafts, 1):.2f}" for n in grown("spec_decode_num_accepted_tokens_per_pos")
    )
    return (
        f"speculative decoding: {drafts} drafts, acceptance rate "
        f"{accepted / max(proposed, 1):.3f}, mean acceptance length "
        f"{1 + accepted / max(drafts, 1):.2f}, acceptance by position [{rates}]"
    )
