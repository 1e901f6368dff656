"""Which grammar library kiln's constrained decoding uses: xgrammar vs llguidance, measured.

For a JSON schema, on a small tokenizer and a real-size one (a byte-level BPE trained here on
the bundled corpus; no hub): the compile time of the schema (cold: a fresh compiler, so the
tokenizer's own preprocessing is timed apart) and the time to fill one row's token bitmask and
advance by one token, averaged over the tokens of a valid instance.

    python benchmarks/bench_grammar_libs.py [--vocab 32000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
}  # fmt: skip
INSTANCE = {
    "name": "Horatio of Wittenberg",
    "age": 31,
    "email": "horatio@elsinore.dk",
    "tags": ["friend", "scholar", "witness"],
    "address": {"street": "The platform before the castle", "city": "Elsinore", "zip": "01234"},
    "role": "guest",
}
ROOT = Path(__file__).resolve().parents[1]


def train_tokenizer(vocab: int, out: Path):
    """A byte-level BPE of up to `vocab` tokens on the bundled Shakespeare corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(str(p) for p in (ROOT / "data/shakespeare").glob("*.txt"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train(files, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(out)
    return hf


def bench_xgrammar(hf, ids: list[int], schema: str) -> tuple[float, float, float]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(schema)
    t2 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for t in ids:
        s = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        assert matcher.accept_token(t), "xgrammar refused a token of a valid instance"
        times.append(time.perf_counter() - s)
    assert matcher.is_terminated() or matcher.accept_token(hf.eos_token_id)
    return t1 - t0, t2 - t1, statistics.mean(times)


def bench_llguidance(hf, ids: list[int], schema: str) -> tuple[float, float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    t2 = time.perf_counter()
    mask = llguidance.torch.allocate_token_bitmask(1, len(hf))
    times = []
    for t in ids:
        s = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        assert matcher.consume_token(t), "llguidance refused a token of a valid instance"
        times.append(time.perf_counter() - s)
    return t1 - t0, t2 - t1, statistics.mean(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000, help="the real-size tokenizer's vocab")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (the median is shown)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    schema = json.dumps(SCHEMA)
    text = json.dumps(INSTANCE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in (384, args.vocab):
            hf = train_tokenizer(vocab, Path(tmp) / str(vocab))
            ids = hf.encode(text, add_special_tokens=False)
            for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
                runs = [fn(hf, ids, schema) for _ in range(args.repeat)]
                prep, comp, mask = (statistics.median(r[i] for r in runs) for i in range(3))
                rows.append((name, len(hf), len(ids), prep * 1e3, comp * 1e3, mask * 1e6))
    print(f"JSON schema ({len(schema)} chars), instance {len(text)} chars; median of "
          f"{args.repeat}; one CPU thread\n")  # fmt: skip
    print(f"{'library':<11} {'vocab':>7} {'tokens':>6} {'tokenizer prep ms':>17} "
          f"{'compile ms':>10} {'mask+advance us/token':>21}")  # fmt: skip
    for name, vocab, n, prep, comp, mask in rows:
        print(f"{name:<11} {vocab:>7} {n:>6} {prep:>17.1f} {comp:>10.2f} {mask:>21.1f}")


if __name__ == "__main__":
    main()
