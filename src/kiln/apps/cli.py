"""`kiln rag index|query|eval`, `kiln sql ask|eval` and `kiln agent`: the applications from the
command line, over an OpenAI-compatible server (--base-url, kiln serve's by default)."""

from __future__ import annotations

import argparse
import functools
import os

from kiln.flags import add_flags, flags_given

DEFAULT_URL = os.environ.get("KILN_BASE_URL", "http://127.0.0.1:8000/v1")


def _server_flags(p: argparse.ArgumentParser, url_default: str | None = DEFAULT_URL) -> None:
    p.add_argument("--base-url", default=url_default,
                   help="the OpenAI-compatible server (default: $KILN_BASE_URL or "
                   "http://127.0.0.1:8000/v1)")  # fmt: skip
    p.add_argument("--model", default=None, help="the model name to ask the server for")
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"))
    p.add_argument("--max-tokens", type=int, default=512)


def needs_apps_extra(fn):
    """A command that says which package is missing, in one line, without kiln[apps]."""

    @functools.wraps(fn)
    def run(args):
        try:
            return fn(args)
        except ImportError as e:
            from kiln.errors import InputError

            raise InputError(f"{e.name} is not installed: pip install 'kiln[apps]'") from None

    return run


def register(subparsers) -> None:
    from kiln.apps.rag import ChunkConfig, RetrievalConfig

    rag = subparsers.add_parser("rag", help="retrieval-augmented generation over documents")
    verbs = rag.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("index", help="chunk and index a directory of .txt/.md/.pdf files")
    p.add_argument("--docs", required=True, help="a directory (or one file) of documents")
    p.add_argument("--out", required=True, help="the index directory to write")
    _server_flags(p, url_default=None)
    p.add_argument("--st-model", default=None,
                   help="embed locally with this sentence-transformers model instead")  # fmt: skip
    add_flags(p, ChunkConfig, "chunking")
    p.set_defaults(func=rag_index)
    for verb, fn, text in (("query", rag_query, "retrieve passages (and answer with --answer)"),
                           ("eval", rag_eval, "recall@k and MRR on a QA set")):  # fmt: skip
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--index", required=verb == "eval", help="the index directory")
        if verb == "query":
            p.add_argument("question")
            p.add_argument("--answer", action="store_true", help="answer from the passages")
            p.add_argument("--long-doc", default=None, metavar="FILE",
                           help="answer about one long file from chunked summaries")  # fmt: skip
        else:
            p.add_argument("--qa", default=None, help="a JSONL QA set (default: the bundled one)")
            p.add_argument("--judge-url", default=None,
                           help="also answer each question (--base-url's chat model) and have "
                           "this server's model judge the answer's faithfulness")  # fmt: skip
        _server_flags(p, url_default=None)
        p.add_argument("--st-model", default=None)
        add_flags(p, RetrievalConfig, "retrieval")
        p.set_defaults(func=fn)

    sql = subparsers.add_parser("sql", help="text-to-SQL over a SQLite database (read-only)")
    verbs = sql.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("ask", help="answer a question with a query")
    p.add_argument("question")
    p.add_argument("--db", default=None, help="the SQLite file (default: the bundled shop)")
    _server_flags(p)
    p.set_defaults(func=sql_ask)
    p = verbs.add_parser("eval", help="execution accuracy on the bundled questions")
    _server_flags(p)
    p.set_defaults(func=sql_eval)

    p = subparsers.add_parser("agent", help="a tool-calling agent (calculator, RAG search)")
    p.add_argument("prompt")
    p.add_argument("--index", default=None, help="a RAG index to search as a tool")
    p.add_argument("--max-steps", type=int, default=8)
    _server_flags(p)
    p.set_defaults(func=agent_run)


def _client(args):
    from kiln.apps.client import OpenAIClient

    return OpenAIClient(args.base_url or DEFAULT_URL, model=args.model, api_key=args.api_key)


def _embedder(args, meta: dict | None = None):
    """The embedder the flags name, else the one the index was built with, else None."""
    from kiln.apps.client import OpenAIClient
    from kiln.apps.rag import SentenceTransformerEmbedder, ServerEmbedder

    built = (meta or {}).get("embedder") or {}
    local = built.get("model") if built.get("kind") == "sentence-transformers" else None
    st = getattr(args, "st_model", None) or local
    if st:
        return SentenceTransformerEmbedder(st)
    url = args.base_url or built.get("base_url")
    if url is None:
        return None
    model = args.model or built.get("model")
    return ServerEmbedder(OpenAIClient(url, model=model, api_key=args.api_key))


