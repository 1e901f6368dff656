"""Beam search through /v1/completions (vLLM's use_beam_search and length_penalty): the same
hypotheses as offline, one chunk when streamed, and a dropped request frees its blocks."""

from __future__ import annotations

import json
import socket
import time

import pytest

from serve.live_server import read_metrics, wait_all_blocks_free

PROMPTS = [[5, 17, 42, 99, 3, 250, 8], [300, 12, 77]]


@pytest.fixture(scope="module")
def offline(chat_model_dir):
    from kiln.engine.llm import LLM

    return LLM(str(chat_model_dir), device="cpu")


def _offline_beams(offline, n, length_penalty, max_tokens):
    from kiln.engine.sampling_params import SamplingParams

    params = SamplingParams(n=n, best_of=n, use_beam_search=True, temperature=0,
                            length_penalty=length_penalty, max_tokens=max_tokens)  # fmt: skip
    outs = offline.generate(prompt_token_ids=PROMPTS, sampling_params=params)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_beam_search_equals_offline(http, offline, stream):
    want = _offline_beams(offline, n=3, length_penalty=0.7, max_tokens=9)
    body = {"prompt": PROMPTS, "n": 3, "use_beam_search": True, "length_penalty": 0.7,
            "max_tokens": 9, "stream": stream}  # fmt: skip
    if not stream:
        choices = http.post("/v1/completions", json=body).json()["choices"]
        assert [(c["text"], c["finish_reason"]) for c in choices] == want
        return
    got: dict[int, list] = {}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    assert c["index"] not in got  # the whole hypothesis in one chunk
                    got[c["index"]] = [c["text"], c["finish_reason"]]
    assert [tuple(got[i]) for i in sorted(got)] == want


@pytest.mark.parametrize(
    "change, param", [({"temperature": 0.5}, "temperature"), ({"n": 1}, "n"), ({"n": 11}, "n"),
                      ({"length_penalty": 0}, "length_penalty")],
)  # fmt: skip
def test_bad_beam_search_fields_are_400(http, change, param):
    body = {"prompt": PROMPTS[0], "n": 2, "use_beam_search": True, **change}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_dropped_beam_search_frees_every_block(server):
    body = b'{"prompt": [5, 6, 7], "n": 4, "use_beam_search": true, "max_tokens": 200}'
    before = read_metrics(server.url)["kiln:generation_tokens_total"]
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        deadline = time.monotonic() + 10
        while read_metrics(server.url)["kiln:generation_tokens_total"] < before + 12:
            assert time.monotonic() < deadline, "the beam search never ran"
            time.sleep(0.01)
    tokens = wait_all_blocks_free(server.url)["kiln:generation_tokens_total"]
    time.sleep(0.3)
    assert read_metrics(server.url)["kiln:generation_tokens_total"] == tokens  # no step after
    assert tokens < before + 4 * 200
