"""Many clients at once, and clients that leave early: every block goes back to the pool."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx

from serve.live_server import read_metrics, wait_all_blocks_free

PROMPTS = ["To be, or not", "Who is there?", "Horatio says", "The king"]
NUM_CLIENTS = 64
MAX_TOKENS = 16


def test_64_concurrent_streams_all_complete(server, client):
    from openai import AsyncOpenAI

    want = {
        p: client.completions.create(
            model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        ).choices[0].text
        for p in PROMPTS
    }  # fmt: skip

    async def one(c: AsyncOpenAI, prompt: str) -> tuple[str, int]:
        stream = await c.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage = "", None
        async for chunk in stream:
            text += "".join(ch.text for ch in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def main():
        async with AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120
        ) as c:
            jobs = [one(c, PROMPTS[i % len(PROMPTS)]) for i in range(NUM_CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    results = asyncio.run(main())
    for i, (text, num_tokens) in enumerate(results):
        assert text == want[PROMPTS[i % len(PROMPTS)]]
        assert num_tokens == MAX_TOKENS
    wait_all_blocks_free(server.url)


def _finished_total(url: str, reason: str | None = None) -> float:
    m = read_metrics(url)
    name = "kiln:request_success_total"
    if reason is not None:
        name += f'{{finished_reason="{reason}"}}'
    return sum(v for k, v in m.items() if k.startswith(name))


def test_dropped_streams_free_their_blocks(server):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 200, "ignore_eos": True, "stream": True}
    finished_before = _finished_total(server.url)
    aborted_before = _finished_total(server.url, "abort")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(8)]
        for s in streams:
            lines = s.__enter__().iter_lines()
            for _ in range(3):  # a few events in: the request holds KV blocks now
                next(line for line in lines if line.startswith("data:"))
        m = read_metrics(server.url)
        assert m["kiln:kv_cache_free_blocks"] < m["kiln:kv_cache_total_blocks"]
        for s in streams:
            s.__exit__(None, None, None)
    wait_all_blocks_free(server.url)
    # aborted, not run to the end, and counted as aborts
    assert _finished_total(server.url) == finished_before + 8
    assert _finished_total(server.url, "abort") == aborted_before + 8


def test_dropped_plain_request_is_aborted(server):
    body = b'{"prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": true}'
    finished_before = _finished_total(server.url)
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        deadline = time.monotonic() + 10
        while read_metrics(server.url)["kiln:num_requests_running"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    wait_all_blocks_free(server.url)
    assert _finished_total(server.url) == finished_before + 1  # as an abort