@needs_apps_extra
def rag_index(args) -> None:
    from kiln.apps.documents import load_documents
    from kiln.apps.rag import ChunkConfig, RagIndex

    config = ChunkConfig(**flags_given(ChunkConfig, args))
    index = RagIndex.build(load_documents(args.docs), config, _embedder(args))
    index.save(args.out)
    kind = "BM25 + dense" if index.dense is not None else "BM25 only (no --base-url)"
    print(f"indexed {len(index.chunks)} chunks ({kind}) into {args.out}")


def _retrieval(args, index):
    from kiln.apps.rag import CrossEncoderReranker, LLMReranker, RetrievalConfig

    config = RetrievalConfig(**flags_given(RetrievalConfig, args))
    embedder = _embedder(args, index.meta) if config.mode != "bm25" else None
    reranker = None
    if config.rerank == "llm":
        reranker = LLMReranker(_client(args))
    elif config.rerank == "cross-encoder":
        reranker = CrossEncoderReranker(args.st_model or "cross-encoder/ms-marco-MiniLM-L-6-v2")
    return config, embedder, reranker


@needs_apps_extra
def rag_query(args) -> None:
    from kiln.apps.documents import Document, read_document
    from kiln.apps.rag import RagIndex, answer, long_document_answer
    from kiln.errors import InputError

    if args.long_doc:
        from pathlib import Path

        doc = Document(Path(args.long_doc).name, read_document(Path(args.long_doc)))
        out = long_document_answer(_client(args), doc, args.question, max_tokens=args.max_tokens)
        print(out.text)
        print("sources:", ", ".join(c.cite() for c in out.sources))
        return
    if args.index is None:
        raise InputError("give --index INDEX (or --long-doc FILE)")
    index = RagIndex.load(args.index)
    config, embedder, reranker = _retrieval(args, index)
    chunks = [index.chunks[i] for i in index.search(args.question, config, embedder, reranker)]
    if not args.answer:
        for n, c in enumerate(chunks, start=1):
            print(f"[{n}] {c.cite()}\n{c.text}\n")
        return
    out = answer(_client(args), args.question, chunks, max_tokens=args.max_tokens)
    print(out.text)
    print("sources:", ", ".join(c.cite() for c in out.sources))


@needs_apps_extra
def rag_eval(args) -> None:
    from kiln.apps.client import OpenAIClient
    from kiln.apps.rag import RagIndex
    from kiln.apps.rag_eval import evaluate, faithfulness, load_qa

    index = RagIndex.load(args.index)
    config, embedder, _ = _retrieval(args, index)
    qa = load_qa(args.qa)
    scores = evaluate(index, qa, config, embedder)
    if args.judge_url:
        judge = OpenAIClient(args.judge_url, api_key=args.api_key)
        scores |= faithfulness(_client(args), judge, index, qa, config, embedder)
    print(f"| mode | {' | '.join(scores)} |\n|---|{'---|' * len(scores)}")
    print(f"| {config.mode} | {' | '.join(f'{v:.3f}' for v in scores.values())} |")


@needs_apps_extra
def sql_ask(args) -> None:
    import tempfile

    from kiln.apps.sql import TextToSQL, build_bundled_database

    db = args.db or build_bundled_database(os.path.join(tempfile.mkdtemp(), "shop.db"))
    result = TextToSQL(_client(args), db).ask(args.question, max_tokens=args.max_tokens)
    for sql, error in result.attempts:
        print(f"-- {sql}" + (f"\n--   error: {error}" if error else ""))
    for row in result.rows or []:
        print(row)


@needs_apps_extra
def sql_eval(args) -> None:
    import tempfile

    from kiln.apps.sql import (
        DATA,
        TextToSQL,
        build_bundled_database,
        execution_accuracy,
        load_jsonl,
    )

    db = build_bundled_database(os.path.join(tempfile.mkdtemp(), "shop.db"))
    questions = load_jsonl(DATA / "sql_questions.jsonl")
    acc = execution_accuracy(TextToSQL(_client(args), db), questions, max_tokens=args.max_tokens)
    print(f"execution accuracy: {acc:.3f} on {len(questions)} questions")


@needs_apps_extra
def agent_run(args) -> None:
    from kiln.apps.agent import Agent, ToolRegistry, calculator, rag_tool

    tools = ToolRegistry([calculator])
    if args.index:
        from kiln.apps.rag import RagIndex

        index = RagIndex.load(args.index)
        tools.register(rag_tool(index, _embedder(args, index.meta) if index.dense else None))
    result = Agent(_client(args), tools, max_steps=args.max_steps,
                   max_tokens=args.max_tokens).run(args.prompt)  # fmt: skip
    for step in result.steps:
        print(f"> {step.tool}({step.arguments}) -> {step.result}")
    print(result.answer)
