"""Ingestion (txt, md, PDF; empty, binary and broken files skipped with a reason) and the
three chunkings."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kiln.apps.documents import (
    Document,
    chunk_document,
    fixed_spans,
    load_documents,
    read_document,
    semantic_spans,
)
from kiln.errors import InputError


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, its cross-reference table exact."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]  # fmt: skip
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def test_loads_text_markdown_and_pdf_and_skips_the_rest(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Title\nmarkdown")
    (tmp_path / "c.pdf").write_bytes(tiny_pdf("Hello from a PDF"))
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "image.png").write_bytes(b"ignored")
    with caplog.at_level(logging.WARNING, logger="kiln.apps"):
        docs = load_documents(tmp_path)
    assert [d.source for d in docs] == ["a.txt", "c.pdf", "sub/b.md"]
    assert "Hello from a PDF" in docs[1].text
    log = caplog.text
    assert "empty.txt: empty" in log and "bin.txt: binary" in log
    assert "latin1.txt: not UTF-8" in log and "broken.pdf: not a readable PDF" in log


def test_no_readable_document_is_an_error(tmp_path):
    (tmp_path / "empty.md").write_text("")
    with pytest.raises(InputError, match="no readable"):
        load_documents(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_documents(tmp_path / "missing")
    with pytest.raises(InputError, match="empty"):
        read_document(tmp_path / "empty.md")


def test_fixed_chunks_overlap_and_keep_words_whole():
    text = " ".join(f"word{i}" for i in range(200))
    spans = fixed_spans(text, 100, 20)
    assert all(b - a <= 100 for a, b in spans) and spans[-1][1] == len(text)
    for (_, b0), (a1, _) in zip(spans, spans[1:]):
        assert a1 < b0  # overlap
        assert text[b0 - 1] != " " and (b0 == len(text) or text[b0] == " ")
    with pytest.raises(InputError, match="overlap"):
        fixed_spans(text, 10, 10)


def test_sentence_chunks_end_at_sentence_ends():
    doc = Document("d.txt", "One two. Three four five! Six? " * 20)
    chunks = chunk_document(doc, "sentence", size=60)
    assert all(len(c.text) <= 60 and c.text[-1] in ".!?" for c in chunks)
    assert " ".join(c.text for c in chunks).split() == doc.text.split()


def test_semantic_chunks_cut_where_the_topic_changes():
    cats = ["Cats purr.", "Cats nap.", "Cats hunt mice.", "Cats groom fur."]
    ships = ["Ships sail.", "Ships dock.", "Ships carry cargo.", "Ships need crews."]
    text = " ".join(cats + ships)

    def embed(texts):  # topic vectors: a cat sentence and a ship sentence are orthogonal
        return np.array([[1.0, 0.0] if "Cats" in t else [0.0, 1.0] for t in texts])

    spans = semantic_spans(text, size=10_000, embed=embed)
    assert [text[a:b] for a, b in spans] == [" ".join(cats), " ".join(ships)]


def test_chunks_cite_their_line():
    doc = Document("play.txt", "Act one.\nLine two.\n\nLine four here.")
    chunks = chunk_document(doc, "sentence", size=10)
    assert [(c.line, c.text) for c in chunks] == [(1, "Act one."), (2, "Line two."),
                                                  (4, "Line four here.")]  # fmt: skip
    assert chunks[2].cite() == "play.txt:4"
