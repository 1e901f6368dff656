"""Evaluation tasks as plain data files: JSON Lines or CSV, one example a line.

Fields by kind (gen and judge examples keep any others: a judge file may carry answer_a and
answer_b):
  mc     context (str), choices (list of str; in CSV a JSON array), answer (int: the right index)
  gen    prompt (str), target (str)
  judge  prompt (str)

Continuations are scored as lm-evaluation-harness does: `context + " " + choice` (a space is the
target delimiter). A few tasks built from the bundled Shakespeare corpus ship with kiln
(BUNDLED, src/kiln/data/eval/); `build_bundled(dir)` writes them again, deterministically.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import InputError

FIELDS = {"mc": ("context", "choices", "answer"), "gen": ("prompt", "target"), "judge": ("prompt",)}
DATA = Path(__file__).resolve().parent.parent / "data"
BUNDLED_DIR = DATA / "eval"


@dataclass(frozen=True)
class Bundled:
    file: str
    kind: str
    metrics: tuple[str, ...] = ()  # generation tasks: the metrics it is scored by
    max_tokens: int = 16
    regex: str | None = None  # generation tasks: what of the output is compared


BUNDLED = {
    "shakespeare_next_line": Bundled("shakespeare_next_line.jsonl", "mc"),
    "shakespeare_quotes": Bundled(
        "shakespeare_quotes.jsonl", "gen", ("exact_match",), max_tokens=4, regex=r"[A-Za-z'-]+"
    ),
    "shakespeare_continue": Bundled(
        "shakespeare_continue.jsonl", "gen", ("bleu", "rouge_l"), max_tokens=32
    ),
}


def resolve(task: str, kind: str) -> tuple[str, Path, Bundled | None]:
    """(name, path, bundled entry or None) of a bundled task name or a data file path."""
    if task in BUNDLED:
        b = BUNDLED[task]
        if b.kind != kind:
            raise InputError(f"task {task!r} is a {b.kind} task, not {kind}")
        return task, BUNDLED_DIR / b.file, b
    path = Path(task)
    if not path.is_file():
        names = ", ".join(n for n, b in BUNDLED.items() if b.kind == kind)
        raise InputError(f"task {task!r}: no such file (bundled {kind} tasks: {names})")
    return path.stem, path, None


def load(path: str | Path, kind: str) -> list[dict]:
    """The examples of a .jsonl / .json (one object a line) or .csv task file, each checked for
    the fields its kind needs; a missing or ill-typed field is an InputError naming it and the
    line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            rows.append((reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: not a JSON object")
            rows.append((n, obj))
    if not rows:
        raise InputError(f"{path}: no examples")
    return [_check(path, n, row, kind) for n, row in rows]


def _check(path: Path, n: int, row: dict, kind: str) -> dict:
    where = f"{path}:{n}"
    for name in FIELDS[kind]:
        if name not in row:
            raise InputError(f"{where}: missing field {name!r} (a {kind} task needs "
                             f"{', '.join(FIELDS[kind])})")  # fmt: skip
    if kind == "mc":
        choices, answer = row["choices"], row["answer"]
        if isinstance(choices, str):  # CSV: a JSON array
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                choices = None
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices)):  # fmt: skip
            raise InputError(f"{where}: field 'choices' must be a list of at least 2 strings")
        try:
            answer = int(answer)
        except (TypeError, ValueError):
            answer = -1
        if not 0 <= answer < len(choices):
            raise InputError(f"{where}: field 'answer' must be an index in [0, {len(choices)})")
        if not str(row["context"]):
            raise InputError(f"{where}: field 'context' is empty")
        return {"context": str(row["context"]), "choices": choices, "answer": answer}
    return {**row, **{k: str(row[k]) for k in FIELDS[kind]}}  # extra fields ride along


# --- the bundled tasks, built from the Shakespeare corpus --------------------------------------


def speeches(text: str) -> list[list[str]]:
    """The speeches of a Gutenberg play: blocks after a speaker line ("Ham."), stage directions
    and short fragments dropped, verse lines kept whole."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][\w .'-]{0,24}\.", lines[0]):
            continue
        verse = [ln for ln in lines[1:] if not ln.startswith("[") and len(ln.split()) >= 4]
        if len(verse) >= 4:
            out.append(verse)
    return out


def build_bundled(out_dir: str | Path = BUNDLED_DIR, per_task: int = 40, seed: int = 0) -> None:
    """Write the bundled tasks (40 examples each) from src/kiln/data/shakespeare."""
    rng = random.Random(seed)
    plays = sorted((DATA / "shakespeare").glob("*_gut.txt"))
    pool = [(p.stem[: -len("_gut")], s) for p in plays for s in speeches(p.read_text())]
    rng.shuffle(pool)
    all_lines = [ln for _, s in pool for ln in s]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mc, quotes, cont = [], [], []
    for play, speech in pool:
        title = play.replace("_", " ").title()
        i = rng.randrange(len(speech) - 3)
        if len(mc) < per_task:
            right = speech[i + 2]
            wrong = [ln for ln in rng.sample(all_lines, 6) if ln not in speech][:3]
            choices = [*wrong]
            answer = rng.randrange(len(choices) + 1)
            choices.insert(answer, right)
            context = f"From {title}:\n{speech[i]}\n{speech[i + 1]}\nNext line:"
            mc.append({"context": context, "choices": choices, "answer": answer})
        elif len(quotes) < per_task:
            words = speech[i + 1].split()
            last = re.sub(r"[^A-Za-z'-]", "", words[-1]).strip("-'")
            if len(last) >= 3:
                prompt = f"Complete the line from {title}.\n{speech[i]}\n{' '.join(words[:-1])}"
                quotes.append({"prompt": prompt, "target": last})
        elif len(cont) < per_task:
            prompt = f"Continue the speech from {title}.\n{speech[i]}\n{speech[i + 1]}\n"
            cont.append({"prompt": prompt, "target": f"{speech[i + 2]}\n{speech[i + 3]}"})
    for name, rows in [("shakespeare_next_line", mc), ("shakespeare_quotes", quotes),
                       ("shakespeare_continue", cont)]:  # fmt: skip
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        (out_dir / BUNDLED[name].file).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build_bundled()
