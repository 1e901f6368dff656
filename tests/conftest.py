import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports
# kiln.kernels, so that the kernels run in Triton's interpreter on a machine without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """hf_model_dir(name) -> (directory, transformers model); built once per session."""
    from tiny_models import save_hf_model

    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[name] = (out, save_hf_model(name, out))
        return cache[name]

    return get
