"""Hot model swap (issue 14): ``POST /admin/reload`` or a changed ``LATEST`` loads the new version in the
background, checks and warms it, and switches atomically. Under load no request is lost, every answer
comes whole from one version (the one its ``X-Model-Version`` names), events survive the swap through the
event log, and a bad version is refused while the old one keeps serving.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from test_recommender import build_tiny_pipeline, wait_ready

from pipeline.artifacts import LATEST, latest_version, save_artifact
from pipeline.event_log import EventLogConfig
from pipeline.recommender import Recommender
from pipeline.recommender_config import MicroBatchConfig, RecommenderConfig, ServiceConfig
from pipeline.service import create_app
from retrieval.registry import load_retriever

# one rerank job per forward pass: an answer is a pure function of (version, user), so it can be checked
CONFIG = RecommenderConfig(retrieve_k=40, max_m=20, min_m=3, calibrate=False, warm_up_users=2,
                           microbatch=MicroBatchConfig(max_batch=1, max_wait_ms=0.0))
KEY = {"Authorization": "Bearer sw4p"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny pipeline's root with two versions: ``tiny`` and ``v2`` (the same models over other stored
    histories, so most users get other lists)."""
    built = build_tiny_pipeline(tmp_path_factory.mktemp("swap"))
    root = built["artifact"].parent
    hybrid = load_retriever(built["artifact"] / "retriever")
    hybrid.set_history(built["split"].history("val"))
    save_artifact(root, hybrid, built["events"].items, config={}, data={"name": "tiny"}, metrics={}, version="v2")
    (root / LATEST).write_text("tiny\n")
    return {**built, "root": root}



def expected_lists(tiny, users, k):
    answers = {}
    for version in ("tiny", "v2"):
        rec = Recommender.load(tiny["root"] / version, tiny["ranker"], config=CONFIG)
        answers[version] = {u: rec.recommend(u, k=k, budget_ms=60_000).item_ids for u in users}
        rec.close()
    return answers


def test_a_reload_under_load_loses_no_request_and_serves_whole_versions(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTLIST_API_KEY", "sw4p")
    root = tiny["root"]
    (root / LATEST).write_text("tiny\n")
    loads = []
    slow_load = threading.Event()

    def load():
        if loads:
            slow_load.set()
            time.sleep(0.5)  # a slow load: requests keep coming meanwhile
        rec = Recommender.load(root, tiny["ranker"], config=CONFIG)
        loads.append(rec.info["version"])
        return rec

    users = [int(u) for u in tiny["split"].users.ids[:12]]
    new_user = 10**12
    item = int(tiny["split"].items.ids[3])
    config = ServiceConfig(warm_up=True, watch_latest_s=0, events=EventLogConfig(path=str(tmp_path / "ev.log")))
    answers: list[tuple[int, int, str | None, list[int], float]] = []  # (status, user, version, items, sent)
    stop = threading.Event()
    with TestClient(create_app(load, config, reload=load, version=lambda: latest_version(root))) as client:
        wait_ready(client)
        assert client.post("/events", json={"user_id": new_user, "item_id": item}, headers=KEY).status_code == 200

        def hammer(offset: int) -> None:
            n = offset
            while not stop.is_set():
                user = users[n % len(users)]
                sent = time.perf_counter()
                response = client.post("/recommend", json={"user_id": user, "k": 5, "budget_ms": 10_000},
                                       headers=KEY)
                items = [i["item_id"] for i in response.json().get("items", [])] if response.status_code == 200 \
                    else []
                answers.append((response.status_code, user, response.headers.get("x-model-version"), items, sent))
                n += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        (root / LATEST).write_text("v2\n")
        asked = time.perf_counter()
        result = client.post("/admin/reload", params={"wait": True}, headers=KEY)
        swapped = time.perf_counter()
        switched_at = len(answers)
        deadline = time.monotonic() + 30
        while len(answers) < switched_at + 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert result.status_code == 200 and result.json()["status"] == "swapped", result.text
        assert result.json()["version"] == "v2" and slow_load.is_set()
        ready = client.get("/readyz").json()
        assert ready["model"]["version"] == "v2" and ready["reload"]["status"] == "swapped"
        # the event sent before the swap is in the new model's history (replayed from the log)
        history = client.get(f"/users/{new_user}/history", headers=KEY).json()
        assert [i["item_id"] for i in history["items"]] == [item]
        metrics = client.get("/metrics", headers=KEY).text
        assert 'shortlist_model_reloads_total{outcome="swapped"} 1.0' in metrics

    assert switched_at >= 3 and len(answers) >= switched_at + 9
    assert {status for status, *_ in answers} == {200}, "a request was lost or refused during the swap"
    versions = [version for _, _, version, _, _ in answers]
    assert set(versions) == {"tiny", "v2"}
    assert {version for *_, version, _, sent in answers if sent < asked} == {"tiny"}  # before the reload
    after = [version for *_, version, _, sent in answers if sent > swapped]
    assert len(after) >= 3 and set(after) == {"v2"}  # every request sent after the switch: the new model
    expected = expected_lists(tiny, users, 5)
    assert sum(expected["tiny"][u] != expected["v2"][u] for u in users) >= len(users) // 2  # versions differ
    for _, user, version, items, _ in answers:  # never half-loaded: each answer is exactly one version's
        assert items == expected[version][user], (user, version)


def test_a_changed_latest_swaps_and_a_bad_version_is_refused(tiny, monkeypatch):
    monkeypatch.setenv("SHORTLIST_API_KEY", "sw4p")
    root = tiny["root"]
    (root / LATEST).write_text("tiny\n")

    def load():
        return Recommender.load(root, tiny["ranker"], config=CONFIG)

    config = ServiceConfig(warm_up=False, watch_latest_s=0.1)
    with TestClient(create_app(load, config, reload=load, version=lambda: latest_version(root))) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["model"]["version"] == "tiny"
        assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        (root / LATEST).write_text("v2\n")  # the watcher notices
        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["model"]["version"] != "v2":
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        assert client.get("/readyz").json()["reload"]["reason"] == "LATEST changed to v2"

        bad = root / "v3"
        shutil.copytree(root / "v2", bad)
        tensors = bad / "retriever/component_0/tensors.safetensors"
        tensors.write_bytes(b"\0" * tensors.stat().st_size)  # zeroed weights
        try:
            (root / LATEST).write_text("v3\n")
            result = client.post("/admin/reload", params={"wait": True}, headers=KEY)
            if result.status_code == 200:  # the watcher was faster and refused it already
                pytest.fail(f"a bad version was swapped in: {result.text}")
            deadline = time.monotonic() + 30
            while client.get("/readyz").json()["reload"]["status"] != "refused":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = client.get("/readyz").json()["reload"]
            assert "component_0/tensors.safetensors" in refused["detail"] and refused["version"] == "v3"
            answer = client.post("/recommend", json={"user_id": int(tiny["split"].users.ids[0]), "k": 3},
                                 headers=KEY)
            assert answer.status_code == 200 and answer.headers["x-model-version"] == "v2"
            assert client.get("/readyz").json()["model"]["version"] == "v2"
        finally:
            (root / LATEST).write_text("tiny\n")
            shutil.rmtree(bad)
