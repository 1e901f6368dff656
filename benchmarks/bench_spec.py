"""Speculative decoding against plain decoding: tokens/s and acceptance, one table.

Workloads (greedy unless --temperature, ignore_eos, the same new-token count everywhere):
- heldout: batch 1, passages of the held-out corpus text as prompts (text the models were
  not trained on), one request at a time;
- rewrite: batch 1, a repetitive workload in the spirit of "rewrite this passage with small
  edits": a passage, a blank line, then the passage's first quarter again, so that the model
  continues by copying (what prompt lookup is for);
- batch N (--batch, 64 by default): N held-out prompts at once, where speculation must switch
  itself off (disable_by_batch_size) and be no slower than plain decoding.
--sweep B1 B2 ... adds plain vs speculative tokens/s at those batch sizes with the switch-off
disabled, to find the batch size where speculation stops paying (the default of
disable_by_batch_size, kiln.engine.spec_decode.config).

    # GPU: a kiln-trained target, draft model and heads (benchmarks/train_spec_models.sh)
    PYTHONPATH=src python benchmarks/bench_spec.py --model TARGET --draft DRAFT \
        --medusa MEDUSA --eagle EAGLE --early-exit EXIT [--exit-layer N] --device cuda
    # CPU smoke test: tiny random models and untrained heads built on the fly (the target
    # drafts for itself)
    PYTHONPATH=src python benchmarks/bench_spec.py --tiny

Methods: plain, ngram, draft_model (--draft), medusa / eagle (--medusa, --eagle: directories
of `kiln train-draft`), early_exit (--early-exit DIR, and/or --exit-layer N: without a
directory the target's own norm and LM head read layer N's output).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from kiln.engine import LLM, SamplingParams

CORPUS = Path(__file__).resolve().parents[1] / "src/kiln/data/shakespeare"
HELDOUT = "winters_tale_gut.txt"  # left out of benchmarks/train_spec_models.sh


def build_tiny(out: Path) -> Path:
    """A small random llama (4 layers, hidden 128, vocab 512) for the CPU smoke test."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    return out


