"""RAG evaluation: retrieval recall@k and MRR on a QA set (the bundled one is built from the
Shakespeare corpus), and answer faithfulness by an LLM judge (is every claim in the answer
supported by the passages it was given?)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.apps.documents import Chunk
from kiln.apps.rag import Embedder, RagIndex, RetrievalConfig, answer, number_sources

if TYPE_CHECKING:
    from kiln.apps.client import OpenAIClient


def load_qa(path: str | Path | None = None) -> list[dict[str, str]]:
    """QA pairs {question, source, answer} (answer: a passage the retrieved text must hold);
    the bundled Shakespeare set by default."""
    if path is None:
        path = Path(__file__).parent.parent / "data" / "apps" / "rag_qa.jsonl"
    return [json.loads(line) for line in open(path) if line.strip()]


def _squash(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def is_relevant(chunk: Chunk, qa: dict[str, str]) -> bool:
    """A chunk answers `qa` when it comes from its source and holds its answer passage."""
    return Path(chunk.source).name == qa["source"] and _squash(qa["answer"]) in _squash(chunk.text)


def evaluate(
    index: RagIndex,
    qa: list[dict[str, str]],
    config: RetrievalConfig,
    embedder: Embedder | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k (a relevant chunk among the top k) for each k, and MRR (mean reciprocal rank
    of the first relevant chunk within the top max(ks))."""
    config = replace(config, top_k=max(ks))
    ranks = []
    for q in qa:
        ids = index.search(q["question"], config, embedder)
        hits = [r for r, i in enumerate(ids, start=1) if is_relevant(index.chunks[i], q)]
        ranks.append(hits[0] if hits else None)
    out = {f"recall@{k}": float(np.mean([r is not None and r <= k for r in ranks])) for k in ks}
    out["mrr"] = float(np.mean([1.0 / r if r else 0.0 for r in ranks]))
    return out


FAITHFULNESS_PROMPT = """Here are numbered sources and an answer written from them.

{sources}

Answer: {answer}

Is every claim in the answer supported by the sources? Reply with exactly one word: yes or no."""


def faithful(judge: OpenAIClient, text: str, chunks: list[Chunk]) -> bool | None:
    """The judge model's verdict on whether `text` says only what `chunks` support (None when
    its reply holds neither yes nor no)."""
    prompt = FAITHFULNESS_PROMPT.format(sources=number_sources(chunks), answer=text)
    m = re.search(
        r"\b(yes|no)\b", judge.complete_text(prompt, max_tokens=4, temperature=0.0).lower()
    )
    return None if m is None else m.group(1) == "yes"


def faithfulness(
    client: OpenAIClient,
    judge: OpenAIClient,
    index: RagIndex,
    qa: list[dict[str, str]],
    config: RetrievalConfig,
    embedder: Embedder | None = None,
) -> dict[str, float]:
    """Answer each question from its retrieved passages with `client`'s model, and have
    `judge`'s model say whether each answer is supported: the share judged faithful (of the
    readable verdicts) and the share of verdicts it could read."""
    from tqdm import tqdm

    verdicts = []
    for q in tqdm(qa, desc="faithfulness", unit="q", disable=len(qa) < 10):
        chunks = [index.chunks[i] for i in index.search(q["question"], config, embedder)]
        out = answer(client, q["question"], chunks, max_tokens=256, temperature=0.0)
        verdicts.append(faithful(judge, out.text, chunks))
    read = [v for v in verdicts if v is not None]
    return {"faithfulness": float(np.mean(read)) if read else 0.0,
            "judged": len(read) / len(verdicts)}  # fmt: skip
