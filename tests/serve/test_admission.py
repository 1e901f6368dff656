"""--api-key (401) and the bounded queue (429 with Retry-After) on a server with room for two."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from fake_engine import IdleEngine

from serve.live_server import start_server, wait_all_blocks_free

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def small(chat_model_dir):
    """One sequence runs, one may wait, nothing more."""
    with start_server(
        chat_model_dir, api_key=KEY, max_queue=1, max_num_seqs=1, public_metrics=True
    ) as s:
        yield s


def test_missing_or_wrong_key_is_401(small):
    body = {"prompt": "Hi", "max_tokens": 1}
    with httpx.Client(base_url=small.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = http.post("/v1/completions", json=body, headers=headers)
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/completions", json=body, headers=AUTH).status_code == 200
        assert http.get("/health").status_code == 200  # probes need no key


def test_openai_client_with_key(small):
    from openai import AuthenticationError, OpenAI

    with OpenAI(base_url=f"{small.url}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
    with OpenAI(base_url=f"{small.url}/v1", api_key="nope", max_retries=0, timeout=30) as c:
        with pytest.raises(AuthenticationError):
            c.models.list()


def test_past_the_queue_is_429_with_retry_after(small):
    with httpx.Client(base_url=small.url, timeout=30, headers=AUTH) as http:
        with contextlib.ExitStack() as held:
            for _ in range(2):  # one running, one waiting: the gate is full
                resp = held.enter_context(http.stream("POST", "/v1/completions", json=LONG))
                assert resp.status_code == 200
            over = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert over.status_code == 429
            assert over.headers["Retry-After"] == "1"
            assert over.json()["error"]["type"] == "rate_limit_error"
            too_many = http.post("/v1/completions", json={"prompt": "Hi", "n": 3})
            assert too_many.status_code == 400  # could never fit
            embed = http.post("/v1/embeddings", json={"input": "Hi", "model": "tiny"})
            assert embed.status_code == 429  # embeddings pass the same gate
        # the streams closed: their requests were aborted and the gate opens again
        wait_all_blocks_free(small.url)
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).is_success
        assert http.post("/v1/embeddings", json={"input": "Hi", "model": "tiny"}).is_success
        metrics = http.get("/metrics").text
        assert 'kiln:request_rejected_total{reason="queue_full"} 2.0' in metrics


def test_engine_stopping_is_503_not_500():
    """A request racing the drain gets the OpenAI-shaped 503, never a 500."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from kiln.engine.async_engine import EngineStopped
    from kiln.serve.api import _add_error_handlers

    app = FastAPI()
    _add_error_handlers(app)

    @app.get("/boom")
    async def boom():
        await asyncio.sleep(0)
        raise EngineStopped("the engine is shutting down")

    r = TestClient(app).get("/boom")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable"


@pytest.mark.parametrize("stream", [False, True])
def test_n_beyond_max_num_seqs_is_400_and_does_not_wedge_the_queue(small, stream):
    # max_num_seqs=1, max_queue=1: n=2 fits the admission capacity but can never run at once
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "n": 2, "temperature": 1.0, "stream": stream}
    with httpx.Client(base_url=small.url, timeout=30, headers=AUTH) as http:
        resp = http.post("/v1/completions", json=body)
        assert resp.status_code == 400
        err = resp.json()["error"]
        assert err["param"] == "n" and "max_num_seqs=1" in err["message"]
        ok = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
        assert ok.status_code == 200  # the next request is served, not stuck behind it
    wait_all_blocks_free(small.url)


@pytest.mark.parametrize("public_metrics", [False, True])
def test_api_key_guards_metrics_and_openapi_unless_metrics_are_public(public_metrics):
    from fastapi.testclient import TestClient

    from kiln.serve.api import create_app

    app = create_app(IdleEngine(), "tiny", api_key=KEY, public_metrics=public_metrics)
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/openapi.json").status_code == 401
        assert http.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "kiln"
        assert http.get("/metrics").status_code == (200 if public_metrics else 401)
        assert http.get("/metrics", headers=AUTH).status_code == 200
        for scheme in ("bearer", "BEARER", "Bearer "):
            assert http.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).json()


def test_non_json_bodies_are_415(small):
    with httpx.Client(base_url=small.url, timeout=30, headers=AUTH) as http:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = http.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 1}',
                          headers={"Content-Type": kind})  # fmt: skip
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_api_key_from_the_environment(monkeypatch):
    from kiln.cli import build_parser

    monkeypatch.setenv("KILN_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.api_key == "from-env"
