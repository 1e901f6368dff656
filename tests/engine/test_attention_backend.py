"""The paged attention backend's start-up work."""

import torch

from kiln.engine.attention import KVCache, PagedBackend
from kiln.engine.ops import Ops


def test_backend_compile_kernels_calls_every_variant_with_valid_arguments():
    """The start-up compile pass (CUDA) runs on the torch ops too: its calls are well formed."""
    cache = KVCache(2, 4, 16, 2, 32, torch.float32, "cpu")
    before = cache.data.clone()
    PagedBackend(cache, Ops.torch()).compile_kernels(4, {None, 8}, max_num_seqs=130)
    assert torch.equal(cache.data, before)  # nothing stored
