"""The recommender on Ray Serve: ``shortlist serve --engine ray`` (the ``[ray]`` extra).

Every replica of :func:`deployment` runs the same FastAPI app as ``shortlist serve``
(:func:`pipeline.service.create_app`: the same endpoints, validation, auth, shedding, Prometheus
``/metrics``), so the HTTP contract is the same; Serve's controller scales the replicas
(``autoscaling_config``) and replaces dead ones.

The application's HTTP ingress is a thin router (:func:`router`, deployment ``shortlist_router``) in front
of the replicas: Serve's proxy hands it each request and it forwards the request, bytes unchanged, to a
replica through a deployment handle (:meth:`forward`, which runs the replica's own app). A replica that
dies with requests in flight fails them with a Ray actor error; the router sends an idempotent request
(any ``GET``, ``POST /recommend``, ``POST /rerank``) again to a live replica (at most ``retries`` times),
so the client never sees the failure. A request that changes state (``POST /events``,
``POST /admin/reload``) is not sent twice: it gets 503 with ``Retry-After``, saying it may or may not have
been applied. The router holds no model and costs one more local hop per request
(``benchmarks.serve_overhead`` measures it).

A replica (:class:`ServeBatcher`, :func:`deployment`):

* **loads once** in its constructor, from the artifact folder, with every manifest and checksum
  verified (:meth:`pipeline.recommender.Recommender.load`), and warms up there: Serve sends traffic to a
  replica only after its constructor returned, so a replica is never routed to before it is ready, and
  ``/readyz`` answers 200 on it;
* reranks through ``@serve.batch``: the recommender's micro-batcher is replaced by :class:`ServeBatcher`,
  which hands each rerank job to the deployment's ``@serve.batch`` method (batch size and wait from
  ``RecommenderConfig.microbatch``), scored with the same function as the in-process micro-batcher
  (:func:`pipeline.microbatch.ranker_scorer`);
* answers Serve's health checks (``check_health``): a replica whose recommender failed or was closed is
  reported unhealthy and replaced.

``/metrics`` is each replica's own registry: a scrape through the proxy reaches one replica. Scrape
every replica (or use Ray's own metrics export) for totals. The API key is read by each replica from its
own ``$SHORTLIST_API_KEY`` (``ServiceConfig.api_key_env``): a local Ray runtime started by
``shortlist serve --engine ray`` inherits the shell's environment; on a cluster, set it on every node (it
is never put into the deployment's config, which Ray shows in its dashboard and logs).

The deployment's options come from a Serve config file (YAML; the default is ``pipeline/ray_serve.yaml``,
see :func:`load_serve_config`), which ``serve run`` and ``serve deploy`` also read through
:func:`app_builder`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import ConfigError, OverloadedError
from pipeline.microbatch import BatcherStats, Job, JobFuture
from pipeline.recommender_config import MicroBatchConfig

log = logging.getLogger(__name__)

#: The Serve config file shipped with the package.
DEFAULT_SERVE_CONFIG = Path(__file__).with_name("ray_serve.yaml")
#: The deployment's name in Serve (and in the YAML's ``deployments`` list).
DEPLOYMENT_NAME = "shortlist"
#: The Serve application's name.
APP_NAME = "shortlist"
#: The router deployment's name (the application's HTTP ingress).
ROUTER_NAME = "shortlist_router"
#: Requests the router may send again after the replica handling them died: reads and scoring, which
#: change nothing. ``(method, path)``; ``GET`` of any path is idempotent too.
IDEMPOTENT = frozenset({("POST", "/recommend"), ("POST", "/rerank")})
#: The router's defaults: a light, CPU-free actor that only awaits the replicas.
ROUTER_DEFAULTS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256,
                                   "ray_actor_options": {"num_cpus": 0}}


# ---- the micro-batcher over @serve.batch ---------------------------------------------------------
class ServeBatcher:
    """The :class:`~pipeline.microbatch.MicroBatcher` interface over a ``@serve.batch`` coroutine.

    :meth:`submit` (called from the app's request threads) schedules ``score_one(job)`` on the replica's
    event loop and returns the job's future at once; the ``@serve.batch`` method gathers concurrent jobs
    and resolves their futures (:func:`score_batch`). At most ``max_queue`` jobs wait; more are refused
    with :class:`~data.errors.OverloadedError`, as in-process.
    """

    def __init__(self, score_one: Callable[[Job], Awaitable[Any]], loop: asyncio.AbstractEventLoop,
                 config: MicroBatchConfig) -> None:
        self.score_one = score_one
        self.loop = loop
        self.config = config
        self.on_batch: Callable[[int, int, float], None] | None = None
        self.stats = BatcherStats()
        self._lock = threading.Lock()
        self._waiting = 0
        self._queued_cost = 0.0
        self._running_cost = 0.0
        self._open = False

    def start(self) -> ServeBatcher:
        self._open = True
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._open = False

    @property
    def running(self) -> bool:
        return self._open and not self.loop.is_closed()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def backlog_ms(self) -> float:
        return max(0.0, self._queued_cost + self._running_cost)

    def submit(self, history: np.ndarray, candidates: np.ndarray, cost_ms: float = 0.0) -> JobFuture:
        job = Job(np.asarray(history, dtype=np.int64), np.asarray(candidates, dtype=np.int64), float(cost_ms))
        with self._lock:
            if not self.running:
                raise OverloadedError("serve batcher: not running (starting up or shutting down); retry")
            if self._waiting >= self.config.max_queue:
                self.stats.rejected += 1
                raise OverloadedError(f"serve batcher: {self._waiting} jobs already queued "
                                      f"(max_queue={self.config.max_queue}); shed this request")
            self._waiting += 1
            self._queued_cost += job.cost_ms
        scheduled = asyncio.run_coroutine_threadsafe(self.score_one(job), self.loop)
        scheduled.add_done_callback(lambda done: self._settle(job, done))
        return job.future

    def _settle(self, job: Job, done: Any) -> None:
        """A job whose batch call itself failed (before scoring) gets that error, never a silent hang."""
        error = done.exception() if not done.cancelled() else OverloadedError("serve batcher: job cancelled")
        if error is None or job.future.done():
            return
        with self._lock:
            if job.future.running():  # taken by a batch that then failed
                self.stats.failed += 1
            else:  # never taken: it still counts as waiting
                self._waiting -= 1
                self._queued_cost -= job.cost_ms
        if job.future.set_running_or_notify_cancel() if not job.future.running() else True:
            job.future.set_exception(error)

    def taken(self, jobs: list[Job]) -> list[Job]:
        """Mark ``jobs`` as taken by a batch; returns those whose callers still wait."""
        live = []
        with self._lock:
            for job in jobs:
                self._waiting -= 1
                self._queued_cost -= job.cost_ms
                if job.future.set_running_or_notify_cancel():
                    live.append(job)
                else:
                    self.stats.cancelled += 1
            self._running_cost = sum(j.cost_ms for j in live)
            if not self._waiting:
                self._queued_cost = 0.0
        return live

    def done(self, jobs: list[Job], seconds: float, failed: bool) -> None:
        with self._lock:
            self._running_cost = 0.0
            self.stats.batches += 1
            self.stats.jobs += len(jobs)
            self.stats.failed += len(jobs) if failed else 0
        if self.on_batch is not None:
            try:
                self.on_batch(len(jobs), int(sum(j.candidates.size for j in jobs)), seconds)
            except Exception:
                log.exception("serve batcher: on_batch failed")


async def score_batch(batcher: ServeBatcher, score: Callable, jobs: list[Job]) -> list[None]:
    """The body of the ``@serve.batch`` method: score the live ``jobs`` in one call (off the event loop)
    and resolve their futures; every error goes to the waiting callers."""
    live = batcher.taken(list(jobs))
    started = time.perf_counter()
    failed = False
    if live:
        for job in live:
            job.future.started = started
        try:
            scores = await asyncio.to_thread(score, [j.history for j in live], [j.candidates for j in live])
            if len(scores) != len(live):
                raise RuntimeError(f"score returned {len(scores)} lists for {len(live)} jobs")
        except Exception as exc:  # noqa: BLE001
            failed = True
            log.warning("serve batch of %d jobs failed: %s", len(live), exc)
            for job in live:
                job.future.set_exception(exc)
        else:
            for job, values in zip(live, scores):
                job.future.set_result(np.asarray(values, dtype=np.float32))
    batcher.done(live, time.perf_counter() - started, failed)
    return [None] * len(jobs)


# ---- what a replica loads ------------------------------------------------------------------------
@dataclass
class ReplicaSpec:
    """What every replica loads (plain values: it travels to the replicas and through the YAML's ``args``).

    Attributes:
        artifacts: the pipeline artifact (root with LATEST, or a version folder) or a retriever folder.
        ranker: a saved ranker folder, ``auto`` (the student ``train-ranker`` wrote), or ``None``.
        blend: a HybridBlend JSON file, or ``None``.
        latency: a saved latency model, or ``None`` (calibrated at warm-up when configured).
        backend: the ranker's scoring backend.
        threads: torch/FAISS threads per replica.
        recommender: a :class:`~pipeline.recommender_config.RecommenderConfig` as a dict (``None``: defaults).
        service: a :class:`~pipeline.recommender_config.ServiceConfig` as a dict (``None``: defaults).
    """

    artifacts: str = "artifacts"
    ranker: str | None = None
    blend: str | None = None
    latency: str | None = None
    backend: str = "torch"
    threads: int = 1
    recommender: dict[str, Any] | None = None
    service: dict[str, Any] | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ReplicaSpec:
        """From the YAML's ``args``: the fields above, plus ``config``/``service_config`` JSON files."""
        from pipeline.recommender_config import RecommenderConfig, ServiceConfig

        args = dict(args or {})
        config, service = args.pop("config", None), args.pop("service_config", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"Serve application args: unknown key(s) {unknown}; valid keys are "
                              f"{sorted(known | {'config', 'service_config'})}")
        if config and args.get("recommender") is None:
            args["recommender"] = RecommenderConfig.load(config).to_dict()
        if service and args.get("service") is None:
            args["service"] = ServiceConfig.load(service).to_dict()
        return cls(**args)


def load_recommender(spec: ReplicaSpec) -> Any:
    """Load and verify the recommender of ``spec`` (``ranker="auto"`` resolved as ``shortlist serve`` does)."""
    from data.errors import ArtifactError
    from pipeline.recommender import Recommender
    from pipeline.recommender_config import RecommenderConfig

    ranker = spec.ranker
    if ranker == "auto":
        from pipeline.evaluate import resolve_ranker

        ranker = resolve_ranker("auto", spec.artifacts)
        if ranker is None:
            raise ArtifactError(f"ranker auto: no ranker trained for {spec.artifacts}; run `shortlist train-ranker`")
    config = RecommenderConfig.from_dict(spec.recommender) if spec.recommender else RecommenderConfig()
    rec = Recommender.load(spec.artifacts, ranker, blend=spec.blend, latency=spec.latency, config=config,
                           backend=spec.backend)
    rec.set_threads(max(1, spec.threads))
    return rec


def deployment() -> Any:
    """The Serve deployment class (built on first use, so importing this module needs no Ray)."""
    from ray import serve

    from pipeline.microbatch import ranker_scorer
    from pipeline.recommender_config import ServiceConfig
    from pipeline.serve import configure_threads
    from pipeline.service import create_app

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress()
    class ShortlistDeployment:
        """One replica: the recommender, loaded, verified and warmed in the constructor."""

        async def __init__(self, spec: dict[str, Any]) -> None:
            self.spec = ReplicaSpec(**spec)
            configure_threads(max(1, self.spec.threads))
            self.recommender = await asyncio.to_thread(load_recommender, self.spec)
            rec = self.recommender
            if rec.ranker is not None:
                batch = rec.config.microbatch
                self.score_jobs.set_max_batch_size(batch.max_batch)
                self.score_jobs.set_batch_wait_timeout_s(batch.max_wait_ms / 1000.0)
                self._score = ranker_scorer(rec.ranker)
                rec.batcher = ServeBatcher(self.score_jobs, asyncio.get_running_loop(), batch).start()
            self.service = ServiceConfig.from_dict(self.spec.service) if self.spec.service else ServiceConfig()
            if self.service.warm_up:  # a thread: the warm-up's rerank jobs need this event loop
                await asyncio.to_thread(rec.warm_up)

        def __serve_build_asgi_app__(self) -> Any:
            import dataclasses

            # warmed above, before Serve routes anything here; the app's own start-up only marks it ready
            import httpx

            self.shortlist_app = create_app(self.recommender, dataclasses.replace(self.service, warm_up=False))
            # the router's requests reach the same app in process (forward)
            self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.shortlist_app),
                                             base_url="http://replica", timeout=None)
            return self.shortlist_app

        async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                          body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            """One HTTP request from the router, answered by this replica's app (the same middleware and
            endpoints as a request from Serve's proxy); returns ``(status, headers, body)``."""
            import httpx

            response = await self._client.request(method, httpx.URL(path=path, query=query),
                                                  headers=headers, content=body)
            return response.status_code, list(response.headers.raw), response.content

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
        async def score_jobs(self, jobs: list[Job]) -> list[None]:
            return await score_batch(self.recommender.batcher, self._score, jobs)

        def check_health(self) -> None:
            """Serve's health check: raise (the replica is replaced) when the recommender is unusable."""
            app = getattr(self, "shortlist_app", None)
            state = app.state.shortlist if app is not None else None
            if state is not None and state.status.startswith("failed"):
                raise RuntimeError(f"shortlist replica unhealthy: {state.status}")
            batcher = self.recommender.batcher
            if batcher is not None and not batcher.running:
                raise RuntimeError("shortlist replica unhealthy: the rerank batcher is not running")

        def __del__(self) -> None:
            rec = getattr(self, "recommender", None)
            if rec is not None:
                rec.close()

    return ShortlistDeployment


