"""`kiln sql`, `kiln agent` and `kiln rag eval --judge-url` end to end against a stub server
(the commands' wiring; the logic has its own tests)."""

from __future__ import annotations

import json

from apps.stub_server import StubServer
from kiln.cli import main


def test_sql_ask_shows_each_attempt_and_the_rows(capsys):
    replies = iter(["SELEC COUNT(*) FROM customers", "SELECT COUNT(*) FROM customers"])
    with StubServer(chat=lambda req: {"content": next(replies)}) as stub:
        assert main(["sql", "ask", "How many customers are there?", "--base-url", stub.url]) == 0
    out = capsys.readouterr().out
    assert '-- SELEC COUNT(*) FROM customers\n--   error: near "SELEC": syntax error' in out
    assert out.endswith("-- SELECT COUNT(*) FROM customers\n(6,)\n")


def test_agent_runs_the_calculator(capsys):
    fn = {"name": "calculator", "arguments": '{"expression": "17 * 23"}'}
    call = {"id": "c1", "type": "function", "function": fn}

    def chat(req):
        done = req["messages"][-1]["role"] == "tool"
        return {"content": "391"} if done else {"tool_calls": [call]}

    with StubServer(chat=chat) as stub:
        assert main(["agent", "What is 17 * 23?", "--base-url", stub.url]) == 0
    assert capsys.readouterr().out == '> calculator({"expression": "17 * 23"}) -> 391\n391\n'


def test_rag_eval_with_a_faithfulness_judge(plays_dir, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    row = {"question": "Double, double, toil and trouble?", "source": "macbeth_gut.txt",
           "answer": "toil and trouble"}  # fmt: skip
    qa.write_text(json.dumps(row))
    index = tmp_path / "idx"
    assert main(["rag", "index", "--docs", str(plays_dir / "macbeth_gut.txt"),
                 "--out", str(index)]) == 0  # fmt: skip

    def chat(req):
        prompt = req["messages"][-1]["content"]
        return {"content": "yes" if "Reply with exactly one word" in prompt else "Witches [1]."}

    with StubServer(chat=chat) as stub:
        argv = ["rag", "eval", "--index", str(index), "--qa", str(qa), "--mode", "bm25",
                "--base-url", stub.url, "--judge-url", stub.url]  # fmt: skip
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| recall@1 | recall@5 | recall@10 | mrr | faithfulness | judged |" in out
    assert "| bm25 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in out
