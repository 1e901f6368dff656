"""LoRA adapters over HTTP: `model` selects one, /v1/models lists them, and adapters load and
unload at run time (behind the API key, only from under --lora-root) under live traffic."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from tiny_models import save_peft_adapter

from serve.live_server import ServerThread, wait_all_blocks_free

pytest.importorskip("peft")
KEY = {"Authorization": "Bearer k"}
PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def lora_server(chat_model_dir, hf_model_dir, tmp_path_factory):
    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.api import create_app

    _, hf = hf_model_dir("llama")
    root = tmp_path_factory.mktemp("lora_root")
    save_peft_adapter(hf, root / "a", 8, 16, ["q_proj", "v_proj"], seed=1)
    save_peft_adapter(hf, root / "b", 4, 8, ["o_proj", "down_proj"], seed=2)
    save_peft_adapter(hf, root / "c", 8, 8, ["k_proj", "up_proj"], seed=3)
    (root / "empty").mkdir()
    engine = AsyncLLM(str(chat_model_dir), enable_lora=True, max_loras=2, max_cpu_loras=2,
                      max_lora_rank=8, max_num_seqs=32, async_scheduling=True)  # fmt: skip
    app = create_app(engine, "tiny", api_key="k", public_metrics=True,
                     lora_modules={"a": str(root / "a")},
                     lora_root=str(root))  # fmt: skip
    with ServerThread(app) as s:
        yield s, root


def _complete(http, model, prompt=PROMPT):
    body = dict(model=model, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True)
    return http.post("/v1/completions", json=body, headers=KEY)


def test_model_field_selects_the_adapter(lora_server, chat_model_dir):
    import kiln
    from kiln import LoRARequest, SamplingParams

    server, root = lora_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        models = http.get("/v1/models", headers=KEY).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("a", "tiny")]
        base = _complete(http, "tiny").json()["choices"][0]["text"]
        adapted = _complete(http, "a").json()["choices"][0]["text"]
    llm = kiln.LLM(str(chat_model_dir), enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = llm.generate(PROMPT, params, lora_request=LoRARequest("a", 1, str(root / "a")))
    assert adapted == want[0].outputs[0].text != base


def test_load_and_unload_errors(lora_server):
    server, root = lora_server
    with httpx.Client(base_url=server.url, timeout=60) as http:

        def load(name, path, headers=KEY):
            body = {"lora_name": name, "lora_path": path}
            return http.post("/v1/load_lora_adapter", json=body, headers=headers)

        assert load("x", str(root / "b"), headers={}).status_code == 401
        outside = load("x", "../" + root.parent.name)
        assert outside.status_code == 400 and "outside --lora-root" in outside.text
        missing = load("x", "empty")
        assert missing.status_code == 400 and "is not a PEFT adapter" in missing.text
        assert missing.json()["error"]["param"] == "lora_path"
        assert load("a", "b").status_code == 400  # the name is taken
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=KEY)
        assert gone.status_code == 404
        assert _complete(http, "x").status_code == 404


def test_load_unload_under_traffic_fails_no_request(lora_server):
    """Requests for base, a and b run while c loads and b unloads; every one finishes."""
    server, _ = lora_server

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            body = {"lora_name": "b", "lora_path": "b"}
            assert (await http.post("/v1/load_lora_adapter", headers=KEY, json=body)).is_success

            async def one(model, i):
                body = dict(model=model, prompt=f"{PROMPT} {i}", max_tokens=24, temperature=0,
                            ignore_eos=True)  # fmt: skip
                return await http.post("/v1/completions", json=body, headers=KEY)

            first = [asyncio.create_task(one(m, i)) for i, m in enumerate(["tiny", "a", "b"] * 8)]
            await asyncio.sleep(0.05)
            load = await http.post("/v1/load_lora_adapter", headers=KEY,
                                   json={"lora_name": "c", "lora_path": "c"})  # fmt: skip
            unload = await http.post("/v1/unload_lora_adapter", headers=KEY,
                                     json={"lora_name": "b"})  # fmt: skip
            second = [asyncio.create_task(one(m, i)) for i, m in enumerate(["c", "a"] * 8)]
            done = await asyncio.gather(*first, *second)
            after = await one("b", 0)
            return load, unload, done, after

    load, unload, done, after = asyncio.run(main())
    assert load.status_code == 200 and unload.status_code == 200
    assert [r.status_code for r in done] == [200] * len(done)
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in done)
    assert after.status_code == 404
    wait_all_blocks_free(server.url, timeout=30)


def test_embeddings_refuse_an_adapter(lora_server):
    server, _ = lora_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/embeddings", json={"model": "a", "input": "hi"}, headers=KEY)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
