"""The toy alignment runs in full (the tests run shorter ones): GRPO on "continue the count"
from a random tiny model, and PPO against a reward model learned from the bundled count
preferences. Prints each run's curve (reward, KL) at a few steps and the start -> end means.

    PYTHONPATH=src python benchmarks/rl_toy.py [--out DIR] [--only grpo|ppo]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from train.rl_toy import toy_model_dir  # noqa: E402

from kiln.cli import main as kiln_main  # noqa: E402
from kiln.train.default_model import RL_DATA  # noqa: E402

GRPO = ["--max-steps", "50", "--batch-size", "128", "--num-generations", "8",
        "--max-completion-length", "1", "--lr", "2e-2", "--warmup-steps", "2"]  # fmt: skip
REWARD = ["--data", str(RL_DATA / "count_prefs.jsonl"), "--max-steps", "60", "--batch-size",
          "16", "--lr", "3e-3", "--warmup-steps", "5", "--val-fraction", "0.1"]  # fmt: skip
PPO = ["--max-steps", "60", "--batch-size", "32", "--max-completion-length", "2", "--lr",
       "3e-3", "--warmup-steps", "2", "--num-ppo-epochs", "2"]  # fmt: skip


def run(verb: str, model: Path, out: Path, argv: list[str]) -> list[dict]:
    t = time.perf_counter()
    assert kiln_main([verb, "--model", str(model), "--out", str(out), *argv]) == 0
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    print(f"kiln {verb}: {time.perf_counter() - t:.1f} s")
    return log


def report(name: str, log: list[dict]) -> None:
    rows = [r for r in log if "reward" in r]
    print(f"\n{name}\n\n| step | reward | KL | entropy |\n|---:|---:|---:|---:|")
    for r in rows[:: max(1, len(rows) // 10)] + [rows[-1]]:
        print(f"| {r['step']} | {r['reward']:.3f} | {r.get('kl', 0):.3f} | {r['entropy']:.3f} |")
    k = min(5, len(rows))
    start = sum(r["reward"] for r in rows[:k]) / k
    end = sum(r["reward"] for r in rows[-k:]) / k
    print(f"\nmean reward of the first {k} steps {start:.3f} -> the last {k} {end:.3f}; "
          f"max KL {max(r.get('kl', 0) for r in rows):.3f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="where the runs go (a temporary folder)")
    p.add_argument("--only", choices=["grpo", "ppo"], default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="rl_toy_"))
    model = toy_model_dir(out / "toy")
    if args.only in (None, "grpo"):
        report("GRPO, continue the count", run("grpo", model, out / "grpo", GRPO))
    if args.only in (None, "ppo"):
        run("reward", model, out / "rm", REWARD)
        ppo = ["--reward-model", str(out / "rm"), *PPO]
        report("PPO, reward model from count_prefs.jsonl", run("ppo", model, out / "ppo", ppo))
    print(f"\nruns and their rl.png curves in {out}")


if __name__ == "__main__":
    main()
