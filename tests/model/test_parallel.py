"""kiln.model.parallel's slicing, one process: which rows and columns each rank holds."""

import pytest
import torch

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.model.parallel import Shard, check_tp_size


def _config(**kw):
    base = dict(vocab_size=385, hidden_size=64, intermediate_size=128, num_layers=1,
                num_heads=8, num_kv_heads=2, head_dim=8)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def test_each_rank_keeps_the_kv_heads_its_query_heads_read():
    config = _config()  # 8 query heads, 2 KV heads: groups of 4
    k = torch.arange(2 * 8)[:, None].float()  # [kv_heads * head_dim, 1]: row = its index
    for world in (2, 4, 8):
        for rank in range(world):
            shard = Shard(config, rank, world)
            heads = config.num_heads // world
            q_heads = range(rank * heads, (rank + 1) * heads)
            kv_heads = sorted({h // 4 for h in q_heads})
            got = shard.slice("layers.0.self_attn.k_proj.weight", k)[:, 0].long().tolist()
            assert got == [h * 8 + i for h in kv_heads for i in range(8)], (world, rank)
            assert shard.local_config().num_kv_heads == len(kv_heads)


def test_vocab_rows_are_padded_to_a_multiple_of_the_ranks():
    config = _config()
    emb = torch.randn(385, 64)
    parts = [Shard(config, r, 2).slice("embed_tokens.weight", emb) for r in range(2)]
    assert [p.shape[0] for p in parts] == [193, 193]
    assert torch.equal(torch.cat(parts)[:385], emb)
    assert torch.all(parts[1][-1] == 0)


def test_row_parallel_splits_columns_and_keeps_the_bias_on_rank_0():
    config = _config()
    w, b = torch.randn(64, 128), torch.randn(64)
    name = "layers.0.mlp.experts.3.down_proj"
    parts = [Shard(config, r, 2).slice(f"{name}.weight", w) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), w)
    assert Shard(config, 0, 2).slice(f"{name}.bias", b) is b
    assert Shard(config, 1, 2).slice(f"{name}.bias", b) is None
    gate = torch.randn(4, 64)  # the MoE router is replicated
    assert Shard(config, 1, 2).slice("layers.0.mlp.gate.weight", gate) is gate


@pytest.mark.parametrize(
    "kw, world, message",
    [
        (dict(num_heads=4), 3, "tensor_parallel_size=3 does not divide num_attention_heads=4"),
        (dict(num_heads=6, num_kv_heads=3), 2, "does not divide num_key_value_heads=3"),
        (dict(num_heads=12, num_kv_heads=4), 6, "neither a divisor nor a multiple of num_key"),
        (dict(intermediate_size=100), 8, "does not divide intermediate_size=100"),
    ],
)
def test_sizes_that_do_not_split_evenly_are_refused(kw, world, message):
    with pytest.raises(ConfigError, match=message):
        check_tp_size(_config(**kw), world)
