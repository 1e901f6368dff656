"""load_tokenizer and chat templates against transformers."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import kiln
from kiln.errors import TokenizerError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] == "
    "'system' %}{% set content = '<|start_header_id|>system<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% else %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% elif messages[-1]['role'] == "
    "'user' %}{{ raise_exception('no generation prompt after a user turn') }}{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse. "},
    {"role": "user", "content": "Hello, wörld! 🎉"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Again?"},
]


def _train_hf(text: str, bos: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tokenizer_dir(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    text = open("data/shakespeare/hamlet_gut.txt").read()[:20000]
    llama = request.param == "llama3"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_hf(text, bos=llama),
        bos_token="<s>" if llama else None,
        eos_token="<|eot_id|>" if llama else "<|im_end|>",
        chat_template=LLAMA3 if llama else CHATML,
    )
    out = tmp_path_factory.mktemp(request.param)
    fast.save_pretrained(out)
    return out


SAMPLES = [
    "",
    "Hello world",
    "  spaces\n\nand\ttabs ",
    "To be, or not to be: that is",
    "emoji 🎉👍🏽 CJK 漢字 combining é",
    "<|im_end|> literal",
    "\x00nul",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_match_transformers(tokenizer_dir, text):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = kiln.load_tokenizer(tokenizer_dir)
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer_dir, add_generation_prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = kiln.load_tokenizer(tokenizer_dir)
    messages = MESSAGES[:3] if not add_generation_prompt else MESSAGES
    want = ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want
    want_ids = ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    got_ids = tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert got_ids == list(want_ids)


def test_special_token_ids(tokenizer_dir):
    tok = kiln.load_tokenizer(tokenizer_dir)
    assert tok.eos_token_id is not None and tok.eos_token_id in tok.eos_token_ids
    assert tok.id_to_token(tok.eos_token_id) == tok.special_tokens["eos_token"]


def test_template_exception_is_a_tokenizer_error(tokenizer_dir):
    tok = kiln.load_tokenizer(tokenizer_dir)
    messages = MESSAGES  # ends with a user turn: the llama3 template raises without a prompt
    if "raise_exception" in tok.chat_template:
        with pytest.raises(TokenizerError, match="no generation prompt"):
            tok.apply_chat_template(messages, add_generation_prompt=False)
    else:
        assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("\n")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        kiln.load_tokenizer(tmp_path)
