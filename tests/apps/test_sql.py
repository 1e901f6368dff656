"""Text-to-SQL: read-only enforcement and the time limit, schema linking, self-correction after
an execution error, and execution accuracy on the bundled questions (a stub model that writes
the right query only when the prompt shows every table it needs)."""

from __future__ import annotations

import re
import sqlite3

import pytest

from apps.stub_server import StubServer
from kiln.apps.client import OpenAIClient
from kiln.apps.sql import (
    DATA,
    SQLError,
    TextToSQL,
    build_bundled_database,
    connect_readonly,
    execute_readonly,
    execution_accuracy,
    extract_sql,
    link_schema,
    load_jsonl,
    read_schema,
)

QUESTIONS = load_jsonl(DATA / "sql_questions.jsonl")


@pytest.fixture
def db(tmp_path):
    return build_bundled_database(tmp_path / "shop.db")


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM customers",
        "UPDATE products SET price = 0",
        "DROP TABLE orders",
        "INSERT INTO suppliers VALUES (9, 'x', 'y')",
        "CREATE TEMP TABLE t (x)",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA user_version = 7",
    ],  # fmt: skip
)
def test_writes_are_refused(db, sql):
    con = connect_readonly(db)
    with pytest.raises(SQLError, match="read-only"):
        execute_readonly(con, sql)
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM customers").fetchone() == (6,)


def test_several_statements_and_long_queries_are_refused(db):
    con = connect_readonly(db)
    with pytest.raises(SQLError, match="one statement"):
        execute_readonly(con, "SELECT 1; DELETE FROM customers")
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c"
    with pytest.raises(SQLError, match="ran past the 0.2 s limit"):
        execute_readonly(con, forever, timeout_s=0.2)
    assert execute_readonly(con, "SELECT COUNT(*) FROM orders") == [(8,)]  # still usable


def test_schema_linking_keeps_the_tables_a_question_needs(db):
    tables = read_schema(connect_readonly(db))
    for q in QUESTIONS:
        used = {t.name for t in tables if re.search(rf"\b{t.name}\b", q["sql"])}
        assert used <= set(link_schema(q["question"], tables)), q["question"]
    linked = link_schema("Which suppliers are in Germany?", tables)
    assert linked == {"suppliers": ["id", "name", "country"]}
    assert "employees" not in link_schema("Which orders are pending?", tables)


def test_extract_sql():
    assert extract_sql("Sure:\n```sql\nSELECT 1;\n```") == "SELECT 1"
    assert extract_sql("The query is SELECT name FROM t;") == "SELECT name FROM t"


def stub_model(gold: dict[str, str], wrong_first: set[str]):
    """Answers a question with its gold SQL when the prompt's schema shows every table the SQL
    uses (else guesses a table it cannot see); for questions in `wrong_first`, first a query
    with a typo, then, shown the error, the gold one."""

    def chat(req):
        prompt = req["messages"][0]["content"]
        question = re.search(r"Question: (.*)\nSQL:$", prompt).group(1)
        sql = gold[question]
        shown = set(re.findall(r"CREATE TABLE (\w+)", prompt))
        if not set(re.findall(r"(?:FROM|JOIN) (\w+)", sql)) <= shown:
            return {"content": "SELECT * FROM the_table_i_could_not_see"}
        if question in wrong_first and len(req["messages"]) == 1:
            return {"content": f"```sql\n{sql.replace('SELECT', 'SELEC', 1)}\n```"}
        if len(req["messages"]) > 1:
            assert 'near "SELEC": syntax error' in req["messages"][-1]["content"]
        return {"content": sql}

    return chat


def test_self_correction_after_an_execution_error(db):
    q = "Which suppliers are in Germany?"
    gold = {e["question"]: e["sql"] for e in QUESTIONS}
    with StubServer(chat=stub_model(gold, {q})) as stub, OpenAIClient(stub.url) as client:
        result = TextToSQL(client, db).ask(q)
    assert result.rows == [("Brightlight",)]
    assert [err for _, err in result.attempts] == ['near "SELEC": syntax error', None]


def test_execution_accuracy_on_the_bundled_questions(db):
    gold = {e["question"]: e["sql"] for e in QUESTIONS}
    wrong_first = {q["question"] for q in QUESTIONS[::3]}
    with StubServer(chat=stub_model(gold, wrong_first)) as stub, OpenAIClient(stub.url) as c:
        t2s = TextToSQL(c, db)
        assert execution_accuracy(t2s, QUESTIONS) == 1.0
        no_retry = TextToSQL(c, db, max_attempts=1)
        assert execution_accuracy(no_retry, QUESTIONS) == 1 - len(wrong_first) / len(QUESTIONS)
    prompts = [r["messages"][0]["content"] for _, r in stub.requests]
    assert all(p.count("Question:") == 4 for p in prompts)  # three examples and the question


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="no SQLite database"):
        connect_readonly(tmp_path / "none.db")
