"""Two processes over gloo train exactly like one process with the same global batch."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from train.pretrain_helpers import ddp_worker, tiny_model, token_file, train_config, windows

from kiln.train.checkpoint import CHECKPOINT_NAME, read_checkpoint
from kiln.train.loop import train
from kiln.train.pretrain import lm_loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out_dir, key: str) -> dict[int, float]:
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, fsdp):
    data = token_file(tmp_path / "tokens.bin")
    train(tiny_model(), train_config(tmp_path / "one"), windows(data, 4), lm_loss,
          windows(data, 2, seed=1))  # fmt: skip
    mp.spawn(ddp_worker, args=(2, free_port(), data, tmp_path / "two", fsdp), nprocs=2)

    for key in ("loss", "val_loss"):
        one, two = records(tmp_path / "one", key), records(tmp_path / "two", key)
        assert one.keys() == two.keys() and one
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), (key, step)
    a, _ = read_checkpoint(tmp_path / "one" / CHECKPOINT_NAME)
    b, _ = read_checkpoint(tmp_path / "two" / CHECKPOINT_NAME)
    for k in a.keys() - {k for k in a if k.startswith("rng.")}:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
