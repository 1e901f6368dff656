"""Structured outputs' cost: decode TPOT with a JSON schema vs unconstrained, and the first
request's grammar compile time.

A random Qwen3-0.6B-shaped model (bfloat16, GPU) with a byte-level BPE trained here on the
bundled corpus (up to the model's 151,936-token vocabulary; no hub). Each batch of B requests
decodes --tokens tokens at temperature 1; the constrained ones must write
{"text": "<string>"} with a string too long to close within them (minLength: every request
runs all its tokens, the batch stays full, and each token is a string character the mask must
allow and the matcher accept). TPOT = (last token - first token) / (tokens - 1) per request,
median over requests and --repeat runs. `--tiny` runs a tiny model on the CPU (checks the script).

    PYTHONPATH=src python benchmarks/bench_structured.py            # H100: about 3 minutes
    PYTHONPATH=src python benchmarks/bench_structured.py --tiny     # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from shapes import QWEN3_0_6B

from kiln.engine import LLM, SamplingParams
from kiln.engine.structured import GrammarCompiler, StructuredOutputsParams, tokenizer_info

ROOT = Path(__file__).resolve().parents[1]


def schema(tokens: int) -> dict:
    text = {"type": "string", "minLength": 64 * tokens}  # no token is 64 characters long
    return {"type": "object", "properties": {"text": text}, "required": ["text"],
            "additionalProperties": False}  # fmt: skip


TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
            max_position_embeddings=512)  # fmt: skip


def build(out: Path, shape: dict, device: str) -> None:
    """A random model of `shape` and a BPE of up to its vocabulary, saved to `out`."""
    import transformers

    config = transformers.Qwen3Config(**shape, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(out)
    train_tokenizer(out, shape["vocab_size"])


def train_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE of up to `vocab_size` tokens trained on the bundled corpus, saved to
    `out` (<s> = 0, </s> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train(sorted(str(p) for p in (ROOT / "data/shakespeare").glob("*.txt")), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
        )
    )


def tpot(llm: LLM, batch: int, tokens: int, structured: bool, seed: int) -> tuple[float, float]:
    """(median TPOT in ms, mean tokens per request) of one batch."""
    spec = StructuredOutputsParams(json=schema(tokens)) if structured else None
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=True,
                             structured_outputs=spec) for _ in range(batch)]  # fmt: skip
    torch.manual_seed(seed)
    outs = llm.generate(["Write it down:"] * batch, params, use_tqdm=False)
    per, lens = [], []
    for o in outs:
        n = len(o.outputs[0].token_ids)
        lens.append(n)
        if n > 1:
            per.append((o.metrics.finished_time - o.metrics.first_token_time) / (n - 1) * 1e3)
    return statistics.median(per), statistics.mean(lens)


def ttft(llm: LLM, spec: StructuredOutputsParams | None) -> float:
    p = SamplingParams(max_tokens=2, temperature=1.0, structured_outputs=spec)
    o = llm.generate(["Write it down:"], p, use_tqdm=False)[0]
    return (o.metrics.first_token_time - o.metrics.arrival_time) * 1e3


class HostTimers:
    """--breakdown: host seconds inside the engine's step parts (wrapped class methods),
    to see where a constrained step's extra time goes; nested parts count in their callers."""

    PARTS = (("step", "kiln.engine.core", "EngineCore.step"),
             ("execute", "kiln.engine.model_runner", "ModelRunner.execute"),
             ("grammars", "kiln.engine.core", "EngineCore._update_grammars"),
             ("sample", "kiln.engine.sampler", "Sampler.sample"),
             ("fill", "kiln.engine.sampler", "fill_bitmask"),
             ("fill_graph", "kiln.engine.model_runner", "fill_bitmask"),
             ("mask_graph", "kiln.engine.cuda_graphs", "CudaGraphRunner.sample_masked"),
             ("to_device", "kiln.engine.sampler", "to_device"),
             ("kernel", "kiln.engine.ops", "sample_triton"),
             ("pending", "kiln.engine.sampler", "PendingSample.__init__"),
             ("process", "kiln.engine.core", "EngineCore._process"))  # fmt: skip

    def __init__(self) -> None:
        """Wraps each part where the engine looks it up (a class attribute, or a function
        imported by name into the module that calls it): before the engine is built."""
        import importlib

        self.total = dict.fromkeys((p[0] for p in self.PARTS), 0.0)
        self.steps = 0
        for name, module, path in self.PARTS:
            owner = importlib.import_module(module)
            *classes, attr = path.split(".")
            for cls in classes:
                owner = getattr(owner, cls)
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - t0
                self.steps += name == "step"

        return timed

    def take(self) -> dict[str, float]:
        """ms per step of each part since the last take."""
        out = {k: 1e3 * v / max(self.steps, 1) for k, v in self.total.items()}
        self.total = dict.fromkeys(self.total, 0.0)
        self.steps = 0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens (256; tiny 48)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true",
                    help="also the host ms a step spends in the engine's parts")  # fmt: skip
    args = ap.parse_args()
    timers = HostTimers() if args.breakdown else None
    device = "cpu" if args.tiny else "cuda"
    shape = TINY if args.tiny else {**QWEN3_0_6B, "max_position_embeddings": 4096}
    tokens = args.tokens or (48 if args.tiny else 256)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build(Path(tmp), shape, device)
        print(f"built the model and a {shape['vocab_size']}-token BPE in "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        t0 = time.perf_counter()
        info = tokenizer_info(tmp, shape["vocab_size"], {1})
        t1 = time.perf_counter()
        GrammarCompiler(info).submit(StructuredOutputsParams(json=schema(tokens))).result()
        t2 = time.perf_counter()
        llm = LLM(tmp, max_num_seqs=max(args.batches))
        tpot(llm, max(args.batches), 8, False, 0)  # warm-up
        cold_plain = ttft(llm, None)
        first = ttft(llm, StructuredOutputsParams(json=schema(tokens)))
        cached = ttft(llm, StructuredOutputsParams(json=schema(tokens)))
        rows, parts = [], []
        for b in args.batches:
            cells = {}
            for structured in (False, True):
                if timers is not None:
                    timers.take()
                runs = [tpot(llm, b, tokens, structured, r) for r in range(args.repeat)]
                cells[structured] = (statistics.median(r[0] for r in runs),
                                     statistics.mean(r[1] for r in runs))  # fmt: skip
                if timers is not None:
                    parts.append((b, structured, timers.take()))
            rows.append((b, cells))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nstructured outputs on {name}, {shape['vocab_size']}-token vocabulary, up to "
          f"{tokens} tokens a request, median of {args.repeat}\n")  # fmt: skip
    print(f"{'batch':>5} {'TPOT free ms':>12} {'TPOT JSON ms':>12} {'extra':>7} "
          f"{'tokens free':>11} {'tokens JSON':>11}")  # fmt: skip
    for b, cells in rows:
        (free, nf), (js, nj) = cells[False], cells[True]
        print(f"{b:>5} {free:>12.3f} {js:>12.3f} {100 * (js / free - 1):>6.1f}% "
              f"{nf:>11.0f} {nj:>11.0f}")  # fmt: skip
    if parts:
        names = list(parts[0][2])
        print("\nhost ms a step (means over the runs; nested parts count in their callers)")
        print(f"{'batch':>5} {'JSON':>5} " + " ".join(f"{n:>9}" for n in names))
        for b, structured, ms in parts:
            print(f"{b:>5} {'yes' if structured else 'no':>5} "
                  + " ".join(f"{ms[n]:>9.3f}" for n in names))  # fmt: skip
    print(
        f"\ngrammar: tokenizer info {1e3 * (t1 - t0):.0f} ms (once per engine), JSON schema "
        f"compile {1e3 * (t2 - t1):.1f} ms"
    )
    print(
        f"TTFT: unconstrained {cold_plain:.1f} ms, first JSON request {first:.1f} ms "
        f"(tokenizer info + compile), same schema again {cached:.1f} ms (cached)"
    )


if __name__ == "__main__":
    main()
