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


@pytest.fixture(scope="session")
def tokenized_model_dir(hf_model_dir, tmp_path_factory):
    """tokenized_model_dir(name) -> a copy of the tiny checkpoint plus a chat tokenizer (what
    the CLIs load); built once per session, so tests must not write into it."""
    import shutil

    from tiny_models import save_chat_tokenizer

    cache = {}

    def get(name: str):
        if name not in cache:
            src, _ = hf_model_dir(name)
            out = tmp_path_factory.mktemp(f"{name}_tok")
            shutil.copytree(src, out, dirs_exist_ok=True)
            save_chat_tokenizer(out)
            cache[name] = out
        return cache[name]

    return get
