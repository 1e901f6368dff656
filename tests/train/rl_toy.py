"""A tiny model over a digits tokenizer, for the bundled toy RL tasks (kiln/data/rl)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.model.loader import save_model
from kiln.model.transformer import Transformer
from kiln.train.data import EOT, train_char_tokenizer

CHARS = "0123456789 +="
PAD = "<pad>"


def toy_model_dir(out: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Llama-family model (exactly the tokenizer's vocabulary) beside a character
    tokenizer of digits, space, '+' and '=', with EOS and a pad token of its own."""
    out.mkdir(parents=True, exist_ok=True)
    text = out / "chars.txt"
    text.write_text(CHARS)
    train_char_tokenizer([text], out, (EOT, PAD))
    text.unlink()
    cfg_file = out / "tokenizer_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"pad_token": PAD}))
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    eos, pad = len(vocab), len(vocab) + 1  # the specials follow the characters
    config = ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=len(vocab) + 2, hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    ))  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights()
    save_model(model, out)
    return out
