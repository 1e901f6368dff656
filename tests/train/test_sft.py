"""SFT: assistant-only loss masks, packing isolation, errors at the boundary, learning."""

import json

import pytest
import torch

import kiln
from kiln.cli import main as kiln_main
from kiln.errors import InputError
from kiln.train import finetune_data, sft
from kiln.train.finetune_data import Example, encode_chat, read_jsonl

GEN_CHATML = (  # ChatML with {% generation %} markers, so transformers reports its own mask
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>'"
    " + '\n' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer in verse."},
    {"role": "user", "content": "Who's there?"},
    {"role": "assistant", "content": "Nay, answer me: stand."},
    {"role": "user", "content": "Long live the king!"},
    {"role": "assistant", "content": "Bernardo?"},
]


@pytest.fixture(scope="module")
def chat_model(hf_model_dir, tmp_path_factory):
    """The tiny llama with a character tokenizer and a ChatML template."""
    from chat_tokenizer import model_with_tokenizer

    return model_with_tokenizer(hf_model_dir("llama")[0], tmp_path_factory.mktemp("chat_llama"))


def test_mask_is_exactly_the_assistant_tokens(tmp_path):
    from chat_tokenizer import save_char_tokenizer
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path, chat_template=GEN_CHATML)
    tok = kiln.load_tokenizer(tmp_path)
    example = encode_chat(tok, CONVERSATION)
    ref = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert example.input_ids == list(ref["input_ids"])
    assert example.loss_mask == [bool(m) for m in ref["assistant_masks"]]
    trained = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == (
        "Nay, answer me: stand.<|im_end|>\nBernardo?<|im_end|>\n"
    )
    ids, labels = finetune_data.pad([example], pad_id=0)
    want = [t if m else -100 for t, m in zip(example.input_ids[1:], example.loss_mask[1:])]
    assert labels[0].tolist() == want + [-100]


def _examples(tok, lengths):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(5, 100, (n,), generator=g).tolist()
        mask = (torch.rand(n, generator=g) < 0.6).tolist()
        out.append(Example(ids, mask))
    return out


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])  # mistral: sliding window 8
def test_packed_loss_equals_unpacked(hf_model_dir, name):
    model = kiln.load_model(hf_model_dir(name)[0])
    examples = _examples(None, [13, 7, 21, 5, 17, 9])
    rows = sft.pack_rows(examples, max_len=32)
    assert len(rows) < len(examples)
    packed = sft.pack(rows, pad_id=0)
    with torch.no_grad():
        alone = [sft.token_losses(model, sft.collate([e], 0))[0].sum() for e in examples]
        losses = sft.token_losses(model, packed)
    got = []
    for r, row in enumerate(rows):
        for i in range(len(row)):
            got.append(losses[r][packed["seq_ids"][r] == i].sum())
    order = [e for row in rows for e in row]
    want = [alone[next(k for k, e in enumerate(examples) if e is o)] for o in order]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-5)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": []}\n\n{"messages": [oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(data)


def test_conversation_without_assistant_is_refused(chat_model, tmp_path):
    data = tmp_path / "noassistant.jsonl"
    good = {"messages": CONVERSATION}
    bad = {"messages": CONVERSATION[:2]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    tok = kiln.load_tokenizer(chat_model)
    with pytest.raises(InputError, match=r"noassistant.jsonl:2: conversation has no assistant"):
        sft.load_sft_examples(tok, data, 256)


def _val_loss(model, tok, seed=1337):
    examples = sft.load_sft_examples(tok, sft.DEFAULT_DATA, 256)
    _, val = finetune_data.split_train_val(examples, 0.05, seed)
    with torch.no_grad():
        batch = sft.collate(val, 0)
        return float(sft.sft_loss(model, batch)[0])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sft_lowers_val_loss(chat_model, tmp_path, mode):
    out = tmp_path / "out"
    args = ["sft", "--model", str(chat_model), "--out", str(out), "--max-seq-len", "256"]
    args += ["--max-steps", "12", "--batch-size", "2", "--warmup-steps", "2", "--pack"]
    args += ["--eval-steps", "1", "--log-interval", "4"]
    args += ["--lora-r", "8", "--lr", "2e-2"] if mode == "lora" else ["--lr", "5e-3"]
    assert kiln_main(args) == 0
    tok = kiln.load_tokenizer(out)
    before = _val_loss(kiln.load_model(chat_model), tok)
    if mode == "lora":
        tuned = kiln.load_model(chat_model, lora=out)
    else:
        tuned = kiln.load_model(out)
    after = _val_loss(tuned, tok)
    assert after < before - 0.5, (before, after)
    assert (
        kiln_main(
            ["generate", "--model", str(chat_model if mode == "lora" else out), "--chat"]
            + (["--lora", str(out)] if mode == "lora" else [])
            + ["--prompt", "Continue this line from Hamlet:\nTo be", "--max-tokens", "8"]
        )
        == 0
    )


def test_tokenizer_without_template_gets_the_default(tmp_path):
    from chat_tokenizer import save_char_tokenizer

    from kiln.train.finetune import DEFAULT_CHAT_TEMPLATE

    save_char_tokenizer(tmp_path, chat_template=None)
    tok = kiln.load_tokenizer(tmp_path)
    assert tok.chat_template is None
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    example = encode_chat(tok, CONVERSATION)
    trained = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == (
        "Nay, answer me: stand.<|im_end|>Bernardo?<|im_end|>"
    )
    assert tok.apply_chat_template(CONVERSATION[:2]).endswith("User: Who's there?\n\nAssistant: ")


def test_max_seq_len_is_bounded_by_the_context(chat_model, tmp_path, capsys):
    """Past the model's context: a one-line error naming both numbers (not an IndexError)."""
    from kiln.cli import main

    argv = ["sft", "--model", str(chat_model), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert main([*argv, "--max-seq-len", "100000"]) == 2
    assert "100000 exceeds the model's context of 256" in capsys.readouterr().err


def test_generate_chat_uses_the_adapters_template(hf_model_dir, tmp_path, capsys):
    """A base without a chat template, an adapter trained with one: --lora --chat works."""
    import shutil

    from chat_tokenizer import save_char_tokenizer

    from kiln.cli import main

    base = tmp_path / "base"
    shutil.copytree(hf_model_dir("llama")[0], base)
    save_char_tokenizer(base, chat_template=None)
    out = tmp_path / "adapter"
    argv = ["sft", "--model", str(base), "--out", str(out), "--lora-r", "4", "--max-steps", "2"]
    assert main([*argv, "--eval-steps", "1", "--batch-size", "2"]) == 0
    prompt = ["--prompt", "Who's there?", "--max-tokens", "4", "--chat"]
    assert main(["generate", "--model", str(base), *prompt]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert main(["generate", "--model", str(base), "--lora", str(out), *prompt]) == 0
