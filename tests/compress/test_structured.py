"""kiln prune --method heads|channels: the model shrinks (config and parameters), computes what
the masked original computes, and its checkpoint loads in transformers."""

import pytest
import torch

from kiln.cli import main
from kiln.compress.config import PruneConfig
from kiln.compress.prune import prune
from kiln.compress.structured import prune_structured
from kiln.model.loader import load_model
from kiln.quant.quantize import calibration

CALIB = dict(calib_samples=4, calib_len=64)
CASES = [  # family, method, sparsity, (num_heads, num_kv_heads, intermediate_size) after
    ("llama", "heads", 0.5, (2, 2, 128)),  # GQA 4 / 2: one query head of each KV group goes
    ("llama_mha_tied", "heads", 0.25, (3, 3, 128)),  # MHA: a head goes with its K and V;
    # 3 heads do not divide hidden 64, which transformers' llama requires: written as mistral
    ("qwen3", "heads", 0.5, (2, 2, 128)),  # q/k norms, head_dim 32 != hidden / heads
    ("llama", "channels", 0.25, (4, 2, 96)),
    ("qwen3", "channels", 0.5, (4, 2, 64)),
    ("gpt2", "channels", 0.25, (4, 4, 192)),
]


@pytest.mark.parametrize("family, method, sparsity, shape", CASES)
def test_the_smaller_model_computes_what_the_masked_original_computes(
    tokenized_model_dir, family, method, sparsity, shape
):
    src = tokenized_model_dir(family)
    model = load_model(src, device="cpu")
    ids = calibration(model, src, None, 4, 64)
    before = model.num_parameters()
    small = prune_structured(model, ids, method, sparsity)  # masks `model` on the way
    c = small.config
    assert (c.num_heads, c.num_kv_heads, c.intermediate_size) == shape
    assert small.num_parameters() < before
    probe = torch.randint(0, c.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(probe), model(probe), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, method, sparsity, shape", CASES)
def test_the_pruned_checkpoint_loads_in_transformers(
    tokenized_model_dir, tmp_path, family, method, sparsity, shape
):
    import transformers

    out = prune(tokenized_model_dir(family), tmp_path / "p", PruneConfig(method, sparsity, **CALIB))
    ours = load_model(out, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.num_parameters() == ours.num_parameters()
    assert theirs.config.model_type == ("mistral" if shape[0] == 3 else family)
    probe = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(probe), theirs(probe).logits, rtol=1e-4, atol=1e-4)


def test_a_head_that_contributes_nothing_is_the_one_removed(tokenized_model_dir):
    src = tokenized_model_dir("llama_mha_tied")
    model = load_model(src, device="cpu")
    with torch.no_grad():
        model.layers[0].self_attn.o_proj.weight[:, 2 * 16 : 3 * 16] = 0  # head 2's output
    q = model.layers[0].self_attn.q_proj.weight.clone()
    small = prune_structured(model, calibration(model, src, None, 4, 64), "heads", 0.25)
    kept = torch.cat([q[h * 16 : (h + 1) * 16] for h in (0, 1, 3)])
    assert torch.equal(small.layers[0].self_attn.q_proj.weight, kept)


@pytest.mark.parametrize(
    "family, args, message",
    [
        ("gpt2", ["--method", "heads", "--sparsity", "0.5"], "gpt2 derives head_dim"),
        ("llama", ["--method", "heads", "--sparsity", "0.1"], "removes none of 2 heads"),
        ("llama", ["--method", "channels", "--sparsity", "0.999"], "would remove all 128"),
        ("mixtral", ["--method", "channels", "--sparsity", "0.5"], "does not prune MoE experts"),
    ],
)
def test_bad_input_is_a_one_line_error(
    tokenized_model_dir, tmp_path, capsys, family, args, message
):
    out = tmp_path / "bad"
    argv = ["prune", "--model", str(tokenized_model_dir(family)), "--out", str(out), *args]
    capsys.readouterr()  # what building the tiny model printed
    assert main([*argv, "--calib-samples", "4", "--calib-len", "64"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
