"""A character-level HF tokenizer with a ChatML template, small enough for the tiny models."""

from __future__ import annotations

import shutil
import string
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_char_tokenizer(out: Path, chat_template: str = CHATML) -> Path:
    """One id per printable ASCII character (and newline) plus ChatML's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=chat_template,
    )
    fast.save_pretrained(out)
    return out


def model_with_tokenizer(model_dir: Path, out: Path) -> Path:
    """A copy of a tiny model directory with the character tokenizer beside its weights."""
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    return save_char_tokenizer(out)
