"""Rollout: canary weights, sticky sessions, rollback rules, drift; and over HTTP, shadow
traffic that never changes the answer and a slow candidate rolled back by the rules."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
from tiny_models import save_peft_adapter

from kiln.errors import InputError
from kiln.serve.rollout import Outcome, RolloutTable, psi
from serve.live_server import ServerThread, read_metrics


def _table(rules=None, **route):
    spec = {"versions": {"v1": 95, "v2": 5}, "stable": "v1", **route}
    if rules is not None:
        spec["rules"] = rules
    return RolloutTable.from_dict({"routes": {"m": spec}})


def test_canary_split_is_within_a_few_percent_over_1000_requests():
    table = _table()
    table.rng.seed(0)
    share = sum(table.pick("m") == "v2" for _ in range(1000)) / 1000
    assert abs(share - 0.05) < 0.02


def test_sticky_header_keeps_a_user_on_one_version():
    table = _table()
    for user in ("alice", "bob", "carol"):
        assert len({table.pick("m", user) for _ in range(50)}) == 1
    share = sum(table.pick("m", f"user{i}") == "v2" for i in range(1000)) / 1000
    assert abs(share - 0.05) < 0.02


@pytest.mark.parametrize(
    "rules,outcome,why",
    [
        ({"max_error_rate": 0.1}, Outcome(False, 0.1), "error rate 100.0% > 10.0%"),
        ({"max_p95_latency_s": 1.0}, Outcome(True, 3.0, -1.0, 8), "p95 latency 3.000 s > 1.0"),
        ({"min_mean_logprob": -2.0}, Outcome(True, 0.1, -5.0, 8), "mean logprob -5.000 < -2.0"),
    ],
)
def test_a_broken_candidate_is_rolled_back_with_the_reason(rules, outcome, why):
    table = _table({"min_requests": 10, **rules})
    reasons = [table.record("m", "v2", outcome) for _ in range(10)]
    assert reasons[:9] == [None] * 9 and why in reasons[9]
    assert why in table.routes["m"].rolled_back["v2"]
    assert {table.pick("m") for _ in range(200)} == {"v1"}
    for _ in range(20):  # the stable version is never rolled back
        assert table.record("m", "v1", outcome) is None


def test_quality_drop_against_the_stable_version():
    table = _table({"min_requests": 5, "max_logprob_drop": 0.5})
    for _ in range(5):
        table.record("m", "v1", Outcome(True, 0.1, -1.0, 8))
    for _ in range(4):
        assert table.record("m", "v2", Outcome(True, 0.1, -1.2, 8)) is None
    assert "v2" not in table.routes["m"].rolled_back  # 0.2 below: within the margin
    why = table.record("m", "v2", Outcome(True, 0.1, -3.0, 8))  # the window's mean: -1.56
    assert "0.560 below the stable version's -1.000" in why


def test_drift_signal_sees_a_shift_in_output_length():
    rng = random.Random(0)
    same = psi([rng.gauss(100, 10) for _ in range(500)], [rng.gauss(100, 10) for _ in range(500)])
    moved = psi([rng.gauss(100, 10) for _ in range(500)], [rng.gauss(130, 10) for _ in range(500)])
    assert same < 0.1 < 0.25 < moved
    table = _table({"window": 50})
    for n in [100] * 50 + [40] * 50:
        table.record("m", "v1", Outcome(True, 0.1, -1.0, n))
    assert table.drift("m", "v1")["output_tokens"] > 0.25


def test_bad_tables_are_input_errors():
    with pytest.raises(InputError, match="names models not served: \\['v9'\\]"):
        RolloutTable.from_dict({"routes": {"m": {"versions": {"v9": 1}}}}, known={"v1"})
    with pytest.raises(InputError, match="weights must be >= 0"):
        RolloutTable.from_dict({"routes": {"m": {"versions": {"v1": 0}}}})
    with pytest.raises(InputError, match="route 'm'"):
        RolloutTable.from_dict({"routes": {"m": {"versions": {"v1": 1}, "rules": {"bad": 1}}}})


@pytest.fixture(scope="module")
def rollout_server(chat_model_dir, hf_model_dir, tmp_path_factory):
    pytest.importorskip("peft")
    from kiln.engine.async_engine import AsyncLLM
    from kiln.serve.api import create_app

    _, hf = hf_model_dir("llama")
    root = tmp_path_factory.mktemp("rollout")
    save_peft_adapter(hf, root / "a", 8, 16, ["q_proj", "v_proj"], seed=1)
    config = {"routes": {
        "shadowed": {"versions": {"tiny": 1}, "shadow": ["a"]},
        "canary": {"versions": {"tiny": 50, "a": 50}, "stable": "tiny",
                   "rules": {"min_requests": 4, "max_p95_latency_s": 1e-6}},
    }}  # fmt: skip
    (root / "rollout.json").write_text(json.dumps(config))
    engine = AsyncLLM(str(chat_model_dir), enable_lora=True, max_lora_rank=8, max_num_seqs=16)
    app = create_app(engine, "tiny", lora_modules={"a": str(root / "a")},
                     rollout_config=str(root / "rollout.json"))  # fmt: skip
    with ServerThread(app) as s:
        yield s


def _text(http, model, prompt="Who is there?", **headers):
    body = dict(model=model, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True)
    r = http.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_shadow_traffic_never_changes_the_answer(rollout_server):
    with httpx.Client(base_url=rollout_server.url, timeout=60) as http:
        base, adapted = _text(http, "tiny"), _text(http, "a")
        assert base != adapted
        assert [_text(http, "shadowed") for _ in range(3)] == [base] * 3
        deadline = time.monotonic() + 30
        key = 'kiln:rollout_requests_total{route="shadowed",version="a"}'
        while read_metrics(rollout_server.url).get(key, 0) < 3:
            assert time.monotonic() < deadline, "the shadow requests were not measured"
            time.sleep(0.05)
        assert "shadowed" in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_slow_candidate_is_rolled_back_by_the_rules(rollout_server):
    with httpx.Client(base_url=rollout_server.url, timeout=60) as http:
        base = _text(http, "tiny")
        for i in range(12):  # "a" breaks the (impossible) latency rule within 4 requests
            _text(http, "canary", **{"x-session-id": f"user{i}"})
        m = read_metrics(rollout_server.url)
        assert m['kiln:rollout_weight{route="canary",version="a"}'] == 0
        assert m['kiln:rollout_weight{route="canary",version="tiny"}'] == 50
        assert [_text(http, "canary", **{"x-session-id": f"u{i}"}) for i in range(6)] == [base] * 6
