"""Pipeline parallelism (kiln.train.pipeline): 2 gloo ranks, GPipe and 1F1B, give one
process's losses for the same seed and data."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.train.pipeline import PipelineRunner, lm_loss, stage_layers

STEPS, BATCH, T, MAX_NORM = 3, 4, 16, 0.5
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
              num_kv_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG))
    model.init_weights()
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, CONFIG["vocab_size"], (STEPS, BATCH, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _one_process_losses() -> list[float]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in _batches():
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for schedule in ("gpipe", "1f1b"):
        runner = PipelineRunner(_model(), rank, 2, 2, schedule, torch.device("cpu"))
        opt = torch.optim.AdamW(runner.parameters(), lr=1e-2)
        losses = []
        for x, y in _batches():
            loss = runner.step(x, y)
            runner.clip_grad_norm(MAX_NORM)
            opt.step()
            opt.zero_grad()
            if loss is not None:
                losses.append(loss.item())
        results[schedule] = losses
    if rank == 1:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def test_pp2_losses_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "losses.json"
    mp.spawn(_rank, args=(port, str(out)), nprocs=2)
    want = _one_process_losses()
    got = json.loads(out.read_text())
    for schedule in ("gpipe", "1f1b"):
        assert got[schedule] == pytest.approx(want, abs=1e-5), schedule
    assert want[-1] < want[0]  # it trains


def test_stages_split_the_layers_evenly():
    assert [list(stage_layers(10, i, 4)) for i in range(4)] == [
        [0, 1], [2, 3, 4], [5, 6], [7, 8, 9]
    ]  # fmt: skip


def _pretrain_rank(rank: int, port: int, data, out_dir, schedule: str, tied: bool, result_file):
    import os

    from train.pretrain_helpers import tiny_model, train_config, windows

    from kiln.train.pipeline import train_pipeline

    os.environ |= dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = train_config(out_dir, grad_accum=2, pipeline_parallel=2, pipeline_schedule=schedule)
    model = tiny_model(tie_word_embeddings=tied)
    train_pipeline(model, cfg, windows(data, 4), windows(data, 4, seed=1))
    if rank == 0:  # every stage's weights gathered into the model, on every rank
        torch.save(model.state_dict(), result_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("schedule, tied", [("gpipe", False), ("1f1b", True)])
def test_pretrain_pipeline_logs_and_weights_equal_one_process(tmp_path, schedule, tied):
    from train.pretrain_helpers import tiny_model, token_file, train_config, windows
    from train.test_pretrain_ddp import free_port, records

    from kiln.train.loop import train
    from kiln.train.pretrain import lm_loss

    data = token_file(tmp_path / "tokens.bin")
    one = tiny_model(tie_word_embeddings=tied)
    train(one, train_config(tmp_path / "one", grad_accum=2), windows(data, 4), lm_loss,
          windows(data, 4, seed=1))  # fmt: skip
    weights = tmp_path / "two.pt"
    mp.spawn(_pretrain_rank, args=(free_port(), data, tmp_path / "two", schedule, tied, weights),
             nprocs=2)  # fmt: skip
    for key in ("loss", "val_loss", "grad_norm"):
        a, b = records(tmp_path / "one", key), records(tmp_path / "two", key)
        assert a.keys() == b.keys() and a
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4), (key, step)
    two = torch.load(weights)
    for name, p in one.state_dict().items():
        torch.testing.assert_close(two[name], p, rtol=1e-4, atol=1e-5, msg=name)
