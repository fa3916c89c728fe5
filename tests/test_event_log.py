"""The durable event log (issue 14, item 2): write before answering, replay at start-up, fold into
training, recovery of a torn last line, the cap on users held in memory, and ``kill -9`` after a 200
losing no acknowledged event (a real server process, killed and restarted on the same log).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.dataset import Interactions
from data.errors import DataValidationError
from pipeline.event_log import (
    HEADER,
    EventLog,
    EventLogConfig,
    encode,
    fold_events,
    folded_offset,
    read_events,
)

ROOT = Path(__file__).resolve().parents[1]


def events_of(path: Path) -> list[tuple[int, int, int]]:
    return [event for _, event in read_events(path)]


# ---- the file ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["batch", "interval", "always", "never"])
def test_every_policy_writes_before_returning_and_reads_back(tmp_path, policy):
    path = tmp_path / "events.log"
    log = EventLog(path, EventLogConfig(path=str(path), fsync=policy, fsync_interval_ms=10))
    sent = [(u, 100 + u % 7, 1_700_000_000 + u) for u in range(200)]
    threads = [threading.Thread(target=lambda chunk=sent[i::4]: [log.append(*e) for e in chunk]) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(events_of(path)) == sorted(sent)  # readable before close: written, not buffered
    log.close()
    if policy == "batch":
        assert 1 <= log.fsyncs <= len(sent)
    if policy == "always":
        assert log.fsyncs == len(sent)


def test_group_commit_shares_fsyncs_between_concurrent_writers(tmp_path, monkeypatch):
    path = tmp_path / "events.log"
    log = EventLog(path)
    real = os.fsync

    def slow_fsync(fd):  # a slow disk: writers pile up behind one fsync and share the next
        time.sleep(0.02)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    threads = [threading.Thread(target=log.append, args=(u, 1, 0)) for u in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(events_of(path)) == 32
    assert log.fsyncs < 32  # shared
    log.close()


def test_a_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    path = tmp_path / "events.log"
    path.write_bytes(HEADER + encode(1, 10, 5) + encode(2, 20, 6)[:-4])  # a crash cut the second event
    assert events_of(path) == [(1, 10, 5)]
    log = EventLog(path)
    log.append(3, 30, 7)
    log.close()
    assert events_of(path) == [(1, 10, 5), (3, 30, 7)]


def test_a_damaged_line_before_the_end_is_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "events.log"
    bad = bytearray(encode(2, 20, 6))
    bad[0] = ord("9")  # the CRC no longer matches
    path.write_bytes(HEADER + encode(1, 10, 5) + bytes(bad) + encode(3, 30, 7))
    with pytest.raises(DataValidationError, match=r"events.log: line 3 .*move the file aside"):
        EventLog(path)
    (tmp_path / "other.log").write_text("user,item\n1,2\n")
    with pytest.raises(DataValidationError, match="not a shortlist event log"):
        EventLog(tmp_path / "other.log")


# ---- folding into training ----------------------------------------------------------------------------
def test_fold_events_appends_rows_and_records_the_prefix(tmp_path):
    path = tmp_path / "events.log"
    log = EventLog(path)
    for event in [(1, 100, 50), (7, 101, 51), (7, 999, 52)]:  # 999 is not in the catalogue
        log.append(*event)
    log.close()
    frame = pd.DataFrame({"user_id": [1, 2], "item_id": [100, 101], "timestamp": [1, 2], "rating": [4.0, 5.0]})
    data = Interactions(frame, name="d")
    folded = fold_events(data, path)
    assert len(folded.frame) == 4 and folded.frame["user_id"].dtype == np.int64
    assert folded.frame.tail(2)[["user_id", "item_id", "timestamp"]].values.tolist() == [[1, 100, 50], [7, 101, 51]]
    info = folded.meta["events"]
    assert info["events"] == 2 and info["dropped"] == 1 and info["bytes"] == path.stat().st_size
    # a server over the model trained on this log starts its replay after the folded prefix ...
    assert folded_offset(path, info) == info["bytes"]
    log = EventLog(path)
    log.append(9, 100, 60)
    log.close()
    assert [e for _, e in read_events(path, folded_offset(path, info))] == [(9, 100, 60)]
    # ... and from the start when the log is another one
    path.write_bytes(HEADER + encode(5, 100, 1))
    assert folded_offset(path, info) == 0


def test_train_folds_the_event_log_into_the_artifact(tmp_path, block_events, monkeypatch):
    """``shortlist train --events`` (on the synthetic block data): the events become training rows and the
    manifest records the folded prefix."""
    import json

    from pipeline import cli

    path = tmp_path / "events.log"
    log = EventLog(path)
    for user in range(900, 905):
        log.append(user, 100, 10_000 + user)
        log.append(user, 101, 10_001 + user)
    log.close()
    monkeypatch.setattr("pipeline.train.load_dataset", lambda name, path=None: block_events)
    code = cli.main(["train", "--model", "popularity", "--no-tune", "--artifacts", str(tmp_path / "artifacts"),
                     "--events", str(path)])
    assert code == 0
    version = (tmp_path / "artifacts" / "LATEST").read_text().strip()
    manifest = json.loads((tmp_path / "artifacts" / version / "manifest.json").read_text())
    assert manifest["data"]["events"]["events"] == 10 and manifest["data"]["events"]["bytes"] == path.stat().st_size
    assert manifest["data"]["events"]["path"] == str(path.resolve())


def test_evaluate_reads_the_folded_prefix_of_the_event_log_again(tmp_path, capsys):
    """An artifact trained with ``--events`` evaluates: ``shortlist evaluate`` folds the same prefix of the
    log again (events the server appended since are left out), from the path the manifest records or from
    ``--events`` when the log moved; a log that does not begin with those bytes is refused."""
    from pipeline import cli
    from pipeline.evaluate import evaluate_artifact

    path = tmp_path / "events.log"
    log = EventLog(path)
    for user in range(900, 905):
        log.append(user, 1, 10_000 + user)
    log.close()
    artifacts = str(tmp_path / "artifacts")
    assert cli.main(["train", "--model", "popularity", "--no-tune", "--artifacts", artifacts, "--events", str(path)]) == 0
    log = EventLog(path)
    log.append(906, 2, 20_000)  # the server went on writing after the training run
    log.close()
    report, manifest = evaluate_artifact(artifacts, n_boot=0)
    assert report.means["NDCG@10"] == pytest.approx(manifest["metrics"]["test"]["NDCG@10"], abs=1e-5)  # same split
    assert cli.main(["evaluate", "--artifacts", artifacts]) == 0

    moved = tmp_path / "moved.log"
    path.rename(moved)
    assert cli.main(["evaluate", "--artifacts", artifacts]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["evaluate", "--artifacts", artifacts, "--events", str(moved)]) == 0
    other = tmp_path / "other.log"
    log = EventLog(other)
    log.append(1, 1, 1)
    log.close()
    assert cli.main(["evaluate", "--artifacts", artifacts, "--events", str(other)]) == 2
    assert "does not begin with the" in capsys.readouterr().err


# ---- the cap on users held in memory -------------------------------------------------------------------
def test_users_beyond_the_cap_are_dropped_from_memory_least_recent_first():
    from pipeline.recommender import Recommender
    from pipeline.recommender_config import RecommenderConfig
    from retrieval.popularity import PopularityRetriever

    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": [1, 2, 3]})
    retriever = PopularityRetriever().fit(Interactions(frame, name="cap"))
    rec = Recommender(retriever, config=RecommenderConfig(max_observed_users=3, calibrate=False))
    for user in (100, 101, 102):
        rec.observe(user, 10, 5)
    rec.observe(100, 11, 6)  # 100 is now the most recent
    rec.observe(103, 10, 7)  # over the cap: 101, the least recent, is dropped
    assert rec.observed_users == 3 and rec.evicted_users == 1
    assert rec.history(101).size == 0 and rec.history(100).tolist() == [10, 11]
    assert rec.history(103).tolist() == [10]


# ---- kill -9 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_recommender import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("events"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tiny, log_path: Path, port: int, out: Path) -> subprocess.Popen:
    import httpx

    with open(out, "a") as handle:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.serve", "--artifacts", str(tiny["artifact"]), "--port", str(port),
             "--threads", "1", "--event-log", str(log_path), "--no-warm-up", "--watch-latest-s", "0"],
            cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, out.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.2)


def test_kill_9_after_a_200_loses_no_acknowledged_event(tiny, tmp_path):
    import httpx

    log_path = tmp_path / "events.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    items = [int(i) for i in tiny["split"].items.ids[:20]]
    process = start_server(tiny, log_path, port, tmp_path / "server.log")
    acked: list[tuple[int, int, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            n = 0
            while not stop.is_set():
                event = (10**9 + worker, items[n % len(items)], 1_800_000_000 + n)
                try:
                    response = client.post("/events", json=dict(zip(("user_id", "item_id", "timestamp"), event)))
                except httpx.HTTPError:
                    return  # the server is gone: this event was never acknowledged
                if response.status_code == 200:
                    with lock:
                        acked.append(event)
                n += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    os.kill(process.pid, signal.SIGKILL)  # no shutdown, no flush: mid-stream
    process.wait(10)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(acked) >= 20, "too few events were acknowledged to test anything"
    on_disk = set(events_of(log_path))
    assert set(acked) <= on_disk, f"{len(set(acked) - on_disk)} acknowledged events lost"

    # restart on the same log: the replayed histories hold every acknowledged event
    process = start_server(tiny, log_path, port, tmp_path / "server.log")
    try:
        for worker in range(4):
            user = 10**9 + worker
            mine = [e for e in sorted(on_disk) if e[0] == user]
            history = httpx.get(f"{url}/users/{user}/history", params={"limit": 1000}, timeout=10).json()
            got = [entry["item_id"] for entry in history["items"]][::-1]  # newest first -> oldest first
            assert got == [item for _, item, _ in sorted(mine, key=lambda e: e[2])][-1000:]
            assert {e[1] for e in acked if e[0] == user} <= set(got)
    finally:
        process.terminate()
        process.wait(20)
