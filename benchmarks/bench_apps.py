"""Issue 28's applications measured: RAG retrieval quality (recall@k, MRR) on the bundled
Shakespeare QA set for each chunking and retriever, the guardrails' precision/recall and cost
per text, and, given a server, text-to-SQL execution accuracy and the RAG answer path.

    python benchmarks/bench_apps.py                       # BM25 only: no server needed
    python benchmarks/bench_apps.py --base-url http://127.0.0.1:8000/v1   # + dense, hybrid, SQL

Dense retrieval uses the server's /v1/embeddings (a kiln serve model's pooled hidden states,
or any OpenAI-compatible embedding server)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import kiln
from kiln.apps.client import OpenAIClient
from kiln.apps.documents import load_documents
from kiln.apps.guardrails import Guardrails, GuardrailsConfig, load_eval_set
from kiln.apps.guardrails import evaluate as guard_eval
from kiln.apps.rag import ChunkConfig, RagIndex, RetrievalConfig, ServerEmbedder
from kiln.apps.rag_eval import evaluate, load_qa
from kiln.apps.sql import DATA, TextToSQL, build_bundled_database, execution_accuracy, load_jsonl


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")


def rag(args, client: OpenAIClient | None) -> None:
    qa = load_qa()
    plays = Path(tempfile.mkdtemp())
    corpus = Path(kiln.__file__).parent / "data" / "shakespeare"
    for source in sorted({q["source"] for q in qa}):
        shutil.copy(corpus / source, plays / source)
    docs = load_documents(plays)
    embedder = ServerEmbedder(client) if client is not None else None
    modes = ["bm25", "dense", "hybrid"] if embedder is not None else ["bm25"]
    rows = []
    for chunking, size in (("fixed", 800), ("sentence", 800), ("sentence", 400)):
        t = time.perf_counter()
        index = RagIndex.build(docs, ChunkConfig(chunking, size, 50), embedder)
        build_s = time.perf_counter() - t
        for mode in modes:
            t = time.perf_counter()
            s = evaluate(index, qa, RetrievalConfig(mode=mode), embedder)
            ms = (time.perf_counter() - t) / len(qa) * 1e3
            rows.append([f"{chunking} {size}", len(index.chunks), mode, *s.values(), ms, build_s])
    print(f"\nRAG retrieval on {len(qa)} questions over {len(docs)} plays")
    table(["chunking", "chunks", "mode", "recall@1", "recall@5", "recall@10", "MRR",
           "ms/query", "index s"], rows)  # fmt: skip


def guardrails() -> None:
    t = time.perf_counter()
    guard = Guardrails(GuardrailsConfig())
    load_s = time.perf_counter() - t
    items = load_eval_set()
    t = time.perf_counter()
    scores = guard_eval(guard, items)
    ms = (time.perf_counter() - t) / len(items) * 1e3
    print(f"\nguardrails on {len(items)} labelled texts (load {load_s:.1f} s, {ms:.2f} ms/text)")
    table(["check", "precision", "recall"], [[k, v["precision"], v["recall"]]
                                             for k, v in scores.items()])  # fmt: skip


def sql(client: OpenAIClient) -> None:
    db = build_bundled_database(Path(tempfile.mkdtemp()) / "shop.db")
    questions = load_jsonl(DATA / "sql_questions.jsonl")
    rows = []
    for attempts in (1, 3):
        t2s = TextToSQL(client, db, max_attempts=attempts)
        acc = execution_accuracy(t2s, questions, max_tokens=256, temperature=0.0)
        rows.append([attempts, acc])
    print(f"\ntext-to-SQL execution accuracy on {len(questions)} questions")
    table(["attempts (self-correction)", "execution accuracy"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None)
    p.add_argument("--model", default=None)
    args = p.parse_args()
    client = OpenAIClient(args.base_url, model=args.model) if args.base_url else None
    rag(args, client)
    guardrails()
    if client is not None:
        sql(client)


if __name__ == "__main__":
    main()
