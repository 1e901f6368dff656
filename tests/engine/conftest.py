import shutil

import pytest
import torch
from tiny_models import VOCAB
from tokenizers import Tokenizer, decoders, models

# One distinct printable character per token id, so any id sequence decodes to clean text.
CHARS = [chr(0x100 + i) for i in range(VOCAB)]


def _random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def model_with_tokenizer(hf_model_dir, tmp_path_factory):
    """The tiny llama checkpoint plus a one-character-per-token tokenizer.json."""
    path, hf = hf_model_dir("llama")
    out = tmp_path_factory.mktemp("llama_tok")
    shutil.copytree(path, out, dirs_exist_ok=True)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token=CHARS[0]))
    tok.decoder = decoders.Fuse()
    tok.save(str(out / "tokenizer.json"))
    return out, hf


def _hf_greedy(hf, prompt, max_new_tokens, **kwargs):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def random_prompts():
    """random_prompts(lengths, seed=0) -> token-id lists of those lengths."""
    return _random_prompts


@pytest.fixture(scope="session")
def hf_greedy():
    """hf_greedy(hf_model, prompt, max_new_tokens, **generate_kwargs) -> new token ids."""
    return _hf_greedy
