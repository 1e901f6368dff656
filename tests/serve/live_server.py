"""A real kiln server on loopback in a thread, a tiny chat tokenizer, and /metrics readers."""

from __future__ import annotations

import socket
import threading
import time

import httpx
from chat_tokenizer import CHATML

# ids 0..4; the tiny models' config says bos=1, eos=2
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def save_chat_tokenizer(out, vocab_size: int) -> None:
    """A byte-level BPE of exactly `vocab_size` tokens with a ChatML template, saved to `out`.

    Unlike chat_tokenizer's character tokenizer, every id the model can sample decodes to text,
    which the text comparisons need; characters it never saw are dropped when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = open("data/shakespeare/hamlet_gut.txt").read()[:8000]
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    )
    assert tok.get_vocab_size() == vocab_size
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=CHATML
    ).save_pretrained(out)


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died while starting"
            assert time.monotonic() < deadline, "server did not start in 60 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server did not stop in 30 s"


def start_server(model_dir, api_key=None, max_queue=256, **engine_args) -> ServerThread:
    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.api import create_app

    engine = AsyncLLM(str(model_dir), **engine_args)
    return ServerThread(create_app(engine, "tiny", api_key=api_key, max_queue=max_queue))


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value} (comment lines dropped)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_all_blocks_free(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free; return them."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        idle = m["kiln:num_requests_running"] == 0 and m["kiln:num_requests_waiting"] == 0
        if idle and m["kiln:kv_cache_free_blocks"] == m["kiln:kv_cache_total_blocks"]:
            return m
        assert time.monotonic() < deadline, f"KV blocks still held after {timeout} s: {m}"
        time.sleep(0.05)
