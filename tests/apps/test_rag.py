"""RAG: retrieval quality on the bundled Shakespeare QA set (BM25, dense, hybrid), the index on
disk and its corruption, fusion, reranking, cited answers and long-document QA (a scripted stub
model), and `kiln rag` end to end over kiln's own /v1/embeddings."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from apps.stub_server import StubServer
from kiln.apps.client import OpenAIClient
from kiln.apps.documents import Chunk, Document, load_documents
from kiln.apps.rag import (
    ChunkConfig,
    LLMReranker,
    RagIndex,
    RetrievalConfig,
    answer,
    long_document_answer,
    reciprocal_rank_fusion,
)
from kiln.apps.rag_eval import evaluate, faithfulness, load_qa
from kiln.errors import InputError


@pytest.fixture(scope="module")
def index(plays_dir, embedder):
    return RagIndex.build(load_documents(plays_dir), ChunkConfig("fixed", 800, 50), embedder)


def test_hybrid_recall_at_least_the_better_retriever(index, embedder):
    qa = load_qa()
    scores = {mode: evaluate(index, qa, RetrievalConfig(mode=mode), embedder)
              for mode in ("bm25", "dense", "hybrid")}  # fmt: skip
    print("\n| mode | " + " | ".join(scores["bm25"]) + " |")
    for mode, s in scores.items():
        print(f"| {mode} | " + " | ".join(f"{v:.3f}" for v in s.values()) + " |")
    for k in (5, 10):
        best = max(scores["bm25"][f"recall@{k}"], scores["dense"][f"recall@{k}"])
        assert scores["hybrid"][f"recall@{k}"] >= best
    assert scores["bm25"]["recall@5"] >= 0.9 and scores["bm25"]["mrr"] >= 0.8
    assert scores["dense"]["recall@10"] >= 0.8


def test_reciprocal_rank_fusion_rewards_agreement():
    # 7 is second in both rankings: it beats 1 and 2, each first in one and absent in the other
    assert reciprocal_rank_fusion([[1, 7, 3], [2, 7, 4]])[0] == 7
    assert set(reciprocal_rank_fusion([[1], [2]])) == {1, 2}


def test_saved_index_answers_the_same(index, embedder, tmp_path):
    index.save(tmp_path / "idx")
    loaded = RagIndex.load(tmp_path / "idx")
    config = RetrievalConfig(mode="hybrid", top_k=5)
    for q in load_qa()[:5]:
        want = index.search(q["question"], config, embedder)
        assert loaded.search(q["question"], config, embedder) == want


def test_corrupted_index_is_a_clear_error(index, tmp_path):
    small = RagIndex(index.chunks[:20], np.eye(20, 8, dtype=np.float32), {"version": 1,
                     "num_chunks": 20, "embedder": None})  # fmt: skip
    path = tmp_path / "idx"
    small.save(path)
    (path / "dense.faiss").write_bytes(b"garbage" * 10)
    with pytest.raises(InputError, match="dense.faiss is corrupted"):
        RagIndex.load(path)
    lines = (path / "chunks.jsonl").read_text().splitlines()
    (path / "chunks.jsonl").write_text("\n".join(lines[:10]) + "\n")
    with pytest.raises(InputError, match="10 chunks, meta.json says 20"):
        RagIndex.load(path)
    (path / "chunks.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="corrupted"):
        RagIndex.load(path)
    with pytest.raises(InputError, match="not a kiln RAG index"):
        RagIndex.load(tmp_path / "nowhere")


def test_bad_queries(index):
    with pytest.raises(InputError, match="empty"):
        index.search("  ", RetrievalConfig(mode="bm25"))
    with pytest.raises(InputError, match="needs embeddings"):
        index.search("Hamlet", RetrievalConfig(mode="dense"))
    assert index.search_bm25("zzzqqq", 5) == []  # no shared term: nothing, not an error


def _chunks() -> list[Chunk]:
    texts = ["The ghost walks on the platform at Elsinore.", "Ophelia drowns in the brook.",
             "Yorick was the king's jester."]  # fmt: skip
    return [Chunk("hamlet.txt", 0, len(t), n + 1, t) for n, t in enumerate(texts)]


def test_answer_cites_its_sources():
    def chat(req):
        prompt = req["messages"][-1]["content"]
        assert "[3] (hamlet.txt:3) Yorick was the king's jester." in prompt
        return {"content": "Yorick was the jester [3], mourned at the grave [3]."}

    with StubServer(chat=chat) as stub, OpenAIClient(stub.url) as client:
        out = answer(client, "Who was Yorick?", _chunks())
    assert [c.line for c in out.sources] == [3]
    assert "jester" in out.text


def test_llm_reranker_orders_by_the_models_scores():
    def chat(req):  # the stub model rates a passage by whether it names Yorick
        return {"content": "9" if "Yorick was" in req["messages"][-1]["content"] else "1"}

    with StubServer(chat=chat) as stub, OpenAIClient(stub.url) as client:
        scores = LLMReranker(client)("who was Yorick", [c.text for c in _chunks()])
    assert scores == [1.0, 1.0, 9.0]


def test_long_document_answer_sees_summaries_and_retrieved_text():
    text = " ".join(f"Scene {i}. The players rehearse their lines." for i in range(40))
    text += " The crown is hidden under the old oak."
    doc = Document("long.txt", text)

    def chat(req):
        prompt = req["messages"][-1]["content"]
        if prompt.startswith("Summarize"):
            return {"content": f"summary of {len(prompt)} characters"}
        assert "(summary)" in prompt and "hidden under the old oak" in prompt
        return {"content": "Under the old oak [1]."}

    with StubServer(chat=chat) as stub, OpenAIClient(stub.url) as client:
        out = long_document_answer(client, doc, "Where is the crown hidden?", chunk_size=300)
    summaries = [r for p, r in stub.requests if r["messages"][-1]["content"].startswith("Summ")]
    assert len(summaries) >= 5  # every chunk summarized
    assert "oak" in out.sources[0].text


def test_cli_index_and_query_over_kiln_server(kiln_server, tmp_path, capsys):
    """`kiln rag index` embeds through kiln serve's /v1/embeddings (the tiny model: the
    vectors are noise, the plumbing is real); `kiln rag query` fuses them with BM25."""
    from kiln.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Hamlet\nThe prince of Denmark sees a ghost.\n")
    (docs / "b.txt").write_text("Macbeth meets three witches on the heath.\n")
    (docs / "empty.txt").write_text("")
    (docs / "blob.txt").write_bytes(b"\x00\x01binary")
    out = tmp_path / "idx"
    assert main(["rag", "index", "--docs", str(docs), "--out", str(out), "--base-url",
                 kiln_server.url, "--chunk-size", "200"]) == 0  # fmt: skip
    assert "indexed 2 chunks (BM25 + dense)" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["embedder"]["kind"] == "server"
    assert main(["rag", "query", "--index", str(out), "which witches", "--top-k", "1"]) == 0
    assert re.search(r"\[1\] b.txt:1\nMacbeth", capsys.readouterr().out)
    (out / "dense.faiss").write_bytes(b"broken")
    assert main(["rag", "query", "--index", str(out), "ghost"]) == 2
    assert "dense.faiss is corrupted" in capsys.readouterr().err


def test_faithfulness_counts_the_judges_verdicts(index, embedder):
    verdicts = iter(["Yes.", "no", "I cannot tell", "YES"])

    def chat(req):
        prompt = req["messages"][-1]["content"]
        if prompt.startswith("Answer the question"):  # the answering model cites source 1
            return {"content": "As the first source says [1]."}
        assert "[1] (" in prompt and "Answer: As the first source says [1]." in prompt
        return {"content": next(verdicts)}

    config = RetrievalConfig(mode="hybrid", top_k=2)
    with StubServer(chat=chat) as stub, OpenAIClient(stub.url) as client:
        got = faithfulness(client, client, index, load_qa()[:4], config, embedder)
    assert got == {"faithfulness": 2 / 3, "judged": 0.75}
