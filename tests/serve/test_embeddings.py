"""Embeddings: kiln.LLM.embed and /v1/embeddings equal transformers' pooled hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

IDS = [[5, 17, 99, 3, 250, 8], [41, 77, 300, 12], [9]]


def transformers_embedding(model_dir, ids: list[int], pooling: str) -> np.ndarray:
    """The reference: AutoModel's last hidden state (after the final norm), pooled, L2-normed."""
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0]
    v = h.mean(0) if pooling == "mean" else h[-1]
    return torch.nn.functional.normalize(v, dim=-1).numpy()


@pytest.fixture(scope="module")
def llm(chat_model_dir):
    from kiln.engine.llm import LLM

    return LLM(str(chat_model_dir), dtype="float32")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_equals_transformers(llm, chat_model_dir, pooling):
    outs = llm.embed(prompt_token_ids=IDS, pooling=pooling)
    for ids, out in zip(IDS, outs):
        want = transformers_embedding(chat_model_dir, ids, pooling)
        assert out.prompt_token_ids == ids
        np.testing.assert_allclose(out.outputs.embedding, want, atol=1e-5, rtol=0)


def test_dimensions_keep_the_first_ones_renormalized(llm):
    full = llm.embed(prompt_token_ids=IDS[0], normalize=False)[0].outputs.embedding
    (cut,) = llm.embed(prompt_token_ids=IDS[0], dimensions=8)
    v = np.asarray(full[:8])
    np.testing.assert_allclose(cut.outputs.embedding, v / np.linalg.norm(v), atol=1e-6)


def test_server_embeddings_float_and_base64(client, chat_model_dir, llm):
    text = "To be, or not to be"
    want = [o.outputs.embedding for o in llm.embed([text]) + llm.embed(prompt_token_ids=IDS)]
    # the openai client asks for base64 by default and decodes it
    got = client.embeddings.create(model="tiny", input=[text])
    assert got.object == "list" and got.data[0].index == 0
    floats = client.embeddings.create(model="tiny", input=IDS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    vecs = [got.data[0].embedding] + [d.embedding for d in floats.data]
    for v, w in zip(vecs, want):
        np.testing.assert_allclose(v, w, atol=1e-5)
    assert floats.usage.prompt_tokens == sum(map(len, IDS)) == floats.usage.total_tokens
    small = client.embeddings.create(model="tiny", input=IDS[0], dimensions=8)
    assert len(small.data[0].embedding) == 8
    assert np.linalg.norm(small.data[0].embedding) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": []}, "input"),
        ({"input": [[1, 10**6]]}, "input"),
        ({"input": "x", "dimensions": 10**4}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [1] * 300}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(http, body, param):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
