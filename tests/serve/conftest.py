"""Fixtures: the tiny llama with a chat tokenizer, and a live server over it."""

from __future__ import annotations

import shutil

import httpx
import pytest
from tiny_models import save_chat_tokenizer

from serve.live_server import start_server


@pytest.fixture(scope="session")
def chat_model_dir(hf_model_dir, tmp_path_factory):
    """The tiny llama checkpoint plus a chat tokenizer, in a directory of its own."""
    from tiny_models import VOCAB

    src, _ = hf_model_dir("llama")
    out = tmp_path_factory.mktemp("llama_chat")
    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    save_chat_tokenizer(out, VOCAB)
    return out


@pytest.fixture(scope="session")
def server(chat_model_dir):
    """The main test server: room for 64 sequences at once, with async scheduling (what the
    engine does on GPUs) so that every server test also covers tokens in flight."""
    with start_server(chat_model_dir, max_num_seqs=64, async_scheduling=True) as s:
        yield s


@pytest.fixture
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
