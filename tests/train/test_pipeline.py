"""Pipeline parallelism (kiln.train.pipeline): 2 gloo ranks, GPipe and 1F1B, train like one
process with the same seed, data and grad_accum (losses, grad norms, validation, weights)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.train.pipeline import stage_layers


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
        from safetensors.torch import save_file

        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, result_file)
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
    weights = tmp_path / "two.safetensors"
    mp.spawn(_pretrain_rank, args=(free_port(), data, tmp_path / "two", schedule, tied, weights),
             nprocs=2)  # fmt: skip
    for key in ("loss", "val_loss", "grad_norm"):
        a, b = records(tmp_path / "one", key), records(tmp_path / "two", key)
        assert a.keys() == b.keys() and a
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4), (key, step)
    from safetensors.torch import load_file

    two = load_file(weights)
    for name, p in one.state_dict().items():
        torch.testing.assert_close(two[name], p, rtol=1e-4, atol=1e-5, msg=name)
