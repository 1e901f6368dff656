"""Text-to-SQL over SQLite: schema linking (only the tables and columns a question touches go
into the prompt), few-shot examples, execution-guided self-correction (run, read the error,
retry), and read-only execution with a time limit; execution accuracy on a question set."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import InputError

if TYPE_CHECKING:
    from kiln.apps.client import OpenAIClient

DATA = Path(__file__).parent.parent / "data" / "apps"


class SQLError(InputError):
    """A query the database refused or that failed (the text goes back to the model)."""


# actions a read-only query needs: reading, functions, SELECT itself and recursive CTEs
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            sqlite3.SQLITE_RECURSIVE}  # fmt: skip


def _authorize(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """A connection that cannot write: the file opened with mode=ro, and an authorizer that
    allows nothing but reads (so ATTACH, PRAGMA writes and temp tables are refused too)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no SQLite database at {path}")
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                          check_same_thread=False)  # fmt: skip
    con.set_authorizer(_authorize)
    return con


def execute_readonly(
    con: sqlite3.Connection, sql: str, timeout_s: float = 2.0, max_rows: int = 1000
) -> list[tuple]:
    """Run one statement on a read-only connection; SQLError when it fails, is not allowed,
    or runs past `timeout_s` (a progress handler interrupts it)."""
    deadline = time.monotonic() + timeout_s
    con.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        return con.execute(sql).fetchmany(max_rows)
    except sqlite3.Warning as e:  # more than one statement
        raise SQLError(f"one statement at a time ({e})") from None
    except sqlite3.DatabaseError as e:
        if "interrupted" in str(e):
            raise SQLError(f"the query ran past the {timeout_s:g} s limit") from None
        if "not authorized" in str(e) or "readonly" in str(e):
            raise SQLError(f"read-only: only SELECT queries may run ({e})") from None
        raise SQLError(str(e)) from None
    finally:
        con.set_progress_handler(None, 0)


# ---- schema linking ------------------------------------------------------------------------


@dataclass
class Table:
    name: str
    columns: list[tuple[str, str]]  # (name, declared type)
    keys: set[str] = field(default_factory=set)  # primary and foreign key columns
    references: set[str] = field(default_factory=set)  # tables its foreign keys point to

    def create(self, columns: list[str] | None = None) -> str:
        cols = [(n, t) for n, t in self.columns if columns is None or n in columns]
        body = ", ".join(f"{n} {t}".strip() for n, t in cols)
        return f"CREATE TABLE {self.name} ({body});"


def read_schema(con: sqlite3.Connection) -> list[Table]:
    """The database's tables with their columns and foreign keys."""
    con.set_authorizer(None)  # PRAGMA table_info is not a SELECT; the schema is no secret
    try:
        names = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        tables = []
        for name in names:
            info = con.execute(f"PRAGMA table_info({name!r})").fetchall()
            fks = con.execute(f"PRAGMA foreign_key_list({name!r})").fetchall()
            table = Table(name, [(r[1], r[2]) for r in info])
            table.keys = {r[1] for r in info if r[5]} | {r[3] for r in fks}
            table.references = {r[2] for r in fks}
            tables.append(table)
    finally:
        con.set_authorizer(_authorize)
    return tables


GENERIC = {"id", "name"}  # column words too common to say which table a question means


def _words(text: str) -> set[str]:
    """Lowercased words with crude stems (orders, ordered -> order), names split at '_'."""
    words = set(re.findall(r"[a-z0-9]+", text.lower().replace("_", " ")))
    stems = {w[:-1] for w in words if w.endswith("s") and len(w) > 3}
    stems |= {w[:-2] for w in words if w.endswith("ed") and len(w) > 4}
    return words | stems


def _named_columns(t: Table, q: set[str]) -> list[str]:
    """`t`'s non-key columns that the question's words name (beyond the table's own name)."""
    own = _words(t.name) | GENERIC
    return [c for c, _ in t.columns if c not in t.keys and (_words(c) - own) & q]


def link_schema(question: str, tables: list[Table]) -> dict[str, list[str]]:
    """The tables and columns the prompt shows for `question`: tables whose name or a column's
    name appears in it, join tables between two of those, the tables they reference (to join
    through), and of each table its keys, name and named columns (all of them when none is
    named). All tables when the question names none."""
    q = _words(question)
    hit = {t.name for t in tables if _words(t.name) & q or _named_columns(t, q)}
    if not hit:
        return {t.name: [c for c, _ in t.columns] for t in tables}
    by_name = {t.name: t for t in tables}
    for t in tables:  # a table that references two linked tables is their join table
        if t.name not in hit and len(t.references & hit) >= 2:
            hit.add(t.name)
    for name in list(hit):
        hit |= by_name[name].references
    linked = {}
    for t in tables:
        if t.name in hit:
            named = _named_columns(t, q)
            keep = set(named) | t.keys | {"name"}
            linked[t.name] = [c for c, _ in t.columns if not named or c in keep]
    return linked


