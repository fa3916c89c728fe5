"""Reliability of the HTTP service (issue 14, items 1, 5 and 6): slow clients never take a slot nor the
probes down, a body that does not arrive gets 408, each 503 is counted once with one reason, form/text
bodies get 415, /readyz shows no file-system path, the OpenAPI spec says what /metrics is.

The slow-client test runs a real uvicorn server in a thread on loopback (raw sockets hold connections).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest

pytest.importorskip("fastapi")
import httpx
from fastapi.testclient import TestClient
from test_recommender import TINY_CONFIG, BrokenRanker, build_tiny_pipeline, wait_ready

from pipeline.recommender import Recommender
from pipeline.recommender_config import RecommenderConfig, ServiceConfig
from pipeline.service import create_app

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+

CONFIG = TINY_CONFIG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def rec(tiny):
    recommender = Recommender.load(tiny["artifact"], tiny["ranker"], config=RecommenderConfig(**CONFIG))
    yield recommender
    recommender.close()



class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread (no signal handlers there)."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        wait_ready(httpx.Client(base_url=self.url))
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def slow_client(port: int) -> socket.socket:
    """Headers and a part of a 100-byte body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"user_id\": ")
    return sock


# ---- item 1: slow clients ----------------------------------------------------------------------------
def test_slow_clients_hold_no_slot_and_the_probes_still_answer(rec, tiny):
    config = ServiceConfig(max_in_flight=8, body_timeout_s=3.0, warm_up=False)
    with LiveServer(create_app(rec, config)) as live:
        sockets = [slow_client(live.port) for _ in range(64)]
        try:
            time.sleep(0.3)  # every slow request is now inside the app, waiting for its body
            with httpx.Client(base_url=live.url, timeout=5) as client:
                for path in ("/healthz", "/readyz"):
                    started = time.perf_counter()
                    response = client.get(path)
                    took = time.perf_counter() - started
                    assert response.status_code == 200, (path, response.text)
                    assert took < config.body_timeout_s / 2, (path, took)  # not queued behind the bodies
                user = int(tiny["split"].users.ids[0])
                answer = client.post("/recommend", json={"user_id": user, "k": 5, "budget_ms": 2000})
                assert answer.status_code == 200 and len(answer.json()["items"]) == 5
                # only the /metrics request itself is in flight: the 64 waiting sockets hold no slot
                assert "shortlist_in_flight_requests 1.0" in client.get("/metrics").text
            # the slow bodies never arrive: each connection gets 408 after body_timeout_s, then is closed
            sockets[0].settimeout(config.body_timeout_s + 5)
            reply = b""
            while chunk := sockets[0].recv(4096):  # until the server closes the connection
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
            assert b"did not arrive" in reply
            time.sleep(0.3)
            with httpx.Client(base_url=live.url, timeout=5) as client:
                text = client.get("/metrics").text
            assert "shortlist_body_timeouts_total 64.0" in text
            assert "shortlist_shed_requests_total" not in text.replace("# HELP shortlist_shed_requests_total", "") \
                .replace("# TYPE shortlist_shed_requests_total", "")
        finally:
            for sock in sockets:
                sock.close()


# ---- item 5: one reason per 503 ------------------------------------------------------------------------
def metric_lines(text: str, name: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")}


def test_each_503_is_counted_once_with_one_reason(rec, tiny):
    slow = Recommender(rec.retriever, BrokenRanker(rec.ranker, "sleep"), config=RecommenderConfig(**CONFIG))
    bare = Recommender(rec.retriever, None, config=RecommenderConfig(**CONFIG))
    body = {"user_id": 1, "candidates": [int(tiny["split"].items.ids[0])]}
    with TestClient(create_app(slow, ServiceConfig(warm_up=False, max_in_flight=1))) as limited:
        wait_ready(limited)
        first = threading.Thread(target=limited.post, args=("/rerank",), kwargs={"json": body})
        first.start()
        time.sleep(0.3)
        assert limited.post("/recommend", json={"user_id": 1}).status_code == 503
        first.join()
        text = limited.get("/metrics").text
    assert metric_lines(text, "shortlist_shed_requests_total") == {
        'shortlist_shed_requests_total{reason="in_flight"}': 1.0}
    assert metric_lines(text, "shortlist_unavailable_responses_total") == {}
    with TestClient(create_app(bare, ServiceConfig(warm_up=False))) as no_ranker:
        wait_ready(no_ranker)
        response = no_ranker.post("/rerank", json=body)
        assert response.status_code == 503 and "no reranker" in response.json()["detail"]
        text = no_ranker.get("/metrics").text
    assert metric_lines(text, "shortlist_shed_requests_total") == {}
    assert metric_lines(text, "shortlist_unavailable_responses_total") == {
        'shortlist_unavailable_responses_total{reason="no_reranker"}': 1.0}


def test_not_ready_is_unavailable_not_shed(rec):
    release = threading.Event()

    def loader():
        release.wait(10)
        return Recommender(rec.retriever, rec.ranker, config=RecommenderConfig(**CONFIG))

    with TestClient(create_app(loader, ServiceConfig(warm_up=False))) as starting:
        assert starting.post("/recommend", json={"user_id": 1}).status_code == 503
        release.set()
        wait_ready(starting)
        text = starting.get("/metrics").text
    assert metric_lines(text, "shortlist_unavailable_responses_total") == {
        'shortlist_unavailable_responses_total{reason="not_ready"}': 1.0}
    assert metric_lines(text, "shortlist_shed_requests_total") == {}


# ---- item 6: smaller ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(rec):
    with TestClient(create_app(rec, ServiceConfig(warm_up=False))) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.parametrize("content_type,content", [
    ("application/x-www-form-urlencoded", b"user_id=1"),
    ("text/plain", b'{"user_id": 1}'),
    ("multipart/form-data; boundary=x", b"--x--"),
])
def test_form_or_text_bodies_get_415(client, content_type, content):
    for path in ("/recommend", "/events", "/rerank"):
        response = client.post(path, content=content, headers={"content-type": content_type})
        assert response.status_code == 415, (path, response.text)
        assert "application/json" in response.json()["detail"]
    ok = client.post("/recommend", content=b'{"user_id": 1}', headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_readyz_shows_no_file_system_path(client, tiny):
    text = client.get("/readyz").text
    assert str(tiny["artifact"].parent) not in text and str(tiny["ranker"].parent) not in text
    model = client.get("/readyz").json()["model"]
    assert model["version"] == "tiny" and model["artifact"] == "tiny" and model["ranker"] == "ranker"


def test_the_openapi_spec_says_metrics_is_text_and_admin_needs_a_key(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert client.post("/admin/reload").status_code == 403  # no API key configured: admin is off
