"""The Ray engines (the ``[ray]`` extra), on a local Ray runtime with 2 CPUs started once for the module:

* Ray Data batch candidates (``shortlist candidates --engine ray``) equal the single-process output on
  ml-latest-small, and with the reranker on the tiny pipeline;
* the Ray Serve deployment answers the same lists as the in-process app (``shortlist serve``) for the same
  requests, through Serve's HTTP proxy, with the same 422s, readiness and metrics;
* a replica killed under a bounded loopback load is replaced, and every request the load sent is answered
  (the router resends the killed replica's in-flight requests; no client retries).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from test_recommender import TINY_CONFIG, build_tiny_pipeline

from data.errors import ConfigError
from pipeline.recommender import Recommender
from pipeline.recommender_config import MicroBatchConfig, RecommenderConfig, ServiceConfig

pytestmark = pytest.mark.ray

CONFIG = TINY_CONFIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray runtime (2 CPUs) for the module, shut down after it (Serve too)."""
    from pipeline.ray_runtime import worker_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env(1)})
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def als_artifact(ml_path, tmp_path_factory):
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("artifacts")
    assert main(["train", "--model", "als", "--no-tune", "--data-path", str(ml_path), "--artifacts", str(root)]) == 0
    return root


# ---- Ray Data batch candidates ----------------------------------------------------------------------
@pytest.mark.movielens
def test_ray_batch_candidates_equal_the_single_process_output_on_movielens(als_artifact, local_ray, tmp_path,
                                                                           capsys):
    from pipeline.cli import main

    local, distributed = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert main(["candidates", "--out", str(local), "--k", "50", "--artifacts", str(als_artifact)]) == 0
    assert main(["candidates", "--engine", "ray", "--workers", "2", "--batch-size", "128", "--out",
                 str(distributed), "--k", "50", "--artifacts", str(als_artifact)]) == 0
    assert "2 Ray workers" in capsys.readouterr().out
    expected, got = pd.read_parquet(local), pd.read_parquet(distributed)
    assert distributed.is_dir() and len(list(distributed.glob("*.parquet"))) > 1  # several blocks, several actors
    assert expected["user_id"].nunique() == 610 and len(expected) == 610 * 50
    pd.testing.assert_frame_equal(got, expected)  # same rows, same order, same dtypes, same scores

    # a Parquet list of users (duplicates and an unknown user included), through both engines
    users = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": [5, 1, 5, 999_999]}).to_parquet(users)
    for engine, out in (("local", tmp_path / "few_local.parquet"), ("ray", tmp_path / "few_ray.parquet")):
        assert main(["candidates", "--engine", engine, "--users", str(users), "--out", str(out), "--k", "10",
                     "--artifacts", str(als_artifact)]) == 0
    few_local, few_ray = pd.read_parquet(tmp_path / "few_local.parquet"), pd.read_parquet(tmp_path / "few_ray.parquet")
    pd.testing.assert_frame_equal(few_ray, few_local)
    assert few_local["user_id"].drop_duplicates().tolist() == [5, 1, 999_999]
    assert len(few_local) == 40  # the unknown user gets the cold-start list
    top10 = expected[expected.user_id == 5]["item_id"][:10].tolist()
    assert few_local[few_local.user_id == 5]["item_id"].tolist() == top10 * 2  # listed twice, answered twice


