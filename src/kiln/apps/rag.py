"""Retrieval-augmented generation: an index of chunks with BM25 (bm25s) and dense (FAISS)
retrieval, reciprocal-rank fusion, reranking, answers that cite their sources, and a
long-document mode that answers from chunked summaries plus retrieved passages."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.apps.documents import CHUNKINGS, Chunk, Document, chunk_document
from kiln.errors import InputError

if TYPE_CHECKING:
    from kiln.apps.client import OpenAIClient

MODES = ("bm25", "dense", "hybrid")
RERANKERS = ("none", "llm", "cross-encoder")
INDEX_VERSION = 1

Embedder = Callable[[list[str]], np.ndarray]  # texts -> [len(texts), dim]
Reranker = Callable[[str, list[str]], list[float]]  # (query, passages) -> a score each


@dataclass
class ChunkConfig:
    """How `kiln rag index` cuts documents."""

    chunking: str = field(default="sentence", metadata={"choices": CHUNKINGS,
                          "help": "fixed windows, whole sentences, or semantic cuts"})  # fmt: skip
    chunk_size: int = field(default=800, metadata={"help": "characters a chunk holds at most"})
    chunk_overlap: int = field(default=100, metadata={"help": "fixed chunking: shared chars"})


@dataclass
class RetrievalConfig:
    """How `kiln rag query` and `kiln rag eval` retrieve."""

    mode: str = field(default="hybrid", metadata={"choices": MODES,
                      "help": "BM25, dense (FAISS), or both fused by reciprocal rank"})  # fmt: skip
    top_k: int = field(default=5, metadata={"help": "passages returned"})
    fetch_k: int = field(default=50, metadata={"help": "candidates each retriever gives fusion"})
    rrf_k: int = field(default=60, metadata={"help": "reciprocal-rank fusion's constant"})
    rerank: str = field(default="none", metadata={"choices": RERANKERS,
                        "help": "rescore the fused candidates (llm: the chat model)"})  # fmt: skip


class ServerEmbedder:
    """Embeddings from an OpenAI-compatible /v1/embeddings (kiln serve's, for one)."""

    def __init__(self, client: OpenAIClient):
        self.client = client

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.client.embed(texts)

    def describe(self) -> dict[str, Any]:
        return {"kind": "server", "base_url": self.client.base_url, "model": self.client.model}


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (optional: pip install sentence-transformers)."""

    def __init__(self, name: str):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise InputError("a local embedding model needs sentence-transformers "
                             "(pip install sentence-transformers)") from None  # fmt: skip
        self.name = name
        self.model = SentenceTransformer(name)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, normalize_embeddings=True), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"kind": "sentence-transformers", "model": self.name}


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def normalized(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60) -> list[int]:
    """Ids ordered by sum over rankings of 1 / (k + rank) (Cormack et al., 2009; rank from 1)."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            score[i] = score.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(score, key=lambda i: (-score[i], i))


class RagIndex:
    """Chunks with a BM25 index and, given an embedder, a FAISS inner-product index over their
    normalized embeddings. Saved as a directory: meta.json, chunks.jsonl, dense.faiss."""

    def __init__(self, chunks: list[Chunk], vectors: np.ndarray | None, meta: dict[str, Any]):
        import bm25s

        self.chunks, self.meta = chunks, meta
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25_tokens([c.text for c in chunks]), show_progress=False)
        self.dense = None
        if vectors is not None:
            import faiss

            self.dense = faiss.IndexFlatIP(vectors.shape[1])
            self.dense.add(normalized(vectors))

    @classmethod
    def build(
        cls, docs: list[Document], config: ChunkConfig, embedder: Embedder | None = None
    ) -> RagIndex:
        """Chunk `docs` and index the chunks (dense too when an embedder is given)."""
        from tqdm import tqdm

        if config.chunking == "semantic" and embedder is None:
            raise InputError("--chunking semantic needs embeddings (--base-url or --st-model)")
        chunks = []
        for doc in tqdm(docs, desc="chunking", unit="doc", disable=len(docs) < 10):
            chunks += chunk_document(doc, config.chunking, config.chunk_size,
                                     config.chunk_overlap, embedder)  # fmt: skip
        vectors = None
        if embedder is not None:
            batches = [[c.text for c in chunks[i : i + 64]] for i in range(0, len(chunks), 64)]
            vectors = np.concatenate([embedder(b) for b in tqdm(batches, desc="embedding",
                                      unit="batch", disable=len(batches) < 4)])  # fmt: skip
        describe = getattr(embedder, "describe", None)
        meta = {"version": INDEX_VERSION, "num_chunks": len(chunks), "chunking": asdict(config),
                "embedder": describe() if describe else None}  # fmt: skip
        return cls(chunks, vectors, meta)

    def save(self, out: str | Path) -> None:
        import faiss

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "chunks.jsonl", "w") as f:
            for c in self.chunks:
                f.write(json.dumps(asdict(c)) + "\n")
        if self.dense is not None:
            faiss.write_index(self.dense, str(out / "dense.faiss"))
        (out / "meta.json").write_text(json.dumps(self.meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> RagIndex:
        """A saved index; InputError naming the file at fault when it is missing or corrupted."""
        import faiss

        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            chunks = [Chunk(**json.loads(line)) for line in open(path / "chunks.jsonl")]
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"{path} is not a kiln RAG index, or it is corrupted: {e}") from None
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
            raise InputError(f"{path}/meta.json: not a version-{INDEX_VERSION} kiln RAG index")
        if len(chunks) != meta.get("num_chunks"):
            raise InputError(f"{path}/chunks.jsonl: {len(chunks)} chunks, meta.json says "
                             f"{meta.get('num_chunks')} (truncated?)")  # fmt: skip
        index = cls(chunks, None, meta)
        if (path / "dense.faiss").exists():
            try:
                index.dense = faiss.read_index(str(path / "dense.faiss"))
            except RuntimeError as e:
                first = str(e).strip().splitlines()[-1]
                raise InputError(f"{path}/dense.faiss is corrupted: {first}") from None
            if index.dense.ntotal != len(chunks):
                raise InputError(f"{path}/dense.faiss holds {index.dense.ntotal} vectors for "
                                 f"{len(chunks)} chunks")  # fmt: skip
        return index

    def search_bm25(self, query: str, k: int) -> list[int]:
        """Chunk ids by BM25 score, best first (only chunks sharing a term with the query)."""
        vocab = self.bm25.vocab_dict
        terms = [t for t in bm25_tokens([query])[0] if t in vocab]
        if not terms:
            return []
        scores = self.bm25.get_scores(terms)
        top = np.argsort(-scores, kind="stable")[:k]
        return [int(i) for i in top if scores[i] > 0]

    def search_dense(self, query: str, k: int, embedder: Embedder) -> list[int]:
        """Chunk ids by cosine similarity of embeddings, best first."""
        if self.dense is None:
            raise InputError("this index has no dense vectors (built without embeddings): "
                             "use --mode bm25")  # fmt: skip
        q = normalized(np.asarray(embedder([query]), dtype=np.float32))
        if q.shape[1] != self.dense.d:
            raise InputError(
                f"the query embedding has {q.shape[1]} dimensions, the index {self.dense.d}: "
                "use the embedder the index was built with"
            )
        _, ids = self.dense.search(q, min(k, len(self.chunks)))
        return [int(i) for i in ids[0] if i >= 0]

    def search(
        self,
        query: str,
        config: RetrievalConfig,
        embedder: Embedder | None = None,
        reranker: Reranker | None = None,
    ) -> list[int]:
        """The top `config.top_k` chunk ids for `query` by `config.mode`, reranked if asked."""
        if not query.strip():
            raise InputError("the query is empty")
        if config.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
        fetch = max(config.fetch_k, config.top_k)
        rankings = []
        if config.mode in ("bm25", "hybrid"):
            rankings.append(self.search_bm25(query, fetch))
        if config.mode in ("dense", "hybrid"):
            if embedder is None:
                raise InputError(f"--mode {config.mode} needs embeddings (--base-url)")
            rankings.append(self.search_dense(query, fetch, embedder))
        ids = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings, config.rrf_k)
        if reranker is not None and ids:
            ids = ids[: max(config.top_k * 4, config.top_k)]  # rerank a few times what we keep
            scores = reranker(query, [self.chunks[i].text for i in ids])
            ids = [i for _, i in sorted(zip(scores, ids), key=lambda s: -s[0])]
        return ids[: config.top_k]