#: Headers the router does not copy between the hops (each hop sets its own).
_HOP_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


def idempotent(method: str, path: str) -> bool:
    """Whether the router may send ``method path`` again after the replica handling it died."""
    return method in ("GET", "HEAD") or (method, path.rstrip("/") or "/") in IDEMPOTENT


def router() -> Any:
    """The router deployment class: the application's HTTP ingress (built on first use)."""
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    replica_gone = (RayActorError, ReplicaUnavailableError)

    @serve.deployment(name=ROUTER_NAME, **ROUTER_DEFAULTS)
    class ShortlistRouter:
        """Forwards each request to a replica; sends an idempotent one again if its replica died."""

        def __init__(self, replicas: Any, retries: int = 3, backoff_s: float = 0.05) -> None:
            if retries < 0:
                raise ConfigError(f"router retries={retries}: give 0 or more")
            self.replicas = replicas
            self.retries = int(retries)
            self.backoff_s = float(backoff_s)
            self.resent = 0  # requests sent again after their replica died (the kill test reads it)

        async def __call__(self, request: Request) -> Response:
            method, path = request.method, request.url.path
            headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS]
            body = await request.body()
            query = request.url.query.encode()
            tries = 1 + (self.retries if idempotent(method, path) else 0)
            attempt = 0
            while True:
                attempt += 1
                try:
                    status, out_headers, content = await self.replicas.forward.remote(
                        method, path, query, headers, body)
                    break
                except replica_gone as exc:
                    if attempt >= tries:
                        what = ("it was not sent again: it may or may not have been applied"
                                if tries == 1 else f"it was sent {tries} times")
                        return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={
                            "detail": f"the replica handling this request died ({type(exc).__name__}); {what}",
                            "reason": "replica_died"})
                    self.resent += 1
                    log.warning("router: the replica answering %s %s died (%s); sending it again",
                                method, path, type(exc).__name__)
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            response = Response(content=content, status_code=status)
            response.raw_headers = [(k, v) for k, v in out_headers if k.lower() not in _HOP_HEADERS] + [
                (b"content-length", str(len(content)).encode())]
            return response

        def resent_count(self) -> int:
            return self.resent

    return ShortlistRouter