def test_ray_batch_with_the_reranker_equals_the_single_process_output(tiny, local_ray, tmp_path):
    from pipeline.batch import generate_candidates
    from pipeline.ray_batch import generate_candidates_ray
    from ranking.loading import load_ranker

    rec = Recommender.load(tiny["artifact"], tiny["ranker"], config=RecommenderConfig(**CONFIG))
    local = generate_candidates(rec.retriever, tmp_path / "local.parquet", k=15, ranker=load_ranker(tiny["ranker"]),
                                rerank_m=8, progress=False)
    rec.close()
    stats = generate_candidates_ray(tiny["artifact"], tmp_path / "ray.parquet", k=15, ranker=tiny["ranker"],
                                    rerank_m=8, batch_size=16, workers=2)
    expected, got = pd.read_parquet(local.path), pd.read_parquet(stats.path)
    assert stats.rows == len(expected) and stats.reranked_m == 8 and expected["reranked"].sum() > 0
    pd.testing.assert_frame_equal(got[["user_id", "rank", "item_id", "reranked"]],
                                  expected[["user_id", "rank", "item_id", "reranked"]])
    for column in ("score", "retrieval_score", "rerank_score"):  # thread counts may change the last bits
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_a_corrupted_ranker_fails_the_ray_batch_with_the_domain_error(tiny, local_ray, tmp_path):
    import shutil

    from data.errors import ShortlistError
    from pipeline.ray_batch import generate_candidates_ray

    ranker = tmp_path / "ranker"
    shutil.copytree(tiny["ranker"], ranker)
    weights = ranker / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(ShortlistError, match="checksum|safetensors"):
        generate_candidates_ray(tiny["artifact"], tmp_path / "out", k=5, ranker=ranker, workers=1)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ray_batch_refuses_bad_input_with_clear_errors(tiny, tmp_path):
    from data.errors import DataValidationError
    from pipeline.batch import read_users
    from pipeline.ray_batch import generate_candidates_ray

    with pytest.raises(DataValidationError, match="workers must be a positive integer"):
        generate_candidates_ray(tiny["artifact"], tmp_path / "x", workers=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataValidationError, match="is a file"):
        generate_candidates_ray(tiny["artifact"], tmp_path / "file")
    pd.DataFrame({"user": [1]}).to_parquet(tmp_path / "u.parquet")
    with pytest.raises(DataValidationError, match="user_id"):
        read_users(tmp_path / "u.parquet")
    pd.DataFrame({"user_id": ["a"]}).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(DataValidationError, match="integers"):
        read_users(tmp_path / "s.parquet")