class LLMReranker:
    """Scores each passage 0-10 for a query by asking the chat model (pointwise LLM reranking);
    an answer without a number scores 0."""

    PROMPT = ("How relevant is the passage to the question, from 0 (not at all) to 10 (it "
              "answers it)? Reply with the number only.\n\nQuestion: {query}\n\n"
              "Passage: {passage}")  # fmt: skip

    def __init__(self, client: OpenAIClient):
        self.client = client

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        scores = []
        for p in passages:
            reply = self.client.complete_text(self.PROMPT.format(query=query, passage=p),
                                              max_tokens=4, temperature=0.0)  # fmt: skip
            m = re.search(r"\d+(\.\d+)?", reply)
            scores.append(min(float(m.group()), 10.0) if m else 0.0)
        return scores


class CrossEncoderReranker:
    """A sentence-transformers cross-encoder (optional dependency), e.g.
    cross-encoder/ms-marco-MiniLM-L-6-v2."""

    def __init__(self, name: str):
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise InputError("--rerank cross-encoder needs sentence-transformers") from None
        self.model = CrossEncoder(name)

    def __call__(self, query: str, passages: list[str]) -> list[float]:
        return [float(s) for s in self.model.predict([(query, p) for p in passages])]


@dataclass
class Answer:
    text: str
    sources: list[Chunk]  # the passages the answer cites (all it was given if it cites none)