# ---- the Serve config file -----------------------------------------------------------------------
@dataclass
class ServeFile:
    """The parts of a Serve config file (YAML) that ``shortlist serve --engine ray`` uses.

    Attributes:
        http_options: Serve's ``http_options`` (host, port...).
        args: the application's ``args`` (a :class:`ReplicaSpec`, for ``serve run``/``serve deploy``).
        deployment: the options of the ``shortlist`` deployment (``autoscaling_config``,
            ``max_ongoing_requests``, ``ray_actor_options``, ``health_check_period_s``...).
        route_prefix: the application's route prefix.
        router: the options of the ``shortlist_router`` deployment (the HTTP ingress), over
            :data:`ROUTER_DEFAULTS`.
    """

    http_options: dict[str, Any]
    args: dict[str, Any]
    deployment: dict[str, Any]
    route_prefix: str = "/"
    router: dict[str, Any] = field(default_factory=dict)


def load_serve_config(path: str | Path | None = None) -> ServeFile:
    """Read and validate a Serve config file (Ray's own schema) with one ``shortlist`` application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(path) if path is not None else DEFAULT_SERVE_CONFIG
    if not path.is_file():
        raise ConfigError(f"--serve-config {path}: no such file; see {DEFAULT_SERVE_CONFIG} for an example")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else \
            ServeDeploySchema.parse_obj(raw)
    except Exception as exc:  # yaml and pydantic errors both name the field at fault
        raise ConfigError(f"--serve-config {path}: not a valid Serve config file: {exc}") from exc
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"--serve-config {path}: expected one application (shortlist), got {len(apps)}")
    app = apps[0]
    named = {d.get("name"): d for d in app.get("deployments") or []}
    others = sorted(str(n) for n in set(named) - {DEPLOYMENT_NAME, ROUTER_NAME})
    if others:
        raise ConfigError(f"--serve-config {path}: unknown deployment(s) {others}; the deployments are "
                          f"{DEPLOYMENT_NAME!r} (the replicas) and {ROUTER_NAME!r} (the HTTP router)")
    deployment_options = {k: v for k, v in named.get(DEPLOYMENT_NAME, {}).items() if k != "name"}
    router_options = {k: v for k, v in named.get(ROUTER_NAME, {}).items() if k != "name"}
    if deployment_options.get("autoscaling_config") is not None:  # the file's schema keeps it a plain dict
        from ray.serve.config import AutoscalingConfig

        try:
            AutoscalingConfig(**deployment_options["autoscaling_config"])
        except Exception as exc:
            raise ConfigError(f"--serve-config {path}: not a valid Serve config file: autoscaling_config: "
                              f"{exc}") from exc
    return ServeFile(http_options=dict(raw.get("http_options") or {}), args=dict(app.get("args") or {}),
                     deployment=deployment_options, route_prefix=app.get("route_prefix") or "/",
                     router=router_options)


def app_builder(args: dict[str, Any]) -> Any:
    """The Serve application of the YAML's ``args`` (``import_path: pipeline.ray_serve:app_builder``);
    ``serve run``/``serve deploy`` apply the YAML's deployment options by name."""
    spec = ReplicaSpec.from_args(args)
    return router().bind(deployment().bind(spec.__dict__))


