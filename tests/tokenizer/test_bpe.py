"""kiln's byte-level BPE against its references: HF `tokenizers` and tiktoken, both directions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import kiln.cli
from kiln.errors import TokenizerError
from kiln.tokenizer import load_tokenizer
from kiln.tokenizer.bpe import BPETokenizer, IncrementalDecoder
from kiln.tokenizer.bpe_train import learn_merges
from kiln.tokenizer.pretokenize import pattern_for

SHAKESPEARE = Path(__file__).parents[2] / "data" / "shakespeare"
EOT = "<|endoftext|>"
SPECIALS = [EOT, "<|im_start|>", "<|im_end|>"]
# Non-ASCII text so that merges also form inside multi-byte characters.
UNICODE_LINES = "naïve café 東京は雨です 😀🎉 ñandú ﬁn Ωμέγα  \t\n\n" * 20

# Arbitrary Unicode minus lone surrogates, plus the awkward corners drawn on purpose.
awkward = st.sampled_from(
    [
        "😀",
        "👩‍👩‍👧",
        "🇫🇷",
        "e\u0301",
        "\u0301\u0301",
        "東京",
        "한국어",
        " " * 7,
        "\n\n\n",
        "\r\n",
        "\t ",
        "\x00",
        "\u00a0",
        "\u2028",
        "'s",
        "'LL",
        "123456",
        EOT,
        "<|im_end|>",
    ]
)


def text_of(exclude: list[str]) -> st.SearchStrategy[str]:
    chars = st.text(st.characters(exclude_categories=exclude))
    return st.lists(chars | awkward, max_size=8).map("".join)


texts = text_of(["Cs"])
# Code points unassigned in Python's Unicode (14.0) are left out where kiln is compared with
# HF/tiktoken: each regex engine carries its own Unicode version, and one that knows a newer
# letter pre-tokenizes it differently (e.g. U+3D000 is \p{L} to `regex`, not to Oniguruma).
assigned_texts = text_of(["Cs", "Cn"])
SETTINGS = settings(max_examples=150, deadline=None)


def shakespeare(chars: int = 300_000) -> str:
    files = sorted(SHAKESPEARE.glob("*.txt"))
    return "".join(f.read_text(encoding="utf-8") for f in files[:4])[:chars]


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def kiln_tok(request) -> BPETokenizer:
    corpus = [shakespeare(), UNICODE_LINES, EOT.join(["a", "b"])]
    return BPETokenizer.train(corpus, 1000, request.param, SPECIALS, progress=False)


@pytest.fixture(scope="module")
def kiln_saved(kiln_tok, tmp_path_factory) -> tuple[BPETokenizer, Tokenizer, Path]:
    out = tmp_path_factory.mktemp("kiln_tok")
    kiln_tok.save(out)
    return kiln_tok, Tokenizer.from_file(str(out / "tokenizer.json")), out


@pytest.fixture(scope="module", params=[False, True], ids=["no_prefix", "prefix_space"])
def hf_trained(request, tmp_path_factory) -> tuple[BPETokenizer, Tokenizer]:
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=request.param)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([shakespeare(200_000), UNICODE_LINES], trainer)
    file = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    hf.save(str(file))
    return BPETokenizer.load(file), Tokenizer.from_file(str(file))


@given(text=texts)
@SETTINGS
def test_decode_inverts_encode(kiln_tok, text):
    assert kiln_tok.decode(kiln_tok.encode(text)) == text
    assert kiln_tok.decode(kiln_tok.encode(text, allowed_special="all")) == text


@given(text=assigned_texts)
@SETTINGS
def test_hf_encodes_kiln_tokenizer_json_identically(kiln_saved, text):
    kiln_tok, hf, _ = kiln_saved
    hf_ids = hf.encode(text, add_special_tokens=False).ids
    assert kiln_tok.encode(text, allowed_special="all") == hf_ids
    assert hf.decode(hf_ids, skip_special_tokens=False) == text


@given(text=assigned_texts)
@SETTINGS
def test_kiln_encodes_hf_trained_tokenizer_json_identically(hf_trained, text):
    kiln_tok, hf = hf_trained
    assert kiln_tok.encode(text, allowed_special="all") == hf.encode(text).ids


@given(text=assigned_texts)
@settings(max_examples=100, deadline=None)
def test_tiktoken_with_kiln_ranks_encodes_identically(kiln_tok, text):
    ranks = {b: i for i, b in kiln_tok.vocab.items()}
    enc = tiktoken.Encoding(
        "kiln",
        pat_str=kiln_tok.pattern,
        mergeable_ranks=ranks,
        special_tokens=kiln_tok.special_tokens,
    )
    assert kiln_tok.encode(text) == enc.encode_ordinary(text)


def test_hf_loaded_tokenizer_survives_resave(hf_trained, tmp_path):
    kiln_tok, hf = hf_trained
    if kiln_tok.add_prefix_space:
        with pytest.raises(TokenizerError, match="HF-only"):
            kiln_tok.save(tmp_path)
        return
    kiln_tok.save(tmp_path)
    text = shakespeare(5000) + UNICODE_LINES + EOT
    resaved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert resaved.encode(text).ids == hf.encode(text).ids


def test_special_token_text_is_ordinary_unless_allowed(kiln_tok):
    text = f"hi{EOT} there<|im_start|>"
    eot, start = kiln_tok.special_tokens[EOT], kiln_tok.special_tokens["<|im_start|>"]
    plain = kiln_tok.encode(text)
    assert eot not in plain and start not in plain
    assert plain == kiln_tok.encode_ordinary(text)
    only_eot = kiln_tok.encode(text, allowed_special={EOT})
    assert eot in only_eot and start not in only_eot
    assert kiln_tok.encode(text, allowed_special="all")[-1] == start
    assert kiln_tok.decode(only_eot) == text
    with pytest.raises(TokenizerError, match="not special tokens"):
        kiln_tok.encode(text, allowed_special={"<|nope|>"})


def test_special_tokens_take_the_last_ids_and_are_never_merged(kiln_tok):
    assert sorted(kiln_tok.special_tokens.values()) == list(range(997, 1000))
    assert kiln_tok.n_vocab == 1000
    assert not any(EOT.encode() in b for b in kiln_tok.vocab.values())


@given(text=texts)
@SETTINGS
def test_incremental_decoder_never_emits_half_a_character(kiln_tok, text):
    decoder = IncrementalDecoder(kiln_tok)
    pieces = [decoder.decode([i]) for i in kiln_tok.encode(text)]
    pieces.append(decoder.decode([], final=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_incremental_decoder_holds_back_a_split_emoji(kiln_tok):
    emoji = "😀".encode()
    byte_ids = {b: i for i, b in kiln_tok.vocab.items() if len(b) == 1}
    decoder = IncrementalDecoder(kiln_tok)
    assert [decoder.decode([byte_ids[emoji[i : i + 1]]]) for i in range(4)] == ["", "", "", "😀"]
    assert decoder.decode([byte_ids[emoji[:1]]]) == ""
    assert decoder.decode([], final=True) == "\ufffd"


def test_lone_surrogate_is_refused(kiln_tok):
    with pytest.raises(TokenizerError, match="lone surrogate '\\\\ud800' at index 3"):
        kiln_tok.encode("abc\ud800def")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        BPETokenizer.train(["ok \udfff"], 300, progress=False)


def naive_merges(text: str, pattern: str, vocab_size: int) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair of every word after each merge."""
    words = Counter(regex.findall(pattern, text))
    seqs = {w: list(w.encode()) for w in words}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        counts: Counter[tuple[int, int]] = Counter()
        for w, seq in seqs.items():
            for p in zip(seq, seq[1:]):
                counts[p] += words[w]
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == list(pair):
                    out.append(len(vocab) - 1)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_incremental_training_matches_naive_recount(pattern):
    text = shakespeare(20_000) + UNICODE_LINES
    words = Counter(regex.findall(pattern_for(pattern), text))
    _, merges = learn_merges(words, 400, progress=False)
    assert [(a, b) for a, b, _ in merges] == naive_merges(text, pattern_for(pattern), 400)


