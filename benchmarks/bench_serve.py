"""Serving benchmark: start `kiln serve` on a model, then `kiln bench serve` at several rates.

With --random-qwen3 DIR it first builds a random bf16 Qwen3-0.6B-shaped model there (as
bench_engine.py does) plus a synthetic byte-level tokenizer of the full 151,936 entries, so
every sampled id detokenizes (GPU).

    PYTHONPATH=src python3 benchmarks/bench_serve.py --random-qwen3 /tmp/q3 --request-rate 8 32
    PYTHONPATH=src python3 benchmarks/bench_serve.py --model DIR --request-rate 4 16
"""

from __future__ import annotations

import argparse
import itertools
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_synthetic_tokenizer(out: Path, vocab_size: int) -> None:
    """Byte-level BPE whose vocabulary is the 256 bytes, then ASCII-letter strings (so every id
    decodes to valid UTF-8), then the specials: exactly `vocab_size` entries, no merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from kiln.tokenizer.hf import Tokenizer

    byte_level = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_level))}
    want = vocab_size - len(SPECIALS)
    pieces = (
        prefix + "".join(p)
        for n in itertools.count(2)
        for prefix in ("", "\u0120")  # "Ġ": the byte-level space
        for p in itertools.product(string.ascii_letters, repeat=n)
    )
    for piece in pieces:
        if len(vocab) == want:
            break
        vocab.setdefault(piece, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    Tokenizer(tok, {"eos_token": "<|im_end|>"}, CHATML).save(out)


def build_random_qwen3(out: Path) -> Path:
    """The Qwen3-0.6B-shaped random model of bench_engine.py, with a tokenizer; built once."""
    if not (out / "tokenizer.json").is_file():
        import torch
        from bench_engine import QWEN3_06B, build_model

        build_model(out)  # the returned HF model is dropped here; free its memory
        torch.cuda.empty_cache()
        save_synthetic_tokenizer(out, QWEN3_06B["vocab_size"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (kiln serve drains, then exits); kill it if it has not gone in a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode} while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"kiln serve not healthy after {timeout:.0f} s")
        time.sleep(0.5)


# `kiln serve` that dumps every thread's stack on SIGUSR1, to see where a stuck run waits
SERVE_WITH_STACK_DUMPS = (
    "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
    "from kiln.cli import main; sys.exit(main(sys.argv[1:]))"
)


def probe(url: str) -> None:
    """One small request, timed: is the server answering at all?"""
    start = time.perf_counter()
    body = {"prompt": list(range(10, 74)), "max_tokens": 16, "ignore_eos": True}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=180)
    print(f"probe: HTTP {resp.status_code} in {time.perf_counter() - start:.2f} s: "
          f"{resp.text[:200]}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path)
    src.add_argument("--random-qwen3", type=Path, metavar="DIR")
    p.add_argument("--request-rate", type=float, nargs="+", default=[8.0, 32.0])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-token-id", type=int, default=1000, help="prompt ids in [10, this)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--bench-timeout", type=float, default=600.0)
    p.add_argument(
        "--log", type=Path, default=Path(tempfile.gettempdir()) / "kiln_bench_serve.log",
        help="the server's log",
    )  # fmt: skip
    p.add_argument("--serve-arg", action="append", default=[], help="passed to kiln serve")
    args = p.parse_args()

    model = args.model or build_random_qwen3(args.random_qwen3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-c", SERVE_WITH_STACK_DUMPS, "serve", "--model", str(model),
             "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
             *args.serve_arg]  # fmt: skip
    bench = [sys.executable, "-m", "kiln.cli", "bench", "serve", "--base-url", url,
             "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
             "--output-len", str(args.output_len), "--max-token-id", str(args.max_token_id),
             "--request-rate", *map(str, args.request_rate)]  # fmt: skip
    if args.json:
        bench += ["--json", args.json]
    start = time.perf_counter()
    with open(args.log, "w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, timeout=600)
        print(f"kiln serve ready in {time.perf_counter() - start:.1f} s", flush=True)
        probe(url)
        try:
            subprocess.run(bench, check=True, timeout=args.bench_timeout)
        except subprocess.TimeoutExpired:
            print(f"bench did not finish in {args.bench_timeout:.0f} s; server stacks:")
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        print("\n".join(line for line in metrics.splitlines() if line.startswith("kiln:")
                        and "_bucket" not in line and "_created" not in line))  # fmt: skip
    finally:
        stop_server(proc)
        print("---- server log (tail)")
        print("\n".join(args.log.read_text().splitlines()[-80:]))


if __name__ == "__main__":
    main()
