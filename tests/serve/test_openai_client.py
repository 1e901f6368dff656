"""The server through the official `openai` client: completions and chat, streamed or not."""

from __future__ import annotations

import pytest

PROMPT = "To be, or not to be"
MESSAGES = [{"role": "user", "content": "Who is there?"}]


@pytest.fixture(scope="module")
def offline(chat_model_dir):
    """kiln.LLM over the same directory: the reference the server must agree with."""
    from kiln.engine.llm import LLM

    return LLM(str(chat_model_dir))


def greedy(max_tokens=12, **kw):
    from kiln.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_completion_matches_offline_greedy(client, offline):
    want = offline.generate([PROMPT], greedy())[0]
    got = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == 12
    assert got.usage.total_tokens == got.usage.prompt_tokens + 12


def test_streamed_completion_equals_whole(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    whole = client.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            **kw, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_matches_offline_greedy(client, offline, chat_model_dir):
    import kiln

    tok = kiln.load_tokenizer(chat_model_dir)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = offline.generate(None, greedy(), prompt_token_ids=[ids])[0]
    got = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == 12


def test_streamed_chat_with_usage(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_n_choices_with_seed(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert 3 <= a.usage.completion_tokens <= 3 * 8


def test_n_streamed_chat_fills_every_choice(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, n=2, stream=True, seed=1,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason}  # fmt: skip
    assert finished == {0: "length", 1: "length"}


def test_batch_of_prompts(client):
    got = client.completions.create(
        model="tiny", prompt=[PROMPT, "Hamlet", "Horatio"], max_tokens=4, temperature=0, n=2
    )
    assert sorted(c.index for c in got.choices) == list(range(6))
    assert got.choices[0].text == got.choices[1].text  # greedy: the same twice
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8]], max_tokens=3)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 4


def test_stop_string_cuts_the_text(client):
    base = (
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    assert len(base) > 4
    stop = base[3:5]
    got = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert got.choices[0].text == base[: base.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


def test_completion_logprobs(client):
    got = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == got.choices[0].text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely


def test_chat_logprobs(client):
    got = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = got.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in (
        "kiln:num_requests_running",
        "kiln:num_requests_waiting",
        "kiln:kv_cache_usage_perc",
        "kiln:prefix_cache_hit_rate",
        "kiln:prompt_tokens_total",
        "kiln:generation_tokens_total",
        "kiln:time_to_first_token_seconds_bucket",
        "kiln:time_per_output_token_seconds_bucket",
        "kiln:e2e_request_latency_seconds_bucket",
        "kiln:kv_cache_pool_tokens",
        "kiln:kv_blocks_per_seq_mean",
        "kiln:kv_evicted_blocks_total",
    ):
        assert name in text


def test_demo_examples_run(server, capsys):
    import shutil
    import subprocess

    from kiln.demo import demo_examples

    for chat in (False, True):
        text = demo_examples(server.url, "tiny", chat)
        exec(text[text.index("from openai") :], {})  # streams a sampled reply (may be empty)
        assert capsys.readouterr().out.endswith("\n")
        if shutil.which("curl"):
            curl = text[text.index("curl") : text.index("\n\nor from")]
            out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
            assert '"finish_reason"' in out.stdout, out