# ---- Ray Serve ------------------------------------------------------------------------------------------
def test_the_shipped_serve_config_validates_and_bad_ones_are_refused(tmp_path):
    from pipeline.ray_serve import DEFAULT_SERVE_CONFIG, ReplicaSpec, load_serve_config

    config = load_serve_config(DEFAULT_SERVE_CONFIG)
    auto = config.deployment["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 2 and auto["target_ongoing_requests"] == 4
    assert config.deployment["health_check_period_s"] > 0 and config.route_prefix == "/"
    assert ReplicaSpec.from_args(config.args).artifacts == "artifacts"
    assert config.router["ray_actor_options"]["num_cpus"] == 0 and config.router["max_ongoing_requests"] >= 64
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_SERVE_CONFIG.read_text().replace("max_replicas: 2", "max_replicas: -3"))
    with pytest.raises(ConfigError, match="not a valid Serve config"):
        load_serve_config(bad)
    bad.write_text(DEFAULT_SERVE_CONFIG.read_text().replace("- name: shortlist\n        max", "- name: other\n        max"))
    with pytest.raises(ConfigError, match="unknown deployment"):
        load_serve_config(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        ReplicaSpec.from_args({"artifact": "x"})
    with pytest.raises(ConfigError, match="no such file"):
        load_serve_config(tmp_path / "missing.yaml")


def test_the_yaml_args_build_the_serve_application_serve_run_deploys(tmp_path):
    """``serve run pipeline/ray_serve.yaml`` calls ``app_builder(args)``: the args become the replicas'
    spec, with the config files read into their typed configs (no Ray runtime needed to build it)."""
    from pipeline.ray_serve import (
        DEFAULT_SERVE_CONFIG,
        DEPLOYMENT_NAME,
        ROUTER_NAME,
        ReplicaSpec,
        app_builder,
        load_serve_config,
    )

    RecommenderConfig(**CONFIG).save(tmp_path / "rec.json")
    ServiceConfig(max_k=7).save(tmp_path / "svc.json")
    args = {**load_serve_config(DEFAULT_SERVE_CONFIG).args, "config": str(tmp_path / "rec.json"),
            "service_config": str(tmp_path / "svc.json")}
    spec = ReplicaSpec.from_args(args)
    assert RecommenderConfig.from_dict(spec.recommender) == RecommenderConfig(**CONFIG)
    assert ServiceConfig.from_dict(spec.service).max_k == 7
    application = app_builder(args)
    assert type(application).__name__ == "Application"
    assert application._bound_deployment.name == ROUTER_NAME  # the HTTP ingress, in front of the replicas
    (replicas,) = application._bound_deployment.init_args
    assert replicas._bound_deployment.name == DEPLOYMENT_NAME
    assert replicas._bound_deployment.init_args == (spec.__dict__,)


def deploy(tiny, options: dict, port: int) -> str:
    from ray import serve

    from pipeline.ray_serve import APP_NAME, ReplicaSpec, bind

    spec = ReplicaSpec(artifacts=str(tiny["artifact"]), ranker=str(tiny["ranker"]), threads=1,
                       recommender=RecommenderConfig(**CONFIG, microbatch=MicroBatchConfig(max_wait_ms=50.0)).to_dict(),
                       service=ServiceConfig(max_in_flight=64).to_dict())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(bind(spec, options), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(tiny, local_ray):
    """The tiny pipeline on Ray Serve: one replica (the kill test adds a second)."""
    url = deploy(tiny, {"num_replicas": 1, "max_ongoing_requests": 16}, free_port())
    yield url


def test_serve_answers_the_same_lists_as_the_in_process_app(served, tiny):
    import httpx

    rec = Recommender.load(tiny["artifact"], tiny["ranker"], config=RecommenderConfig(**CONFIG))
    users = [int(u) for u in tiny["split"].users.ids[:12]]
    requests = ([{"user_id": u, "k": 10, "budget_ms": 10_000} for u in users]
                + [{"history": [int(i) for i in tiny["split"].items.ids[:3]], "k": 5, "budget_ms": 10_000},
                   {"user_id": 987_654, "k": 5}])  # a history, and a cold-start user
    with TestClient(create_in_process_app(rec)) as local, httpx.Client(base_url=served, timeout=30) as remote:
        assert remote.get("/healthz").status_code == 200
        ready = remote.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model"]["reranker"] is True
        for body in requests:
            a, b = local.post("/recommend", json=body), remote.post("/recommend", json=body)
            assert a.status_code == b.status_code == 200
            a, b = a.json(), b.json()
            assert [i["item_id"] for i in b["items"]] == [i["item_id"] for i in a["items"]]
            assert [i["score"] for i in b["items"]] == pytest.approx([i["score"] for i in a["items"]], rel=1e-5)
            assert (b["path"], b["reranked_m"]) == (a["path"], a["reranked_m"])
        assert {a["path"] for a in [local.post("/recommend", json=r).json() for r in requests]} == {
            "reranked", "cold_start"}
        rerank = {"user_id": users[0], "candidates": [int(i) for i in tiny["split"].items.ids[:6]]}
        a, b = local.post("/rerank", json=rerank).json(), remote.post("/rerank", json=rerank).json()
        assert [r["index"] for r in b["results"]] == [r["index"] for r in a["results"]]
        for bad in ({"user_id": "x"}, {"user_id": 1, "k": 0}, {"history": [10**12]}):
            assert local.post("/recommend", json=bad).status_code == 422
            assert remote.post("/recommend", json=bad).status_code == 422
        metrics = remote.get("/metrics").text
        assert "shortlist_stage_latency_seconds" in metrics and "shortlist_rerank_batch_jobs" in metrics

        # concurrent requests to the one replica share @serve.batch calls (its wait is 50 ms here)
        answers, barrier = [], threading.Barrier(8)

        def one(user):
            with httpx.Client(base_url=served, timeout=30) as client:
                barrier.wait()
                answers.append(client.post("/recommend", json={"user_id": user, "k": 5, "budget_ms": 10_000}).json())

        workers = [threading.Thread(target=one, args=(u,)) for u in users[:8]]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert len(answers) == 8 and {a["path"] for a in answers} == {"reranked"}
        after = batch_counts(remote.get("/metrics").text)
        before = batch_counts(metrics)
        batches = after["count"] - before["count"]
        singles = after["le_1"] - before["le_1"]
        assert 1 <= batches < 8 and singles < batches  # 8 jobs in fewer calls: some call scored several
    rec.close()


def batch_counts(metrics: str) -> dict[str, float]:
    """Micro-batches scored, and those of one job, from the Prometheus text."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("shortlist_rerank_batch_jobs_count"):
            out["count"] = float(line.split()[-1])
        elif line.startswith('shortlist_rerank_batch_jobs_bucket{le="1.0"}'):
            out["le_1"] = float(line.split()[-1])
    return out


def create_in_process_app(rec):
    from pipeline.service import create_app

    return create_app(rec, ServiceConfig(max_in_flight=64))


def test_the_shipped_autoscaling_config_scales_up_under_load(served, tiny):
    """The deployment options of ``pipeline/ray_serve.yaml`` (delays and target shortened so the test is
    quick) scale the deployment from 1 to 2 replicas under 4 concurrent clients, and answers stay right."""
    import httpx
    from ray import serve

    from pipeline.ray_serve import APP_NAME, DEFAULT_SERVE_CONFIG, DEPLOYMENT_NAME, load_serve_config

    options = load_serve_config(DEFAULT_SERVE_CONFIG).deployment
    options["autoscaling_config"] = {**options["autoscaling_config"], "target_ongoing_requests": 1,
                                     "upscale_delay_s": 0, "look_back_period_s": 11, "downscale_delay_s": 600}
    deploy(tiny, options, int(served.rsplit(":", 1)[1]))

    def running() -> int:
        states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states
        return states.get("RUNNING", 0)

    assert running() == 1
    users = [int(u) for u in tiny["split"].users.ids[:8]]
    stop, answers, errors = threading.Event(), [], []

    def load(worker: int) -> None:
        with httpx.Client(base_url=served, timeout=30) as client:
            n = 0
            while not stop.is_set() and n < 5000:
                r = client.post("/recommend", json={"user_id": users[(worker + n) % 8], "k": 5, "budget_ms": 10_000})
                (answers if r.status_code == 200 else errors).append(r.status_code)
                n += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while running() < 2:
            assert time.monotonic() < deadline, serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert running() == 2 and answers and not errors


def test_a_killed_replica_is_replaced_and_no_request_is_lost(served, tiny):
    """Two replicas under a bounded loopback load (8 clients, no client retries); one is killed mid-run
    (``ray.kill``). Serve replaces it, the router sends the killed replica's in-flight requests again
    to the live one, and every request a client sent gets its right list, first time: no client sees an
    error. (How many were in flight at the kill is timing: usually 1-4, printed; the resend logic itself
    is tested deterministically below.)"""
    import httpx
    from ray import serve

    from pipeline.ray_serve import APP_NAME, DEPLOYMENT_NAME

    deploy(tiny, {"num_replicas": 2, "max_ongoing_requests": 16}, int(served.rsplit(":", 1)[1]))
    users = [int(u) for u in tiny["split"].users.ids[:20]]
    with httpx.Client(base_url=served, timeout=30) as client:
        expected = {u: [i["item_id"] for i in client.post("/recommend", json={"user_id": u, "k": 5,
                                                                               "budget_ms": 10_000}).json()["items"]]
                    for u in users}
    router = serve.get_app_handle(APP_NAME)
    resent_before = router.resent_count.remote().result()

    def replicas() -> list[str]:
        """Names of the deployment's replica actors that are alive and RUNNING (Serve's own view)."""
        running = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == "serve" and f"#{DEPLOYMENT_NAME}#" in a["name"])
        return names if running.get("RUNNING", 0) == len(names) else []

    before = replicas()
    assert len(before) == 2
    results: list[tuple[int, int, list[int] | None]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=served, timeout=30) as client:
            n = 0
            while not stop.is_set() and n < 5000:  # bounded: 5000 per client at most
                user = users[(worker * 7 + n) % len(users)]
                try:
                    r = client.post("/recommend", json={"user_id": user, "k": 5, "budget_ms": 10_000})
                except httpx.HTTPError as exc:
                    results.append((user, -1, None))
                    print("client error:", exc)
                else:
                    ok = r.status_code == 200
                    results.append((user, r.status_code, [i["item_id"] for i in r.json()["items"]] if ok else None))
                n += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]  # both replicas kept busy
    for t in threads:
        t.start()
    time.sleep(2.0)
    victim = ray.get_actor(before[0], namespace="serve")
    sent_before_kill = len(results)
    ray.kill(victim, no_restart=True)
    deadline = time.monotonic() + 90
    while True:
        now = replicas()
        if len(now) == 2 and before[0] not in now:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {now}"
        time.sleep(0.5)
    at_replacement = len(results)
    time.sleep(2.0)  # keep the load on with the new replica
    stop.set()
    for t in threads:
        t.join(60)
    # the controller reports the application's status on its own loop: it may still show the killed
    # replica's UNHEALTHY for a moment after the replacement actor exists; it must come back to RUNNING
    deadline = time.monotonic() + 60
    while (status := serve.status().applications[APP_NAME].status) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == "RUNNING"
    assert 0 < sent_before_kill < at_replacement < len(results)  # the load ran before, during and after
    failed = [(user, code) for user, code, items in results if items is None]
    assert not failed, f"{len(failed)} of {len(results)} requests failed at the client: {failed[:5]}"
    assert all(items == expected[user] for user, _, items in results)  # every answer is the right list
    resent = router.resent_count.remote().result() - resent_before
    print(f"\nkill test: {len(results)} requests ({sent_before_kill} before the kill, {at_replacement} by the "
          f"replacement); the router resent {resent} in-flight request(s) of the killed replica")


# ---- @serve.batch behind the recommender's batcher interface ---------------------------------------------
def test_serve_batcher_fans_one_batch_out_to_its_callers_and_sheds_beyond_its_queue():
    """The adapter between the recommender's batcher interface and ``@serve.batch`` (whose queue only runs
    inside a Serve replica, so a hand-made gatherer stands in for it here): jobs submitted from request
    threads are scored in one call, each caller gets its own scores, a cancelled job is skipped, a full
    queue is refused, and a batch call that fails before scoring reaches its callers as an error."""
    import asyncio

    from data.errors import OverloadedError
    from pipeline.ray_serve import ServeBatcher, score_batch

    calls: list[int] = []

    def score(histories, candidates):  # candidate id * 10 + history length
        calls.append(len(candidates))
        return [c * 10 + h.size for h, c in zip(histories, candidates)]

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    pending, fail = [], []

    async def gather(job):  # stands in for the @serve.batch method: collects, scored below in one call
        if fail:
            raise RuntimeError("batch queue broken")
        pending.append(job)

    batcher = ServeBatcher(gather, loop, MicroBatchConfig(max_queue=6))
    with pytest.raises(OverloadedError, match="not running"):
        batcher.submit(np.array([1]), np.array([2]))
    batcher.start()
    futures = [batcher.submit(np.arange(n), np.array([n, n + 1]), cost_ms=2.0) for n in range(5)]
    assert futures[4].cancel()
    deadline = time.monotonic() + 5
    while len(pending) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert batcher.queue_depth == 5 and batcher.backlog_ms == 10.0
    with pytest.raises(OverloadedError, match="max_queue=6"):
        batcher.submit(np.array([1]), np.array([2]))
        batcher.submit(np.array([1]), np.array([2]))
    while len(pending) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pending.pop()  # the sixth, accepted just before the refusal, is left queued
    asyncio.run_coroutine_threadsafe(score_batch(batcher, score, list(pending)), loop).result(5)
    assert batcher.queue_depth == 1
    for n, future in enumerate(futures[:4]):
        np.testing.assert_array_equal(future.result(timeout=5), [n * 10 + n, (n + 1) * 10 + n])
        assert future.started > 0
    assert calls == [4] and batcher.stats.batches == 1 and batcher.stats.jobs == 4 and batcher.stats.cancelled == 1
    fail.append(True)
    broken = batcher.submit(np.array([1]), np.array([2]))
    with pytest.raises(RuntimeError, match="batch queue broken"):
        broken.result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


# ---- the CLI path (last: it shuts Serve down when it returns) --------------------------------------------
def test_serve_cli_refuses_a_corrupted_artifact_before_starting_ray(tiny, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    copy = tmp_path / "artifact"
    shutil.copytree(tiny["artifact"], copy)
    (copy / "items.parquet").write_bytes(b"not parquet")
    assert main(["serve", "--engine", "ray", "--artifacts", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "items.parquet" in err and "checksum" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: 3\n")
    assert main(["serve", "--engine", "ray", "--serve-config", str(bad), "--artifacts", str(tiny["artifact"])]) == 2
    assert "not a valid Serve config" in capsys.readouterr().err


def test_shortlist_serve_engine_ray_serves_the_http_contract(tiny, local_ray, tmp_path, monkeypatch, served):
    """``shortlist serve --engine ray`` end to end in this process (its wait loop is replaced by the checks;
    Ctrl-C ends it as for a user), with the shipped Serve config and the flags of ``shortlist serve``."""
    import httpx

    from pipeline import ray_serve
    from pipeline.cli import main

    port = int(served.rsplit(":", 1)[1])  # Serve's proxy is already up on this port in this runtime
    RecommenderConfig(**CONFIG).save(tmp_path / "config.json")
    seen = {}

    def checks():
        url = f"http://127.0.0.1:{port}"
        seen["ready"] = httpx.get(f"{url}/readyz", timeout=30).status_code
        seen["recommend"] = httpx.post(f"{url}/recommend", json={"user_id": int(tiny["split"].users.ids[3]), "k": 4,
                                                                  "budget_ms": 10_000}, timeout=30).json()
        seen["bad"] = httpx.post(f"{url}/recommend", json={"k": 4}, timeout=30).status_code
        seen["status"] = ray_serve_status()
        raise KeyboardInterrupt

    def ray_serve_status():
        from ray import serve

        app = serve.status().applications[ray_serve.APP_NAME]
        return app.deployments[ray_serve.DEPLOYMENT_NAME].replica_states

    monkeypatch.setattr(ray_serve, "wait_until_interrupted", checks)
    assert main(["serve", "--engine", "ray", "--artifacts", str(tiny["artifact"]), "--ranker", str(tiny["ranker"]),
                 "--config", str(tmp_path / "config.json"), "--port", str(port)]) == 0
    assert seen["ready"] == 200 and seen["bad"] == 422 and seen["status"].get("RUNNING", 0) >= 1
    assert seen["recommend"]["path"] == "reranked" and len(seen["recommend"]["items"]) == 4


# ---- the router: resends an idempotent request whose replica died ------------------------------------
class _FakeReplicas:
    """Stands in for the router's deployment handle: the first ``deaths`` calls fail as a killed replica's
    in-flight calls do (``ActorDiedError``), later ones answer."""

    def __init__(self, deaths: int) -> None:
        self.deaths, self.calls = deaths, []
        self.forward = self

    def remote(self, method, path, query, headers, body):
        self.calls.append((method, path, query, dict(headers), body))

        async def answer():
            from ray.exceptions import ActorDiedError

            if len(self.calls) <= self.deaths:
                raise ActorDiedError()
            return 200, [(b"content-type", b"application/json"), (b"x-model", b"v1")], b'{"ok": true}'

        return answer()


def _request(method: str, path: str, body: bytes = b"", query: bytes = b""):
    from starlette.requests import Request

    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": method, "path": path, "query_string": query, "root_path": "",
                    "headers": [(b"host", b"x"), (b"authorization", b"Bearer k"), (b"content-length", b"2")]},
                   receive)


def test_the_router_resends_an_idempotent_request_whose_replica_died_and_never_a_write():
    import asyncio

    from pipeline.ray_serve import idempotent, router

    Router = router().func_or_class
    assert idempotent("POST", "/recommend") and idempotent("POST", "/rerank/") and idempotent("GET", "/metrics")
    assert not idempotent("POST", "/events") and not idempotent("POST", "/admin/reload")

    # /recommend: two replicas die under it; the third try answers, with the replica's status, headers, bytes
    replicas = _FakeReplicas(deaths=2)
    r = Router(replicas, retries=3, backoff_s=0.0)
    response = asyncio.run(r(_request("POST", "/recommend", b'{"user_id": 1}', b"a=1")))
    assert (response.status_code, response.body) == (200, b'{"ok": true}')
    assert response.headers["x-model"] == "v1" and response.headers["content-length"] == str(len(response.body))
    assert len(replicas.calls) == 3 and r.resent_count() == 2
    method, path, query, headers, body = replicas.calls[-1]
    assert (method, path, query, body) == ("POST", "/recommend", b"a=1", b'{"user_id": 1}')
    assert headers[b"authorization"] == b"Bearer k" and b"host" not in headers and b"content-length" not in headers

    # more deaths than retries: a 503 with Retry-After that says so, after 1 + retries tries
    replicas = _FakeReplicas(deaths=10)
    response = asyncio.run(Router(replicas, retries=2, backoff_s=0.0)(_request("POST", "/rerank", b"{}")))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert b"sent 3 times" in response.body and len(replicas.calls) == 3

    # /events changes state: never sent twice; the client is told it may or may not have been applied
    replicas = _FakeReplicas(deaths=1)
    response = asyncio.run(Router(replicas, retries=3, backoff_s=0.0)(_request("POST", "/events", b"{}")))
    assert response.status_code == 503 and b"may or may not have been applied" in response.body
    assert len(replicas.calls) == 1

    with pytest.raises(ConfigError, match="retries=-1"):
        Router(_FakeReplicas(0), retries=-1)
