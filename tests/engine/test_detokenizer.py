"""Incremental detokenization: the DecodeStream path and the window path give the same text."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.engine.detokenizer import SeqText
from kiln.tokenizer.hf import Tokenizer as KilnTokenizer

CORPUS = (
    "When shall we three meet again\nIn thunder, lightning, or in rain?\n"
    "Fair is foul, and foul is fair: hover through the fog and filthy air. "
    "héllo wörld, naïve café, 你好 🙂 "
) * 20


class WindowOnly:
    """The same tokenizer without its HF object: SeqText falls back to the decode window."""

    def __init__(self, tok):
        self.decode = tok.decode


def metaspace_tokenizer() -> KilnTokenizer:
    """A SentencePiece-style (Metaspace, byte fallback) BPE: leading spaces are the hard case."""
    t = Tokenizer(models.BPE(byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    t.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=400, special_tokens=byte_tokens))
    return KilnTokenizer(t)


def bytelevel_tokenizer() -> KilnTokenizer:
    """GPT-2 style byte-level BPE."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    t.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet))
    return KilnTokenizer(t)


def stream(tok, prompt: list[int], out: list[int]) -> tuple[str, SeqText]:
    text = SeqText(prompt)
    return "".join(text.append(tok, t) for t in out), text


@pytest.mark.parametrize("make", [metaspace_tokenizer, bytelevel_tokenizer])
def test_stream_equals_window_on_text_and_random_ids(make):
    tok = make()
    ids = tok.encode(CORPUS)
    rng = random.Random(0)
    streamed = 0
    for trial in range(200):
        if trial % 2:  # real text, cut anywhere (mid-character too)
            i = rng.randrange(len(ids) - 60)
            prompt, out = ids[i : i + rng.randrange(1, 10)], ids[i + 10 : i + 50]
        else:  # random ids: broken characters everywhere
            prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
            out = [rng.randrange(tok.vocab_size) for _ in range(40)]
        fast, seq = stream(tok, prompt, out)
        streamed += seq._stream is not False
        if trial % 2:  # a clean prompt end: the DecodeStream path
            assert seq._stream is not False
        slow, ref = stream(WindowOnly(tok), prompt, out)
        assert ref._stream is False
        assert fast == slow, (prompt, out)
    assert streamed > 110  # random prompts end in a broken character now and then: the window


def test_stream_text_is_the_decoded_continuation():
    tok = bytelevel_tokenizer()
    prompt = tok.encode("Fair is foul,")
    out = tok.encode(" and foul is fair: 你好 🙂 café")
    text, _ = stream(tok, prompt, out)
    assert text == " and foul is fair: 你好 🙂 café"
