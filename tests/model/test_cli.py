"""`kiln generate` end to end on a tiny model directory with a tokenizer."""

import pytest

from kiln.cli import main


@pytest.fixture(scope="module")
def model_dir(tokenized_model_dir):
    return tokenized_model_dir("qwen3")


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
