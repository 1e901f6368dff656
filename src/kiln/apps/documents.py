"""Documents in, chunks out: text, markdown and PDF ingestion, and three ways to cut a text
into chunks (fixed windows, whole sentences, and semantic: cuts where the topic shifts)."""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import InputError

log = logging.getLogger("kiln.apps")

SUFFIXES = (".txt", ".md", ".markdown", ".pdf")
CHUNKINGS = ("fixed", "sentence", "semantic")
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n\s*\n")


@dataclass
class Document:
    source: str  # the file's path relative to the ingested directory
    text: str


@dataclass
class Chunk:
    source: str
    start: int  # character offsets into the document's text
    end: int
    line: int  # the document line the chunk starts on (1-based), for citations
    text: str

    def cite(self) -> str:
        return f"{self.source}:{self.line}"


def read_document(path: Path) -> str:
    """A file's text; InputError saying why when it is empty, binary, or an unreadable PDF."""
    if path.suffix.lower() == ".pdf":
        text = _pdf_text(path)
    else:
        data = path.read_bytes()
        if b"\x00" in data[:8192]:
            raise InputError(f"{path}: binary data, not text")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError(f"{path}: empty (no text)")
    return text


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        pages = PdfReader(path).pages
        return "\n\n".join(page.extract_text() or "" for page in pages)
    except (PyPdfError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable PDF ({e})") from None


def load_documents(root: str | Path) -> list[Document]:
    """Every .txt/.md/.pdf file under `root` (a directory or one file), sorted by path. Empty,
    binary and unreadable files are skipped with a warning; none left is an InputError."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"--docs: {root} does not exist")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    docs = []
    for path in paths:
        if path.suffix.lower() not in SUFFIXES:
            continue
        try:
            text = read_document(path)
        except InputError as e:
            log.warning("skipped %s", e)
            continue
        name = path.name if path == root else str(path.relative_to(root))
        docs.append(Document(name, text))
    if not docs:
        raise InputError(f"--docs: no readable {'/'.join(SUFFIXES)} file under {root}")
    return docs


def _spans(text: str, pattern: re.Pattern) -> list[tuple[int, int]]:
    """The (start, end) of each piece of `text` between matches of `pattern`, blank ones dropped."""
    spans, start = [], 0
    for m in pattern.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def fixed_spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of about `size` characters, `overlap` shared with the next, cut at whitespace."""
    if not 0 <= overlap < size:
        raise InputError(f"chunk overlap must be in [0, chunk size {size}), got {overlap}")
    spans, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):  # back up to a space so no word is cut
            space = text.rfind(" ", start + size // 2, end)
            end = space if space > 0 else end
        spans.append((start, end))
        if end == len(text):
            break
        start = max(end - overlap, start + 1)
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _group(sentences: list[tuple[int, int]], size: int, cut: set[int]) -> list[tuple[int, int]]:
    """Consecutive sentences joined up to `size` characters, a new chunk also before each
    sentence index in `cut`."""
    chunks: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(sentences):
        if chunks and i not in cut and b - chunks[-1][0] <= size:
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return chunks


def sentence_spans(text: str, size: int) -> list[tuple[int, int]]:
    """Whole sentences joined into chunks of at most `size` characters (a longer sentence alone)."""
    return _group(_spans(text, SENTENCE_END), size, set())


def semantic_spans(
    text: str, size: int, embed: Callable[[list[str]], np.ndarray], percentile: float = 80.0
) -> list[tuple[int, int]]:
    """Sentences joined as `sentence_spans` does, but also cut where the embedding of one
    sentence is far from the next: distances above the `percentile`-th of the document's
    (Kamradt's semantic chunking, as in LangChain's SemanticChunker)."""
    sentences = _spans(text, SENTENCE_END)
    if len(sentences) < 3:
        return _group(sentences, size, set())
    v = embed([text[a:b] for a, b in sentences])
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    distance = 1.0 - (v[:-1] * v[1:]).sum(1)  # [num_sentences - 1]
    threshold = np.percentile(distance, percentile)
    cut = {i + 1 for i in np.flatnonzero(distance > threshold)}
    return _group(sentences, size, cut)


def chunk_document(
    doc: Document,
    method: str = "sentence",
    size: int = 800,
    overlap: int = 100,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> list[Chunk]:
    """`doc` cut into chunks by `method` (fixed, sentence or semantic: that one needs `embed`)."""
    if size < 1:
        raise InputError(f"chunk size must be >= 1, got {size}")
    if method == "fixed":
        spans = fixed_spans(doc.text, size, overlap)
    elif method == "sentence":
        spans = sentence_spans(doc.text, size)
    elif method == "semantic":
        assert embed is not None, "semantic chunking needs an embedder"
        spans = semantic_spans(doc.text, size, embed)
    else:
        raise InputError(f"chunking must be one of {', '.join(CHUNKINGS)}, got {method!r}")
    newlines = [m.start() for m in re.finditer("\n", doc.text)]
    return [
        Chunk(doc.source, a, b, 1 + bisect.bisect_left(newlines, a), doc.text[a:b].strip())
        for a, b in spans
    ]