def test_training_stops_when_no_pairs_are_left():
    tok = BPETokenizer.train(["ab ab"], 1000, special_tokens=[], progress=False)
    assert tok.n_vocab == 258  # "ab", " ab"
    assert tok.encode("ab ab") == [256, 257]


def test_saved_directory_loads_in_kiln_load_tokenizer(kiln_saved):
    kiln_tok, _, out = kiln_saved
    tok = load_tokenizer(out)
    assert tok.eos_token_id == tok.bos_token_id == kiln_tok.special_tokens[EOT]
    assert tok.encode("To be, or not to be") == kiln_tok.encode("To be, or not to be")
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == EOT


@pytest.mark.parametrize(
    ("corpus", "kwargs", "message"),
    [
        ([], {}, "empty corpus"),
        (["", EOT], {}, "empty corpus"),
        (["text"], {"vocab_size": 256}, "too small: need at least 256 byte tokens \\+ 1"),
        (["text"], {"pattern": "gpt5"}, "unknown pattern 'gpt5'"),
        ([Path("/no/such/file.txt")], {}, "cannot read '/no/such/file.txt'"),
    ],
)
def test_bad_training_input_is_one_line_error(corpus, kwargs, message):
    kwargs = {"vocab_size": 300, **kwargs}
    with pytest.raises(TokenizerError, match=message) as e:
        BPETokenizer.train(corpus, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(TokenizerError, match=r"bad\.txt' is not UTF-8 \(bad byte at offset 6\)"):
        BPETokenizer.train([bad], 300, progress=False)


def test_cli_trains_and_encodes(tmp_path, capsys):
    files = sorted(SHAKESPEARE.glob("*.txt"))[:2]
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--input", *map(str, files), "--vocab-size", "400"]
    assert kiln.cli.main([*args, "--pattern", "gpt4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (
        kiln.cli.main(
            ["tokenizer", "encode", "--tokenizer", str(out), "--text", "Hi <|endoftext|>"]
        )
        == 0
    )
    ids = json.loads(capsys.readouterr().out)
    tok = BPETokenizer.load(out)
    assert ids == tok.encode("Hi <|endoftext|>") and tok.special_tokens == {EOT: 399}


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    args = ["tokenizer", "train", "--input", str(SHAKESPEARE / "hamlet_gut.txt")]
    assert kiln.cli.main([*args, "--vocab-size", "9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("kiln tokenizer: error: vocab_size 9 is too small") and err.count("\n") == 1
    )
    assert kiln.cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path), "--text", "x"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_loading_a_non_bpe_tokenizer_json_is_refused(tmp_path):
    wordlevel = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wordlevel.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="model type 'WordLevel'"):
        BPETokenizer.load(tmp_path)
