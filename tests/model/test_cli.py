"""`kiln generate` end to end on a tiny model directory with a tokenizer."""

import shutil

import pytest
from tiny_models import save_chat_tokenizer

from kiln.cli import main


@pytest.fixture(scope="module")
def model_dir(hf_model_dir, tmp_path_factory):
    src, _ = hf_model_dir("qwen3")
    out = tmp_path_factory.mktemp("with_tok")
    shutil.copytree(src, out, dirs_exist_ok=True)
    save_chat_tokenizer(out)
    return out


def test_generate_prints_prompt_and_continuation(model_dir, capsys):
    assert (
        main(["generate", "--model", str(model_dir), "--prompt", "To be", "--max-tokens", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("To be") and len(out) > len("To be\n")


def test_generate_chat_and_sampling_flags(model_dir, capsys):
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "Hi",
        "--chat",
        "--max-tokens",
        "4",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_generate_rejects_bad_sampling_value(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--top-p", "1.5"]
    assert main(argv) == 2
    assert "top_p" in capsys.readouterr().err
