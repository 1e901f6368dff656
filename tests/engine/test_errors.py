"""Bad input is refused at the boundary with the bad value and what was expected."""

import pytest

from kiln.engine import LLM, SamplingParams
from kiln.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def llm(hf_model_dir):
    path, _ = hf_model_dir("llama")
    return LLM(str(path), device="cpu", max_model_len=64)


def test_prompt_longer_than_context_names_both_numbers(llm):
    with pytest.raises(InputError, match=r"70 tokens.*max_model_len is 64"):
        llm.generate(prompt_token_ids=[[5] * 70])
    llm.engine.block_manager.check_all_free()


def test_token_id_outside_vocab(llm):
    with pytest.raises(InputError, match=r"token id 9999 .*\[0, 384\)"):
        llm.generate(prompt_token_ids=[[5, 9999]])
    with pytest.raises(InputError, match="empty prompt"):
        llm.generate(prompt_token_ids=[[]])


def test_one_bad_prompt_queues_nothing(llm):
    with pytest.raises(InputError):
        llm.generate(prompt_token_ids=[[5, 6], [5] * 100])
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("temperature", -0.5, ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_k", -3, ">= 1"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 3.0, "[-2, 2]"),
        ("max_tokens", 0, ">= 1"),
        ("n", 0, ">= 1"),
        ("logprobs", 50, "[0, 20]"),
    ],
)
def test_invalid_sampling_value_names_field_and_range(field, value, allowed):
    with pytest.raises(
        InputError,
        match=rf"{field}={value!r}.*{allowed}".replace("[", r"\[")
        .replace("(", r"\(")
        .replace(")", r"\)"),
    ):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError):  # InputError is a ValueError too
        SamplingParams(**{field: value})


def test_kv_pool_too_small_for_one_sequence_is_a_startup_error(hf_model_dir):
    path, _ = hf_model_dir("llama")
    with pytest.raises(ConfigError, match=r"2 blocks.*256-token sequence.*16 blocks.*MiB"):
        LLM(str(path), device="cpu", num_kv_blocks=2)


def test_unknown_engine_argument(hf_model_dir):
    path, _ = hf_model_dir("llama")
    with pytest.raises(InputError, match="max_num_seq"):
        LLM(str(path), device="cpu", max_num_seq=4)


def test_n_beyond_max_num_seqs_is_refused_not_queued_forever(hf_model_dir):
    from kiln.engine import LLM, SamplingParams
    from kiln.errors import InputError

    llm = LLM(str(hf_model_dir("llama")[0]), device="cpu", max_num_seqs=2)
    with pytest.raises(InputError, match="max_num_seqs=2") as e:
        llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(n=3))
    assert e.value.param == "n"
    out = llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(n=2))
    assert len(out[0].outputs) == 2
