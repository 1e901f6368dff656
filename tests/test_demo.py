"""`kiln demo`'s default model, built with tiny budgets: pretraining then SFT, cached stage by
stage, and it chats out of the box in kiln and in transformers."""

import json
import shutil

import pytest
import torch
from train.pretrain_helpers import make_corpus

import kiln
from kiln import demo
from kiln.cli import main
from kiln.engine.sampling_params import SamplingParams

TINY_CONFIG = """
[data]
corpus = "{corpus}"
vocab_size = 300
chat_template = "chatml"
[model]
num_layers = 1
num_heads = 2
hidden_size = 32
block_size = 64
[train]
out_dir = "unused"
max_steps = 4
batch_size = 4
eval_steps = 1
device = "cpu"
"""
ANSWER = "Ay, my lord."
QUESTIONS = ["Who's there?", "Stand and unfold yourself.", "Speak to me.", "Is it the king?"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """Where `kiln demo` builds, with a tiny config and an SFT set of one reply to learn by heart
    (both patched in for the module's tests)."""
    tmp = tmp_path_factory.mktemp("demo")
    config = tmp / "tiny.toml"
    config.write_text(TINY_CONFIG.format(corpus=make_corpus(tmp / "corpus")))
    data = tmp / "chat.jsonl"
    turns = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]
        for q in QUESTIONS
    ]
    data.write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))
    sft = ["--data", str(data), "--max-steps", "40", "--batch-size", "4", "--lr", "1e-2"]
    sft += ["--warmup-steps", "2", "--val-fraction", "0", "--log-interval", "10"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "DEFAULT_CONFIG", config)
        patch.setattr(demo, "SFT_FLAGS", sft)
        yield tmp / "build"


def test_default_model_chats_and_stops_at_the_end_of_its_turn(tiny_demo, capsys):
    transformers = pytest.importorskip("transformers")

    argv = ["demo", "--no-serve", "--out-dir", str(tiny_demo), "--message", QUESTIONS[0]]
    assert main([*argv, "--max-tokens", "16", "--temperature", "0"]) == 0
    model_dir = tiny_demo / "chat"
    printed = capsys.readouterr().out
    assert f"default model: {model_dir}" in printed
    assert f"user: {QUESTIONS[0]}\nassistant: {ANSWER}\n" in printed
    llm = kiln.LLM(str(model_dir), device="cpu")
    end = llm.tokenizer.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert (out.text, out.finish_reason, out.token_ids[-1]) == (ANSWER, "stop", end)

    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([hf_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        new = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )
    assert new[0, ids.shape[1] :].tolist() == out.token_ids  # transformers stops there too


def test_each_stage_is_built_once_and_sft_resumes_its_own_checkpoint(
    tiny_demo, tmp_path, monkeypatch
):
    import kiln.train.pretrain
    import kiln.train.sft

    demo.ensure_default_model(tiny_demo)
    root = shutil.copytree(tiny_demo, tmp_path / "build")
    model_dir = root / "chat"
    weights = (model_dir / "model.safetensors").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    run_sft = kiln.train.sft.run_sft
    monkeypatch.setattr(kiln.train.pretrain, "run_pretrain", refuse)
    monkeypatch.setattr(kiln.train.sft, "run_sft", refuse)
    assert demo.ensure_default_model(root) == model_dir  # both stages cached
    monkeypatch.setattr(kiln.train.sft, "run_sft", run_sft)
    (model_dir / "config.json").unlink()  # as if killed while exporting the chat model
    assert demo.ensure_default_model(root) == model_dir
    assert (model_dir / "model.safetensors").read_bytes() == weights