def build_tiny_heads(model: str, out: Path) -> dict[str, str]:
    """Untrained Medusa, EAGLE and early-exit drafts of the tiny target (they run, rarely
    right)."""
    from kiln.engine.spec_decode.heads import EagleDraft, EarlyExitHead, MedusaHeads, save_draft
    from kiln.model.loader import load_model

    config = load_model(model, device="cpu").config
    heads = {
        "medusa": MedusaHeads(config.hidden_size, 4),
        "eagle": EagleDraft(config),
        "early_exit": EarlyExitHead(config, config.num_layers // 2),
    }
    return {name: str(save_draft(out / name, head, config)) for name, head in heads.items()}


def spec_methods(args) -> dict[str, dict | None]:
    """Each method the command line names -> its speculative_config (plain: None)."""
    k = args.k
    methods = {
        "plain": None,
        "ngram": dict(method="ngram", num_speculative_tokens=args.ngram_k or k),
    }
    if args.draft:
        methods["draft_model"] = dict(model=args.draft, num_speculative_tokens=k)
    for name in ("medusa", "eagle"):
        if getattr(args, name):
            methods[name] = dict(method=name, model=getattr(args, name), num_speculative_tokens=k)
    if args.early_exit or args.exit_layer:
        spec = dict(method="early_exit", model=args.early_exit, exit_layer=args.exit_layer,
                    num_speculative_tokens=k)  # fmt: skip
        methods["early_exit"] = {key: v for key, v in spec.items() if v is not None}
    return methods


def passages(tokenizer, vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` tokens: held-out corpus passages (random ids without a
    tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    if tokenizer is None:
        return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]
    path = CORPUS / HELDOUT
    if not path.is_file():
        path = sorted(CORPUS.glob("*.txt"))[-1]
    ids = tokenizer.encode(path.read_text(), add_special_tokens=False)
    starts = torch.randint(0, len(ids) - length, (n,), generator=g).tolist()
    return [ids[s : s + length] for s in starts]


def rewrite_prompts(prompts: list[list[int]], sep: list[int]) -> list[list[int]]:
    """Each passage, a separator, then its first quarter again (the model goes on copying)."""
    return [p + sep + p[: len(p) // 4] for p in prompts]


def measure(llm: LLM, prompts, params: SamplingParams, batch: int) -> tuple[float, dict, dict]:
    """(output tokens/s, the engine's stats before, after): batch 1 runs the prompts one by
    one, a larger batch all at once."""
    before = llm.engine.stats()
    start = time.perf_counter()
    if batch == 1:
        outs = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0] for p in prompts]
    else:
        outs = llm.generate(prompt_token_ids=prompts[:batch], sampling_params=params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / elapsed, before, llm.engine.stats()


def acceptance(before: dict, after: dict) -> tuple[str, str]:
    """(mean acceptance length, acceptance rate) between two stats, as table cells."""
    if "spec_decode_num_drafts" not in after:
        return "-", "-"

    def grown(key: str) -> int:
        return after[key] - before[key]

    drafts = grown("spec_decode_num_drafts")
    if not drafts:
        return "off", "off"
    accepted = grown("spec_decode_num_accepted_tokens")
    rate = accepted / grown("spec_decode_num_draft_tokens")
    return f"{1 + accepted / drafts:.2f}", f"{rate:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="target model directory")
    ap.add_argument("--draft", help="draft model directory (same tokenizer)")
    ap.add_argument("--medusa", metavar="DIR", help="Medusa heads (kiln train-draft)")
    ap.add_argument("--eagle", metavar="DIR", help="EAGLE draft (kiln train-draft)")
    ap.add_argument("--early-exit", metavar="DIR", help="early-exit head (kiln train-draft)")
    ap.add_argument(
        "--exit-layer", type=int, help="early exit after N layers (alone: the target's own head)"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--ngram-k", type=int, default=None, help="k for ngram (default --k)")
    ap.add_argument("--prompts", type=int, default=8, help="batch-1 prompts per workload")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--sweep", type=int, nargs="*", default=[], help="batch sizes to sweep")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        args.model = str(build_tiny(Path(tmp.name) / "tiny"))
        args.draft = args.draft or args.model
        heads = build_tiny_heads(args.model, Path(tmp.name))
        args.medusa, args.eagle = args.medusa or heads["medusa"], args.eagle or heads["eagle"]
        args.early_exit = args.early_exit or heads["early_exit"]
        args.prompt_len, args.new_tokens = min(args.prompt_len, 64), min(args.new_tokens, 32)
        args.prompts, args.batch = min(args.prompts, 3), min(args.batch, 8)
    if args.model is None:
        ap.error("give --model (and --draft), or --tiny")
    methods = spec_methods(args)
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.new_tokens, ignore_eos=True
    )
    rows = []
    heldout = rewrite = wide = None
    for name, spec in methods.items():
        engine_args = {"speculative_config": spec} if spec else {}
        llm = LLM(args.model, dtype=args.dtype, device=args.device, **engine_args)
        if heldout is None:
            vocab = llm.engine.model_config.vocab_size
            n = max(args.prompts, args.batch, *args.sweep)
            wide = passages(llm.tokenizer, vocab, n, args.prompt_len)
            heldout = wide[: args.prompts]
            sep = llm.tokenizer.encode("\n\n", add_special_tokens=False) if llm.tokenizer else [3]
            rewrite = rewrite_prompts(heldout, sep)
        measure(llm, heldout[:1], params, 1)  # warm up (kernels, graphs)
        work = [("heldout", heldout, 1), ("rewrite", rewrite, 1)]
        for workload, prompts, batch in [*work, (f"batch {args.batch}", wide, args.batch)]:
            rate, before, after = measure(llm, prompts, params, batch)
            rows.append((workload, name, rate, *acceptance(before, after)))
            print(f"{workload:>10} {name:>12}: {rate:9.1f} tok/s", flush=True)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for name, spec in methods.items():  # where speculation stops paying (switch-off off)
        if not args.sweep:
            break
        config = dict(spec, disable_by_batch_size=10**6) if spec else None
        llm = LLM(args.model, dtype=args.dtype, device=args.device,
                  **({"speculative_config": config} if config else {}))  # fmt: skip
        measure(llm, wide[:2], params, 2)
        for b in args.sweep:
            rate, before, after = measure(llm, wide, params, b)
            rows.append((f"sweep batch {b}", name, rate, *acceptance(before, after)))
        del llm
        gc.collect()
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows, args) -> None:
    plain = {w: r for w, m, r, *_ in rows if m == "plain"}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nspeculative decoding, {args.model}, k={args.k}, {args.new_tokens} new tokens, "
          f"temperature {args.temperature}, {device}")  # fmt: skip
    for name, spec in spec_methods(args).items():
        if spec:
            print(f"- {name}: {json.dumps(spec)}")
    print("| workload | method | tok/s | vs plain | mean acceptance length | acceptance rate |")
    print("|---|---|---|---|---|---|")
    for workload, method, rate, length, acc in rows:
        base = plain.get(workload)
        speedup = f"{rate / base:.2f}x" if base else "-"
        print(f"| {workload} | {method} | {rate:.1f} | {speedup} | {length} | {acc} |")


if __name__ == "__main__":
    main()
