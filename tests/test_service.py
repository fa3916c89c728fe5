"""The HTTP service: every endpoint, auth on and off, bad input -> 4xx (never 5xx), degrading, shedding,
readiness, real-time events, refusal of corrupted artifacts, one real uvicorn process on loopback, and
NDCG@10 through HTTP equal to the offline path.

Uses the tiny pipeline of ``tests/test_recommender.py`` (a hybrid retriever artifact and a tiny random
one-pass ranker).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from test_recommender import TINY_CONFIG, BrokenRanker, build_tiny_pipeline, wait_ready

from data.errors import OverloadedError
from pipeline.recommender import Recommender
from pipeline.recommender_config import RecommenderConfig, ServiceConfig
from pipeline.service import create_app

CONFIG = TINY_CONFIG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def rec(tiny):
    recommender = Recommender.load(tiny["artifact"], tiny["ranker"], config=RecommenderConfig(**CONFIG))
    yield recommender
    recommender.close()



@pytest.fixture(scope="module")
def client(rec):
    with TestClient(create_app(rec, ServiceConfig(max_k=50, max_candidates=30, max_history=40,
                                                   max_body_bytes=4096))) as test_client:
        wait_ready(test_client)
        yield test_client


def user_of(tiny, index: int = 0) -> int:
    return int(tiny["split"].users.ids[index])


# ---- every endpoint ----------------------------------------------------------------------------------
def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["model"]["reranker"] and ready["model"]["retriever"] == "hybrid"
    client.post("/recommend", json={"user_id": 1, "k": 5})
    text = client.get("/metrics").text
    for name in ('shortlist_stage_latency_seconds_bucket{le="0.05",stage="rerank"}', "shortlist_queue_depth",
                 "shortlist_rerank_batch_jobs_count", 'shortlist_requests_total{endpoint="/recommend",status="200"}'):
        assert name in text


def test_recommend_returns_the_recommenders_answer(client, rec, tiny):
    user = user_of(tiny, 3)
    body = client.post("/recommend", json={"user_id": user, "k": 7, "budget_ms": 10_000}).json()
    direct = rec.recommend(user, k=7, budget_ms=60_000)
    assert [i["item_id"] for i in body["items"]] == direct.item_ids
    assert body["path"] == "reranked" and body["reranked_m"] == 20 and body["degraded"] is False
    assert set(body["timings_ms"]) >= {"retrieve", "filter", "plan", "rerank", "blend", "total"}
    first = body["items"][0]
    assert first["rank"] == 1 and first["reranked"] and first["title"] and len(first["because"]) >= 1
    cold = client.post("/recommend", json={"user_id": 10**9, "k": 3}).json()
    assert cold["path"] == "cold_start" and len(cold["items"]) == 3


def test_rerank_returns_the_ecosystem_shape(client, rec, tiny):
    candidates = [int(i) for i in tiny["split"].items.ids[5:17]]
    user = user_of(tiny, 2)
    body = client.post("/rerank", json={"user_id": user, "candidates": candidates, "top_n": 5}).json()
    scores = rec.ranker.score(rec.retriever.stored_history(user), candidates)
    order = np.argsort(-scores, kind="stable")[:5]
    assert [r["index"] for r in body["results"]] == order.tolist()
    assert [r["item_id"] for r in body["results"]] == [candidates[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores[order], rtol=1e-5, atol=1e-5)
    by_history = client.post("/rerank", json={"history": candidates[:2], "candidates": candidates}).json()
    assert len(by_history["results"]) == len(candidates)


def test_events_change_the_next_recommendation(client, tiny):
    user = user_of(tiny, 9)
    before = client.post("/recommend", json={"user_id": user, "k": 10, "budget_ms": 10_000}).json()
    top = before["items"][0]["item_id"]
    answer = client.post("/events", json={"user_id": user, "item_id": top, "timestamp": 2_000_000_000}).json()
    assert answer["history_length"] == before["history_length"] + 1
    after = client.post("/recommend", json={"user_id": user, "k": 10, "budget_ms": 10_000}).json()
    assert after["history_length"] == answer["history_length"]
    assert top not in [i["item_id"] for i in after["items"]]


# ---- bad input ---------------------------------------------------------------------------------------
BAD = [
    ("/recommend", {"user_id": "abc"}, "user_id"),
    ("/recommend", {"user_id": 1, "k": "10"}, "k"),
    ("/recommend", {"user_id": 1, "k": 0}, "k"),
    ("/recommend", {"user_id": 1, "k": 51}, "k"),
    ("/recommend", {"user_id": 1.5}, "user_id"),
    ("/recommend", {"user_id": 2**70}, "user_id"),
    ("/recommend", {"history": [2**64]}, "history"),
    ("/recommend", {"history": [1.5, 2]}, "history"),
    ("/recommend", {"history": "1,2"}, "history"),
    ("/recommend", {"user_id": 1, "budget_ms": -5}, "budget_ms"),
    ("/recommend", {"user_id": 1, "exclude_seen": "yes"}, "exclude_seen"),
    ("/recommend", {"user_id": 1, "colour": "red"}, "colour"),
    ("/recommend", {"history": [10**9]}, "history"),
    ("/recommend", {"user_id": 1, "allow": [10**9]}, "allow"),
    ("/recommend", {"history": list(range(1, 42))}, "history"),
    ("/recommend", {"k": 5}, "body"),
    ("/recommend", None, "body"),
    ("/rerank", {"user_id": 1, "candidates": [10**9]}, "candidates"),
    ("/rerank", {"user_id": 1, "candidates": []}, "candidates"),
    ("/rerank", {"user_id": 1, "candidates": list(range(1, 32))}, "candidates"),
    ("/rerank", {"user_id": 1, "candidates": [1], "top_n": 0}, "top_n"),
    ("/rerank", {"candidates": [1, 2]}, "body"),
    ("/rerank", {"history": [10**9], "candidates": [1]}, "history"),
    ("/events", {"user_id": 1, "item_id": 10**9}, "item_id"),
    ("/events", {"user_id": 1}, "item_id"),
    ("/events", {"user_id": "x", "item_id": 1}, "user_id"),
]


@pytest.mark.parametrize("path,body,field", BAD)
def test_bad_input_gets_a_422_naming_the_field(client, path, body, field):
    response = client.post(path, json=body) if body is not None else client.post(path)
    assert response.status_code == 422, response.text
    locs = [e["loc"] for e in response.json()["detail"]]
    assert any(field in [str(part) for part in loc] for loc in locs), locs


def test_malformed_json_and_oversize_bodies_are_refused_with_4xx(client):
    response = client.post("/recommend", content=b'{"user_id": 1,', headers={"content-type": "application/json"})
    assert response.status_code == 422
    huge = {"user_id": 1, "deny": list(range(10**6, 10**6 + 2000))}  # over max_body_bytes=4096
    response = client.post("/recommend", json=huge)
    assert response.status_code == 413 and "4096" in response.json()["detail"]
    assert client.get("/nowhere").status_code == 404
    assert client.get("/recommend").status_code == 405


# ---- auth ----------------------------------------------------------------------------------------------
def test_auth_on_needs_the_bearer_key_and_keeps_probes_open(rec, monkeypatch):
    monkeypatch.setenv("SHORTLIST_API_KEY", "s3cret")
    with TestClient(create_app(rec, ServiceConfig(warm_up=False))) as authed:
        wait_ready(authed)
        assert authed.get("/healthz").status_code == 200 and authed.get("/readyz").status_code == 200
        assert authed.post("/recommend", json={"user_id": 1}).status_code == 401
        wrong = authed.post("/recommend", json={"user_id": 1}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert authed.get("/metrics").status_code == 401
        right = authed.post("/recommend", json={"user_id": 1}, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200


def test_auth_off_when_the_variable_is_unset(rec, monkeypatch):
    monkeypatch.delenv("SHORTLIST_API_KEY", raising=False)
    with TestClient(create_app(rec, ServiceConfig(warm_up=False))) as open_client:
        wait_ready(open_client)
        assert open_client.post("/recommend", json={"user_id": 1}).status_code == 200


# ---- failures and overload --------------------------------------------------------------------------
def test_a_failing_reranker_degrades_and_is_counted(rec, tiny):
    broken = Recommender(rec.retriever, BrokenRanker(rec.ranker, "raise"), config=RecommenderConfig(**CONFIG))
    with TestClient(create_app(broken, ServiceConfig(warm_up=False))) as bad:
        wait_ready(bad)
        user = user_of(tiny, 4)
        body = bad.post("/recommend", json={"user_id": user, "k": 10, "budget_ms": 500}).json()
        assert body["degraded"] and body["degraded_reason"] == "error" and body["path"] == "retrieval"
        assert [i["item_id"] for i in body["items"]] == rec.retriever.retrieve(user, 40)[0][:10].tolist()
        assert 'shortlist_degraded_responses_total{reason="error"} 1.0' in bad.get("/metrics").text
        response = bad.post("/rerank", json={"user_id": user, "candidates": [int(tiny["split"].items.ids[0])]})
        assert response.status_code == 503 and "reranker failed" in response.json()["detail"]


def test_overload_sheds_with_503_and_recommend_degrades(rec, tiny, monkeypatch):
    busy = Recommender(rec.retriever, rec.ranker, config=RecommenderConfig(**CONFIG))

    def full(*args, **kwargs):
        raise OverloadedError("rerank-batcher: 64 jobs already queued (max_queue=64); shed this request")

    with TestClient(create_app(busy, ServiceConfig(warm_up=False))) as shed:
        wait_ready(shed)
        monkeypatch.setattr(busy.batcher, "submit", full)
        response = shed.post("/rerank", json={"user_id": 1, "candidates": [int(tiny["split"].items.ids[0])]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        body = shed.post("/recommend", json={"user_id": user_of(tiny), "k": 5}).json()
        assert body["degraded"] and body["degraded_reason"] == "overloaded"


def test_requests_beyond_max_in_flight_are_shed(rec, tiny):
    slow = Recommender(rec.retriever, BrokenRanker(rec.ranker, "sleep"), config=RecommenderConfig(**CONFIG))
    with TestClient(create_app(slow, ServiceConfig(warm_up=False, max_in_flight=1))) as limited:
        wait_ready(limited)
        body = {"user_id": 1, "candidates": [int(tiny["split"].items.ids[0])]}
        first = threading.Thread(target=limited.post, args=("/rerank",), kwargs={"json": body})
        first.start()
        time.sleep(0.3)  # the first request now waits on the 1 s reranker
        second = limited.post("/recommend", json={"user_id": 1})
        first.join()
        assert second.status_code == 503 and "in flight" in second.json()["detail"]
        assert 'shortlist_shed_requests_total{reason="in_flight"} 1.0' in limited.get("/metrics").text


def test_not_ready_until_loaded_and_warmed(rec):
    release = threading.Event()

    def loader():
        release.wait(10)
        return Recommender(rec.retriever, rec.ranker, config=RecommenderConfig(**CONFIG))

    with TestClient(create_app(loader, ServiceConfig())) as starting:
        assert starting.get("/healthz").status_code == 200
        assert starting.get("/readyz").status_code == 503
        assert starting.post("/recommend", json={"user_id": 1}).status_code == 503
        release.set()
        wait_ready(starting)
        assert starting.post("/recommend", json={"user_id": 1}).status_code == 200


def test_serve_refuses_a_corrupted_artifact_with_a_clear_message(tiny, tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setattr("pipeline.serve.configure_threads", lambda *args, **kwargs: None)  # keep pytest's threads

    copy = tmp_path / "artifact"
    shutil.copytree(tiny["artifact"], copy)
    (copy / "items.parquet").write_bytes(b"not parquet")
    assert main(["serve", "--artifacts", str(copy), "--ranker", str(tiny["ranker"])]) == 2
    err = capsys.readouterr().err
    assert "items.parquet" in err and "checksum" in err


# ---- quality through HTTP ----------------------------------------------------------------------------
def test_ndcg_through_http_equals_the_offline_path(client, rec, tiny):
    from benchmarks.load import http_vs_offline
    from retrieval.evaluate import targets_by_user

    users, relevant = targets_by_user(tiny["split"], "test")

    def post(body):
        response = client.post("/recommend", json=body)
        assert response.status_code == 200
        return response.json()

    pick = np.arange(0, users.size, 2)[:30]
    users_sample = users[pick]
    fresh = [i for i, u in enumerate(users_sample) if not rec.observed(int(u))]  # /events changed the others
    result = http_vs_offline(post, rec.retriever, rec.ranker, users_sample[fresh],
                             [relevant[pick[i]] for i in fresh], len(tiny["split"].items), m=20, retrieve_k=40)
    assert result["users"] == len(fresh) >= 25
    assert result["identical_lists"] == result["users"]
    assert result["NDCG@10_http"] == pytest.approx(result["NDCG@10_offline"], abs=1e-12)
    assert result["paths"] == {"reranked M=20": len(fresh)}


# ---- a real uvicorn process ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_uvicorn_process_on_loopback(tiny, tmp_path):
    import httpx

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    RecommenderConfig(**CONFIG).save(tmp_path / "config.json")
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.serve", "--artifacts", str(tiny["artifact"]),
             "--ranker", str(tiny["ranker"]), "--port", str(port), "--config", str(tmp_path / "config.json"),
             "--threads", "1"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "SHORTLIST_API_KEY": "k3y"})
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer k3y"}

        def post(path, body, headers=auth):
            return httpx.post(f"{url}{path}", json=body, headers=headers)

        try:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.3)
            user = user_of(tiny, 6)
            assert post("/recommend", {"user_id": user}, headers={}).status_code == 401
            body = post("/recommend", {"user_id": user, "k": 5, "budget_ms": 5000}).json()
            assert len(body["items"]) == 5 and body["path"] == "reranked"
            top = body["items"][0]["item_id"]
            assert post("/events", {"user_id": user, "item_id": top}).status_code == 200
            again = post("/recommend", {"user_id": user, "k": 5, "budget_ms": 5000}).json()
            assert top not in [i["item_id"] for i in again["items"]]
            ranked = post("/rerank", {"user_id": user, "candidates": [top, int(tiny["split"].items.ids[0])]}).json()
            assert sorted(r["index"] for r in ranked["results"]) == [0, 1]
            assert post("/recommend", {"user_id": "x"}).status_code == 422
            assert "shortlist_stage_latency_seconds" in httpx.get(f"{url}/metrics", headers=auth).text
        finally:
            process.terminate()
            process.wait(timeout=20)


def test_sustainable_load_is_the_last_of_an_unbroken_run_of_passing_loads():
    from benchmarks.load import sustainable

    def row(rps, p99, shed=0.0, answered=100):
        return {"offered_rps": rps, "p99_ms": p99, "shed_fraction": shed, "errors": 0, "answered": answered,
                "sent": 100}

    rows = [row(20, 58.0), row(5, 55.0), row(10, 59.0), row(40, 75.0), row(80, 900.0, shed=0.2)]
    assert sustainable(rows, budget_ms=50) == 20  # order-free; 40 misses the 60 ms line
    assert sustainable([row(5, 61.9), row(10, 59.1), row(20, 59.2)], budget_ms=50) is None  # 5 misses
    assert sustainable([row(5, 50.0), row(10, 50.0, shed=0.01)], budget_ms=50) == 5  # shedding fails a load
    assert sustainable([row(5, 50.0, answered=90)], budget_ms=50) is None  # most requests must be answered
