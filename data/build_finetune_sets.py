"""Write the bundled fine-tuning sets from the Shakespeare corpus (deterministic).

    python data/build_finetune_sets.py

data/sft/shakespeare.jsonl  {"messages": [...]}: "Continue this line from <play>:" -> next line
data/dpo/shakespeare.jsonl  {"prompt": [...], "chosen", "rejected"}: the same prompts; chosen is
                            the true next line, rejected the same line with its words shuffled
"""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
PLAYS = ["hamlet", "macbeth", "romeo_and_juliet", "othello", "lear", "julius_caesar"]
SYSTEM = "You are a Shakespearean actor who knows every play by heart."
PER_PLAY = 120


def line_pairs(text: str) -> list[tuple[str, str]]:
    """Consecutive verse lines inside one speech (a speaker tag, then lines, then a blank)."""
    pairs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 3 or not re.fullmatch(r"[A-Z][\w .']{0,20}\.", lines[0]):
            continue
        verse = lines[1:]
        for a, b in zip(verse, verse[1:]):
            if all(20 <= len(s) <= 70 and "[" not in s and "]" not in s for s in (a, b)):
                pairs.append((a, b))
    return pairs


def shuffled_words(line: str, rng: random.Random) -> str:
    words = line.split()
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != line:
            break
    return " ".join(words)


def main() -> None:
    rng = random.Random(0)
    sft, dpo = [], []
    for play in PLAYS:
        text = (HERE / "shakespeare" / f"{play}_gut.txt").read_text(encoding="utf-8")
        title = play.replace("_", " ").title().replace(" And ", " and ")
        pairs = line_pairs(text)
        for line, nxt in rng.sample(pairs, min(PER_PLAY, len(pairs))):
            user = {"role": "user", "content": f"Continue this line from {title}:\n{line}"}
            prompt = [user] if rng.random() < 0.5 else [{"role": "system", "content": SYSTEM}, user]
            sft.append({"messages": [*prompt, {"role": "assistant", "content": nxt}]})
            dpo.append({"prompt": prompt, "chosen": nxt, "rejected": shuffled_words(nxt, rng)})
    for rows, out in (
        (sft, HERE / "sft" / "shakespeare.jsonl"),
        (dpo, HERE / "dpo" / "shakespeare.jsonl"),
    ):
        rng.shuffle(rows)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out}: {len(rows)} records")


if __name__ == "__main__":
    main()