ANSWER_PROMPT = """Answer the question from the numbered sources below. Cite the sources you
use as [1], [2], ... If the sources do not hold the answer, say so.

{sources}

Question: {question}"""


def number_sources(chunks: list[Chunk]) -> str:
    return "\n\n".join(f"[{n}] ({c.cite()}) {c.text}" for n, c in enumerate(chunks, start=1))


def cited(text: str, chunks: list[Chunk]) -> list[Chunk]:
    """The chunks an answer cites by [n], in order of first citation."""
    nums = dict.fromkeys(int(n) for n in re.findall(r"\[(\d+)\]", text))
    return [chunks[n - 1] for n in nums if 1 <= n <= len(chunks)] or list(chunks)


def answer(client: OpenAIClient, question: str, chunks: list[Chunk], **params: Any) -> Answer:
    """The chat model's answer to `question` from `chunks`, with the sources it cites."""
    prompt = ANSWER_PROMPT.format(sources=number_sources(chunks), question=question)
    text = client.complete_text(prompt, **params)
    return Answer(text, cited(text, chunks))


SUMMARY_PROMPT = """Summarize this part of a document in a few sentences, keeping every fact
that could help answer: {question}

{text}"""


def long_document_answer(
    client: OpenAIClient,
    doc: Document,
    question: str,
    chunk_size: int = 4000,
    top_k: int = 3,
    **params: Any,
) -> Answer:
    """Answer about a document longer than the model's context: each chunk is summarized with
    the question in mind (the compressed memory of the whole document), and the answer sees
    those summaries plus the `top_k` chunks BM25 finds for the question, verbatim."""
    from tqdm import tqdm

    chunks = chunk_document(doc, "sentence", chunk_size)
    summaries = [
        client.complete_text(SUMMARY_PROMPT.format(question=question, text=c.text), **params)
        for c in tqdm(chunks, desc="summarizing", unit="chunk", disable=len(chunks) < 4)
    ]
    index = RagIndex(chunks, None, {})
    retrieved = [chunks[i] for i in index.search_bm25(question, top_k)]
    memory = [Chunk(c.source, c.start, c.end, c.line, f"(summary) {s}")
              for c, s in zip(chunks, summaries)]  # fmt: skip
    return answer(client, question, retrieved + memory, **params)
