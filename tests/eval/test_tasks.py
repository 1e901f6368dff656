"""`kiln eval mc|gen|judge` and their task files: multiple choice against
lm-evaluation-harness's `hf` model, generation metrics, the judge's position swap, bad input."""

from __future__ import annotations

import json
import math

import pytest
from stub_openai import StubServer

from kiln.cli import main
from kiln.errors import InputError
from kiln.eval import tasks
from kiln.eval.backends import LocalBackend
from kiln.eval.judge import Judge, run_judge
from kiln.eval.score import run_gen, run_mc

MC = [
    {"context": "Question: What is the capital of Denmark?\nAnswer:",
     "choices": ["Copenhagen", "Elsinore", "Paris", "Rome"], "answer": 0},
    {"context": "Question: Who is the prince of Denmark?\nAnswer:",
     "choices": ["Laertes", "Hamlet", "Horatio", "Osric the courtier"], "answer": 1},
    {"context": "To be, or not to be, that is the ",
     "choices": ["question", "answer", "point"], "answer": 0},
    {"context": "Whose skull does Hamlet hold?",
     "choices": ["Polonius", "Osric", "poor Yorick", "Horatio"], "answer": 2},
]  # fmt: skip

LM_EVAL_YAML = """task: kiln_eval_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def model_dir(tokenized_model_dir):
    return tokenized_model_dir("llama")


@pytest.fixture(scope="module")
def local(model_dir):
    return LocalBackend(str(model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC))
    return path


def test_mc_matches_lm_eval_hf(local, model_dir, mc_file, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    (tmp_path / "kiln_eval_mc.yaml").write_text(LM_EVAL_YAML.format(data=mc_file))
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
        tasks=["kiln_eval_mc"], task_manager=TaskManager(include_path=str(tmp_path),
                                                         include_defaults=False),
        log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    )  # fmt: skip
    ref = out["results"]["kiln_eval_mc"]
    samples = sorted(out["samples"]["kiln_eval_mc"], key=lambda s: s["doc_id"])
    r = run_mc(local, tasks.load(mc_file, "mc"), progress=False)
    assert r["examples"] == 4 and r["skipped"] == 0
    assert r["acc"] == ref["acc,none"] and r["acc_norm"] == ref["acc_norm,none"]
    for got, s in zip(r["loglikelihoods"], samples):
        want = [lp for [(lp, _)] in s["resps"]]
        assert got == pytest.approx(want, abs=1e-4)


def test_mc_skips_examples_longer_than_the_context(local):
    long = {"context": "to be " * 400, "choices": ["a", "b"], "answer": 0}
    r = run_mc(local, [MC[0], long], progress=False)
    assert r["examples"] == 1 and r["skipped"] == 1 and r["loglikelihoods"][1] is None
    assert r["acc"] in (0.0, 1.0)


def test_gen_metrics_against_the_models_own_output(local):
    prompts = ["To be, or not to be", "Question: Who is the prince?\nAnswer:"]
    outs = local.generate(prompts, 6, [])
    assert all(outs)
    right = [{"prompt": p, "target": o} for p, o in zip(prompts, outs)]
    r = run_gen(local, right, ("exact_match", "bleu", "rouge_l"), max_tokens=6, stop=(),
                progress=False)  # fmt: skip
    assert r["outputs"] == outs and r["examples"] == 2
    assert r["exact_match"] == 1.0 and r["rouge_l"] == pytest.approx(1.0)
    wrong = [{"prompt": p, "target": "nothing like it at all"} for p in prompts]
    r = run_gen(local, wrong, ("exact_match", "rouge_l"), max_tokens=6, stop=(), progress=False)
    assert r["exact_match"] == 0.0 and r["rouge_l"] < 1
    # regex extraction: compare only the first word
    first = [{"prompt": p, "target": o.split()[0] + " and more"} for p, o in zip(prompts, outs)]
    r = run_gen(local, first, max_tokens=6, stop=(), regex=r"\S+", progress=False)
    assert r["exact_match"] == 1.0


def test_gen_skips_prompts_past_the_context(local):
    r = run_gen(local, [{"prompt": "be " * 300, "target": "x"}], max_tokens=4, progress=False)
    assert r["skipped"] == 1 and r["examples"] == 0 and math.isnan(r["exact_match"])


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"context": "a", "choices": ["x", "y"]}'], "mc.jsonl:1: missing field 'answer'"),
        (['{"context": "a", "choices": ["x", "y"], "answer": 0}', "",
          '{"choices": ["x", "y"], "answer": 1}'], "mc.jsonl:3: missing field 'context'"),
        (['{"context": "a", "choices": ["x"], "answer": 0}'], "'choices' must be a list"),
        (['{"context": "a", "choices": ["x", "y"], "answer": 2}'], "'answer' must be an index"),
        (["not json"], "mc.jsonl:1: not a JSON object"),
    ],
)  # fmt: skip
def test_task_file_errors_name_field_and_line(tmp_path, lines, message):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        tasks.load(path, "mc")


def test_csv_tasks(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('context,choices,answer\nQ?,"[""a"", ""b""]",1\nR?,"[""c"", ""d""]",\n')
    with pytest.raises(InputError, match="t.csv:3: missing field 'answer'"):
        tasks.load(path, "mc")
    path.write_text("prompt,target\nhello,world\n")
    assert tasks.load(path, "gen") == [{"prompt": "hello", "target": "world"}]


def test_bundled_tasks_are_built_from_the_corpus(tmp_path):
    tasks.build_bundled(tmp_path)
    for name, b in tasks.BUNDLED.items():
        assert (tmp_path / b.file).read_text() == (tasks.BUNDLED_DIR / b.file).read_text(), name
        assert len(tasks.load(tasks.BUNDLED_DIR / b.file, b.kind)) == 40


def test_judge_position_swap_cancels_a_first_answer_bias():
    prompts, a, b = ["p1", "p2", "p3"], ["short", "a long answer", "x"], ["longer", "b", "yy"]
    with StubServer(chat=lambda content: "1") as stub:  # always "Answer 1"
        r = run_judge(Judge(stub.url), prompts, a, b, progress=False)
        assert len(stub.requests) == 6  # every pair judged in both orders
    assert r["win_rate"] == 0.5 and r["ties"] == 3 and r["inconsistent"] == 3
    assert (r["ci_low"], r["ci_high"]) == (0.5, 0.5)

    def longer(content):  # prefers the longer answer, whatever its position
        first = content.split("[Answer 1]\n")[1].split("\n\n[Answer 2]")[0]
        second = content.split("[Answer 2]\n")[1].split("\n\nReply")[0]
        return "1" if len(first) > len(second) else "2"

    with StubServer(chat=longer) as stub:
        r = run_judge(Judge(stub.url), prompts, a, b, progress=False)
    assert r["win_rate"] == pytest.approx(1 / 3) and r["wins"] == 1 and r["losses"] == 2
    assert r["inconsistent"] == 0 and 0 <= r["ci_low"] < 1 / 3 < r["ci_high"] <= 1


def test_judge_cli_with_answers_in_the_task_file(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "answer_a": "a" * (i + 2), "answer_b": "b"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, png = tmp_path / "r.json", tmp_path / "r.png"

    def longer(content):
        first = content.split("[Answer 1]\n")[1].split("\n\n[Answer 2]")[0]
        return "1" if len(first) > 1 else "2"

    with StubServer(chat=longer) as stub:
        argv = ["eval", "judge", "--task", str(path), "--judge-url", stub.url]
        assert main([*argv, "--json", str(out), "--plot", str(png)]) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "pairs" and r["win_rate"] == 1.0 and r["examples"] == 4
    assert png.read_bytes()[:4] == b"\x89PNG" and "win_rate" in capsys.readouterr().out


def test_server_without_logprobs_names_the_missing_feature(local):
    from kiln.eval.backends import OpenAIBackend

    with StubServer() as stub:
        b = OpenAIBackend(stub.url)
        b.encode = local.encode
        with pytest.raises(InputError, match="did not return prompt logprobs"):
            run_mc(b, [MC[0]], progress=False)
        with pytest.raises(InputError, match="no /tokenize"):
            OpenAIBackend(stub.url).encode("hello")


def test_eval_mc_and_gen_cli(model_dir, mc_file, tmp_path, capsys):
    out, png = tmp_path / "mc.json", tmp_path / "mc.png"
    argv = ["eval", "mc", "--model", str(model_dir), "--task", str(mc_file),
            "--task", "shakespeare_next_line", "--limit", "3"]  # fmt: skip
    assert main([*argv, "--json", str(out), "--plot", str(png)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["mc", "shakespeare_next_line"]
    assert all(set(r) == {"task", "acc", "acc_norm", "examples", "skipped"} for r in rows)
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "gen.json"
    argv = ["eval", "gen", "--model", str(model_dir), "--limit", "2", "--json", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows[0]) == {"task", "exact_match", "examples", "skipped"}
    assert set(rows[1]) == {"task", "bleu", "rouge_l", "examples", "skipped"}
    assert "shakespeare_continue" in capsys.readouterr().out


def test_eval_cli_bad_input_is_one_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["eval", "gen", "--model", str(model_dir), "--task", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:1: missing field 'target'" in err
    assert main(["eval", "mc", "--model", str(model_dir), "--task", "nope.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "mc", "--task", str(bad)]) == 2
    assert "missing field 'context'" in capsys.readouterr().err


def test_judge_cli_generates_both_sides(model_dir, tmp_path):
    out = tmp_path / "j.json"
    with StubServer(chat=lambda content: "1") as stub:
        argv = ["eval", "judge", "--task", "shakespeare_quotes", "--limit", "2", "--a",
                str(model_dir), "--b", str(model_dir), "--max-tokens", "4"]  # fmt: skip
        assert main([*argv, "--judge-url", stub.url, "--json", str(out)]) == 0
        assert len(stub.requests) == 4
    r = json.loads(out.read_text())
    assert r["win_rate"] == 0.5 and r["examples"] == 2


def test_judge_cli_csv_answers_and_a_missing_side(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,answer_a,answer_b\np1,aaa,b\np2,aaaa,bb\n")
    with StubServer(chat=lambda content: "1") as stub:
        argv = ["eval", "judge", "--task", str(path), "--judge-url", stub.url]
        assert main(argv) == 0
        assert "0.5000" in capsys.readouterr().out
        path.write_text("prompt,answer_a\np1,aaa\n")
        assert main(argv) == 2
    assert "give --b (a model directory or URL), or answer_b" in capsys.readouterr().err