# ---- prompting and self-correction ---------------------------------------------------------


def load_jsonl(path: str | Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in open(path) if line.strip()]


def pick_examples(question: str, examples: list[dict[str, str]], k: int) -> list[dict[str, str]]:
    """The `k` examples sharing the most words with `question` (few-shot by similarity)."""
    q = _words(question)
    return sorted(examples, key=lambda e: -len(_words(e["question"]) & q))[:k]


def extract_sql(text: str) -> str:
    """The SQL in a model's reply: a ```sql block, else from the first SELECT/WITH on."""
    m = re.search(r"```(?:sql)?\s*(.*?)```", text, re.S | re.I)
    if m:
        return m.group(1).strip().rstrip(";")
    m = re.search(r"\b(SELECT|WITH)\b.*", text, re.S | re.I)
    return (m.group(0) if m else text).strip().rstrip(";")


@dataclass
class SQLResult:
    question: str
    sql: str
    rows: list[tuple] | None  # None when every attempt failed
    attempts: list[tuple[str, str | None]]  # (sql, error or None) per attempt


class TextToSQL:
    """Questions to SQL on one SQLite database, through a chat model."""

    def __init__(
        self,
        client: OpenAIClient,
        db_path: str | Path,
        examples: list[dict[str, str]] | None = None,
        num_examples: int = 3,
        max_attempts: int = 3,
        timeout_s: float = 2.0,
    ):
        self.client, self.con = client, connect_readonly(db_path)
        self.tables = read_schema(self.con)
        self.examples = (
            examples if examples is not None else load_jsonl(DATA / "sql_examples.jsonl")
        )
        self.num_examples, self.max_attempts, self.timeout_s = num_examples, max_attempts, timeout_s

    def prompt(self, question: str) -> str:
        linked = link_schema(question, self.tables)
        schema = "\n".join(t.create(linked[t.name]) for t in self.tables if t.name in linked)
        examples = pick_examples(question, self.examples, self.num_examples)
        shots = "\n\n".join(f"Question: {e['question']}\nSQL: {e['sql']}" for e in examples)
        return (f"You write SQLite queries. The schema:\n{schema}\n\nExamples:\n\n{shots}\n\n"
                f"Write one SQLite SELECT query for the question; reply with the SQL only.\n\n"
                f"Question: {question}\nSQL:")  # fmt: skip

    def ask(self, question: str, **params: Any) -> SQLResult:
        """Generate, run, and on an error show the model the error and retry."""
        messages = [{"role": "user", "content": self.prompt(question)}]
        attempts: list[tuple[str, str | None]] = []
        for _ in range(self.max_attempts):
            reply = self.client.chat(messages, **params).get("content") or ""
            sql = extract_sql(reply)
            try:
                rows = execute_readonly(self.con, sql, self.timeout_s)
            except SQLError as e:
                attempts.append((sql, str(e)))
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": f"That query failed: {e}\n"
                              "Reply with a corrected SQL query only."}]  # fmt: skip
                continue
            attempts.append((sql, None))
            return SQLResult(question, sql, rows, attempts)
        return SQLResult(question, attempts[-1][0], None, attempts)


def same_result(got: list[tuple] | None, want: list[tuple], ordered: bool) -> bool:
    """Execution match: equal rows (as multisets unless the gold query orders them), floats
    compared to 6 places."""
    if got is None:
        return False

    def norm(rows):
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in r) for r in rows]

    return norm(got) == norm(want) if ordered else Counter(norm(got)) == Counter(norm(want))


def execution_accuracy(t2s: TextToSQL, questions: list[dict[str, str]], **params: Any) -> float:
    """The share of questions whose generated query returns the gold query's rows."""
    from tqdm import tqdm

    right = 0
    for q in tqdm(questions, desc="text-to-sql", unit="q", disable=len(questions) < 20):
        want = execute_readonly(t2s.con, q["sql"], t2s.timeout_s)
        got = t2s.ask(q["question"], **params).rows
        right += same_result(got, want, "order by" in q["sql"].lower())
    return right / len(questions)


def build_bundled_database(path: str | Path) -> Path:
    """The bundled shop database (data/apps/shop.sql) written to `path`."""
    path = Path(path)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript((DATA / "shop.sql").read_text())
    con.close()
    return path