def bind(spec: ReplicaSpec, options: dict[str, Any] | None = None,
         router_options: dict[str, Any] | None = None) -> Any:
    """The Serve application of ``spec``: the router in front of the replicas, with deployment
    ``options`` for the replicas and ``router_options`` for the router (the YAML's, or a test's)."""
    replicas = deployment().options(**(options or {})).bind(spec.__dict__)
    return router().options(**(router_options or {})).bind(replicas)


def spec_from_cli(args: argparse.Namespace) -> ReplicaSpec:
    """The replica spec of ``shortlist serve`` flags (the same configs as the uvicorn engine)."""
    from pipeline.serve import configs_from_args

    rec, svc = configs_from_args(args)
    return ReplicaSpec(artifacts=str(args.artifacts), ranker=args.ranker, blend=args.blend, latency=args.latency,
                       backend=args.backend, threads=max(1, args.threads), recommender=rec.to_dict(),
                       service=svc.to_dict())


def wait_until_interrupted() -> None:
    """Block until Ctrl-C (the Serve replicas run in Ray's processes meanwhile)."""
    while True:
        time.sleep(3600)


def run(args: argparse.Namespace) -> int:
    """``shortlist serve --engine ray``: start (or join) Ray, deploy, serve until interrupted.

    The deployment's options (replicas, autoscaling, CPUs, health checks) come from ``--serve-config``
    (default :data:`DEFAULT_SERVE_CONFIG`); what to load and the HTTP host and port come from the flags,
    as with the default engine. The artifact is verified here before Ray starts, so a bad artifact fails
    with the same message as ``shortlist serve``."""
    from pipeline.loading import load_retriever_and_items
    from pipeline.ray_runtime import ray_session

    config = load_serve_config(args.serve_config)
    spec = spec_from_cli(args)
    load_retriever_and_items(spec.artifacts)  # fail fast (checksums) before starting Ray
    http = {**config.http_options, "host": args.host, "port": args.port}
    with ray_session(None, threads=spec.threads) as ray:
        from ray import serve

        serve.start(http_options=http)
        serve.run(bind(spec, config.deployment, config.router), name=APP_NAME, route_prefix=config.route_prefix)
        print(f"shortlist on Ray Serve at http://{args.host}:{args.port}{config.route_prefix} "
              f"(deployment options: {config.deployment}); Ctrl-C stops", flush=True)
        try:
            wait_until_interrupted()
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
            del ray
    return 0


__all__ = ["APP_NAME", "DEFAULT_SERVE_CONFIG", "DEPLOYMENT_NAME", "IDEMPOTENT", "ROUTER_NAME", "ReplicaSpec",
           "ServeBatcher", "ServeFile", "app_builder", "bind", "deployment", "idempotent", "load_recommender",
           "load_serve_config", "router", "run", "score_batch", "spec_from_cli"]
