"""Fixtures for the applications: the bundled QA set's plays as a document directory, the
n-gram stand-in embedder fitted on them, and one Guardrails (presidio loads in seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import kiln
from apps.stub_server import NgramEmbedder

CORPUS = Path(kiln.__file__).parent / "data" / "shakespeare"


@pytest.fixture(scope="session")
def plays_dir(tmp_path_factory):
    from kiln.apps.rag_eval import load_qa

    out = tmp_path_factory.mktemp("plays")
    for source in sorted({q["source"] for q in load_qa()}):
        shutil.copy(CORPUS / source, out / source)
    return out


@pytest.fixture(scope="session")
def embedder(plays_dir):
    """The stand-in embedder, its IDF fitted on the plays' chunks."""
    from kiln.apps.documents import chunk_document, load_documents

    docs = load_documents(plays_dir)
    return NgramEmbedder([c.text for d in docs for c in chunk_document(d, "fixed", 800, 50)])


@pytest.fixture(scope="session")
def guard():
    from kiln.apps.guardrails import Guardrails, GuardrailsConfig

    config = GuardrailsConfig.from_dict(
        {"input": {"denylist": [r"build a bomb"]}, "output": {"denylist": ["forbidden words"]}}
    )
    return Guardrails(config)


GUARDRAILS_TOML = """
[input]
denylist = ["build a bomb"]
pii = "redact"

[output]
pii = "redact"
"""


@pytest.fixture(scope="session")
def kiln_server(tokenized_model_dir, tmp_path_factory):
    """kiln serve over the tiny llama (its embeddings are noise; the HTTP path is real), with
    --guardrails on (so every app test's request also crosses the middleware)."""
    from serve.live_server import ServerThread

    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.api import create_app

    config = tmp_path_factory.mktemp("guardrails") / "guardrails.toml"
    config.write_text(GUARDRAILS_TOML)
    engine = AsyncLLM(str(tokenized_model_dir("llama")), max_num_seqs=8)
    with ServerThread(create_app(engine, "tiny", guardrails=str(config))) as s:
        yield s
