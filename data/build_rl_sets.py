"""Write the bundled toy RL sets (deterministic): tasks a tiny model can learn on a CPU.

    python data/build_rl_sets.py

data/rl/count.jsonl        {"prompt": "3 4 5"}: continue the count with one digit (reward
                           count_continues)
data/rl/sum.jsonl          {"prompt": "3+4=", "answer": "7"}: the sum of two small numbers
                           (reward number_sum, or exact_match on answer)
data/rl/count_prefs.jsonl  {"prompt", "chosen", "rejected"}: for the count prompts, the next
                           number is preferred to a wrong one (a reward model's data)
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "rl"
N = 256


def count_prompt(rng: random.Random) -> tuple[str, int]:
    """2 to 4 consecutive numbers whose next one is a single digit."""
    length = rng.randrange(2, 5)
    start = rng.randrange(0, 10 - length)
    numbers = list(range(start, start + length))
    return " ".join(map(str, numbers)), numbers[-1] + 1


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(exist_ok=True)
    count, prefs, sums = [], [], []
    for _ in range(N):
        prompt, nxt = count_prompt(rng)
        count.append({"prompt": prompt})
        wrong = rng.choice([n for n in range(10) if n != nxt])
        prefs.append({"prompt": prompt, "chosen": f" {nxt}", "rejected": f" {wrong}"})
        a, b = rng.randrange(0, 10), rng.randrange(0, 10)
        sums.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    for name, rows in (("count", count), ("count_prefs", prefs), ("sum", sums)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
