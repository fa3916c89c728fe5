"""The HTTP service (FastAPI, the ``[serve]`` extra): :func:`create_app` over a :class:`Recommender`.

Endpoints:

* ``POST /recommend`` ``{user_id | history, k, budget_ms, exclude_seen, allow, deny, explain,
  include_retrieval}`` -> the :class:`~pipeline.recommender.Recommendation` (items, ``path``, ``degraded``,
  ``reranked_m``, ``timings_ms``; ``retrieval``, the retrieval order with the retrievers that found each
  candidate, only with ``include_retrieval``);
* ``POST /rerank`` ``{user_id | history, candidates, top_n}`` -> ``{"results": [{item_id, score, index}]}``;
* ``POST /events`` ``{user_id, item_id, timestamp}`` -> the user's new history length;
* ``GET /users/{user_id}/history?limit=20`` -> the user's most recent items with titles and genres;
* ``GET /items/search?q=...&limit=20`` -> catalogue items whose title contains ``q`` (or whose id it is);
* ``GET /`` the explorer page (:mod:`pipeline.explorer`; it and ``/static/explorer.{js,css}`` need no key,
  every call it makes goes through the endpoints above);
* ``GET /healthz`` (liveness), ``GET /readyz`` (200 once the models are loaded and warmed, else 503);
* ``GET /metrics`` (Prometheus): per-stage latency histograms, degraded responses by reason, queue depth,
  batch sizes, shed requests.

Behaviour: optional bearer-token auth (the key comes from ``$SHORTLIST_API_KEY``, read at start-up);
request bodies over ``max_body_bytes`` get 413; malformed input gets 422 naming the field (unknown item ids
included); more than ``max_in_flight`` concurrent requests, or a full rerank queue on ``/rerank``, are shed
with 503 and ``Retry-After``; a failing reranker degrades ``/recommend`` to the retrieval order; any other
unexpected error answers 503, never a bare 500.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime, and
# the request models are local to request_models().
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.errors import (
    BudgetExceededError,
    ConfigError,
    DataValidationError,
    OverloadedError,
    ShortlistError,
    UnknownIdError,
)
from pipeline.explorer import ASSETS, CSP, PAGE, PUBLIC_PATHS, ItemCatalogue, ItemSearch, UserHistory, asset
from pipeline.recommender import STAGES, Recommender
from pipeline.recommender_config import ServiceConfig

log = logging.getLogger(__name__)

#: Histogram buckets of the latency metrics, in seconds (1 ms .. 2.5 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.25,
           0.5, 1.0, 2.5)


# ---- request models --------------------------------------------------------------------------------
#: A user or item id: any int64 (a larger JSON integer is a 422, not an overflow later).
ExternalId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def request_models(config: ServiceConfig) -> dict[str, type[BaseModel]]:
    """Pydantic request models with the limits of ``config`` (strict types, unknown fields rejected)."""
    strict = ConfigDict(extra="forbid", strict=True)

    class RecommendRequest(BaseModel):
        model_config = strict
        user_id: ExternalId | None = Field(None, description="external user id; unknown users get popular items")
        history: list[ExternalId] | None = Field(None, max_length=config.max_history,
                                          description="item ids, oldest first; replaces the user's history")
        k: int = Field(10, ge=1, le=config.max_k)
        budget_ms: float | None = Field(None, gt=0, le=config.max_budget_ms)
        exclude_seen: bool = True
        allow: list[ExternalId] | None = Field(None, max_length=config.max_candidates)
        deny: list[ExternalId] | None = Field(None, max_length=config.max_candidates)
        explain: bool = True
        include_retrieval: bool = Field(False, description="add `retrieval`: the retrieval order the list started "
                                                           "from, with the retrievers that found each candidate")

        @model_validator(mode="after")
        def _user_or_history(self) -> Any:
            return _one_of(self)

    class RerankRequest(BaseModel):
        model_config = strict
        user_id: ExternalId | None = None
        history: list[ExternalId] | None = Field(None, max_length=config.max_history)
        candidates: list[ExternalId] = Field(..., min_length=1, max_length=config.max_candidates)
        top_n: int | None = Field(None, ge=1, le=config.max_candidates)

        @model_validator(mode="after")
        def _user_or_history(self) -> Any:
            return _one_of(self)

    class EventRequest(BaseModel):
        model_config = strict
        user_id: ExternalId
        item_id: ExternalId
        timestamp: int | None = Field(None, ge=0, description="seconds since the epoch (default: now)")

    return {"recommend": RecommendRequest, "rerank": RerankRequest, "events": EventRequest}


def _one_of(model: Any) -> Any:
    if model.user_id is None and model.history is None:
        raise ValueError("give user_id (a known or new user) or history (item ids, oldest first)")
    return model


def field_error(field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """A 422 in FastAPI's shape, naming the body field at fault."""
    return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", field], "msg": message,
                                                              "type": kind}]})


# ---- metrics ---------------------------------------------------------------------------------------
class Metrics:
    """The service's Prometheus metrics, in their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("shortlist_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("shortlist_request_latency_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.stage = Histogram("shortlist_stage_latency_seconds", "Latency of each /recommend stage",
                               ["stage"], buckets=BUCKETS, registry=self.registry)
        self.degraded = Counter("shortlist_degraded_responses", "Responses that kept the retrieval order",
                                ["reason"], registry=self.registry)
        self.paths = Counter("shortlist_recommend_paths", "Responses by path", ["path"], registry=self.registry)
        self.reranked_m = Histogram("shortlist_reranked_m", "Shortlist size M of reranked responses",
                                    buckets=(1, 5, 10, 20, 30, 50, 75, 100, 200), registry=self.registry)
        self.shed = Counter("shortlist_shed_requests", "Requests refused because of overload", ["reason"],
                            registry=self.registry)
        self.queue_depth = Gauge("shortlist_queue_depth", "Rerank jobs waiting for the micro-batcher",
                                 registry=self.registry)
        self.in_flight = Gauge("shortlist_in_flight_requests", "Requests being handled", registry=self.registry)
        self.batch_size = Histogram("shortlist_rerank_batch_jobs", "Jobs per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("shortlist_rerank_batch_seconds", "Scoring time of a micro-batch",
                                       buckets=BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the app ---------------------------------------------------------------------------------------
class _State:
    """What the endpoints share: the recommender once loaded, readiness, the in-flight count."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.recommender: Recommender | None = None
        self.catalogue: ItemCatalogue | None = None
        self.ready = threading.Event()
        self.status = "starting"
        self.in_flight = 0
        self.lock = threading.Lock()


def create_app(recommender: Recommender | Callable[[], Recommender], config: ServiceConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``recommender`` (or the recommender a loader callable returns).

    At start-up a background thread loads (when given a loader) and warms up the recommender; ``/readyz``
    answers 503 until that is done, and ``/recommend`` and ``/rerank`` answer 503 meanwhile. At shutdown the
    app closes the recommender only when it loaded it. The API key is read from ``config.api_key_env``
    once, here.
    """
    config = config or ServiceConfig()
    state = _State(config)
    metrics = Metrics()
    models = request_models(config)
    api_key = os.environ.get(config.api_key_env, "")
    RecommendRequest, RerankRequest, EventRequest = models["recommend"], models["rerank"], models["events"]
    loaded_here = callable(recommender) and not isinstance(recommender, Recommender)

    def prepare() -> None:
        try:
            state.status = "loading"
            rec = recommender() if loaded_here else recommender
            state.recommender = rec
            state.catalogue = ItemCatalogue(rec)
            rec.start()
            if rec.batcher is not None:
                rec.batcher.on_batch = observe_batch
                metrics.queue_depth.set_function(lambda: rec.batcher.queue_depth)
            if config.warm_up:
                state.status = "warming up"
                rec.warm_up()
            state.status = "ready"
            state.ready.set()
        except Exception as exc:  # reported by /readyz, the process keeps serving probes
            state.status = f"failed: {type(exc).__name__}: {exc}"
            log.exception("the recommender could not be loaded or warmed up")

    def observe_batch(jobs: int, candidates: int, seconds: float) -> None:
        metrics.batch_size.observe(jobs)
        metrics.batch_seconds.observe(seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=prepare, name="shortlist-warm-up", daemon=True)
        thread.start()
        try:
            yield
        finally:
            if state.recommender is not None and loaded_here:
                state.recommender.close()  # a recommender passed in belongs to the caller, who closes it

    app = FastAPI(title="shortlist", version="0.1.0", lifespan=lifespan,
                  description="Two-stage recommender: retrieval + budgeted cross-encoder reranking")
    app.state.shortlist = state
    app.state.metrics = metrics

    # -- middleware (pure ASGI: body limit, auth, shedding, error guard) --------------------------
    app.add_middleware(_Guard, state=state, metrics=metrics, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(ShortlistError)
    async def on_domain_error(request: Request, exc: ShortlistError) -> JSONResponse:
        return _domain_response(exc, config)

    def require_ready() -> Recommender:
        if not state.ready.is_set() or state.recommender is None:
            raise HTTPException(503, detail=f"not ready ({state.status}); retry after /readyz says ready",
                                headers={"Retry-After": str(config.retry_after_s)})
        return state.recommender

    # -- endpoints ---------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: 200 once the models are loaded and warmed up."""
        if state.ready.is_set() and state.recommender is not None:
            return JSONResponse({"ready": True, "status": state.status, "model": state.recommender.describe()})
        return JSONResponse(status_code=503, content={"ready": False, "status": state.status})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/recommend")
    def recommend(body: RecommendRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """Top-k items for a user or a history, within ``budget_ms``."""
        rec = require_ready()
        started = request.scope.get("shortlist.started", time.perf_counter())
        for name in ("history", "allow"):
            unknown = rec.unknown_items(getattr(body, name)) if getattr(body, name) else []
            if unknown:
                return field_error(name, f"unknown item id(s) {unknown[:10]} (of {len(unknown)}); send catalogue "
                                         f"items only", "unknown_id")
        try:
            result = rec.recommend(body.user_id, k=body.k, budget_ms=body.budget_ms, exclude_seen=body.exclude_seen,
                                   allow=body.allow, deny=body.deny, history=body.history, explain=body.explain,
                                   started=started, include_retrieval=body.include_retrieval)
        except (DataValidationError, UnknownIdError, ConfigError):
            raise
        except Exception as exc:  # the retriever failed: popular items, marked degraded
            log.exception("recommend failed; answering with popular items")
            result = _emergency(rec, body, started, exc)
        metrics.paths.labels(result.path).inc()
        if result.degraded:
            metrics.degraded.labels(result.degraded_reason or "unknown").inc()
        if result.reranked_m:
            metrics.reranked_m.observe(result.reranked_m)
        for stage in STAGES:
            if stage in result.timings_ms:
                metrics.stage.labels(stage).observe(result.timings_ms[stage] / 1000)
        return JSONResponse(result.to_dict())

    @app.post("/rerank")
    def rerank(body: RerankRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Cross-encoder scores of ``candidates``: ``{"results": [{item_id, score, index}]}``, best first."""
        rec = require_ready()
        if rec.ranker is None:
            raise HTTPException(503, detail="no reranker is loaded; start the service with --ranker")
        unknown = [i for i in body.candidates if i not in rec.ranker.items]
        if unknown:
            return field_error("candidates", f"unknown item id(s) {unknown[:10]} (of {len(unknown)}); send "
                                             "catalogue items only", "unknown_id")
        if body.history is not None:
            unknown = rec.unknown_items(body.history)
            if unknown:
                return field_error("history", f"unknown item id(s) {unknown[:10]}; send catalogue items only",
                                   "unknown_id")
        who = body.history if body.history is not None else body.user_id
        try:
            results = rec.rerank(who, body.candidates, body.top_n, timeout_ms=config.rerank_timeout_ms)
        except ShortlistError:
            raise
        except Exception as exc:
            log.exception("rerank failed")
            raise HTTPException(503, detail=f"the reranker failed ({type(exc).__name__}); retry later",
                                headers={"Retry-After": str(config.retry_after_s)}) from exc
        return {"results": results}

    @app.post("/events")
    def events(body: EventRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Append an interaction to a user's history; the next recommendation reflects it."""
        rec = require_ready()
        if rec.unknown_items([body.item_id]):
            return field_error("item_id", f"unknown item id {body.item_id}; send events for catalogue items",
                               "unknown_id")
        length = rec.observe(body.user_id, body.item_id, body.timestamp)
        return {"user_id": body.user_id, "item_id": body.item_id, "history_length": length}

    # -- the explorer page and its lookups ---------------------------------------------------------
    def catalogue() -> ItemCatalogue:
        require_ready()
        return state.catalogue

    @app.get("/users/{user_id}/history", response_model=UserHistory)
    def user_history(user_id: Annotated[int, Path(ge=-(2**63), le=2**63 - 1, description="external user id")],
                     limit: Annotated[int, Query(ge=1, le=config.max_history,
                                                 description="most recent items returned")] = 20) -> UserHistory:
        """The user's most recent items (stored history plus real-time events), newest first, with titles
        and genres; an unknown user has an empty history."""
        return catalogue().history(user_id, limit)

    @app.get("/items/search", response_model=ItemSearch)
    def search_items(q: Annotated[str, Query(min_length=1, max_length=100, description="part of a title, or an id")],
                     limit: Annotated[int, Query(ge=1, le=config.max_k)] = 20) -> Any:
        """Catalogue items whose title contains ``q`` (case-insensitive; those starting with it first), after
        the item whose id is ``q``; ids only when the artifact has no item table."""
        if not q.strip():
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["query", "q"], "msg": "give some text to search titles for", "type": "value_error"}]})
        return catalogue().search(q, limit)

    @app.get("/", include_in_schema=False)
    def explorer_page() -> Response:
        """The explorer page (no data in it; its calls need the API key like any client's)."""
        return Response(asset(PAGE), media_type="text/html; charset=utf-8", headers=_page_headers())

    @app.get("/static/{name}", include_in_schema=False)
    def explorer_asset(name: str) -> Response:
        """The explorer's script and style sheet (a fixed list; anything else is 404)."""
        if name not in ASSETS:
            raise HTTPException(404, detail=f"no such asset; the explorer has {sorted(ASSETS)}")
        return Response(asset(name), media_type=ASSETS[name], headers=_page_headers())

    return app


def _page_headers() -> dict[str, str]:
    """Headers of the explorer's page and assets: its own content only, never framed, revalidated."""
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer"}


def _domain_response(exc: ShortlistError, config: ServiceConfig) -> JSONResponse:
    """The HTTP answer of a domain error: 422 for bad input, 503 (with ``Retry-After``) for overload."""
    if isinstance(exc, (UnknownIdError, DataValidationError, ConfigError)):
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body"], "msg": str(exc),
                                                                  "type": type(exc).__name__}]})
    headers = {"Retry-After": str(config.retry_after_s)}
    if isinstance(exc, (OverloadedError, BudgetExceededError)):
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers=headers)
    return JSONResponse(status_code=503, content={"detail": f"{type(exc).__name__}: {exc}"}, headers=headers)


def _emergency(rec: Recommender, body: Any, started: float, exc: Exception) -> Any:
    """Popular items, marked degraded: what ``/recommend`` answers when retrieval itself failed."""
    from pipeline.recommender import Recommendation, RecommendedItem, popular_items

    ids, scores = popular_items(rec.retriever, body.k, allow=body.allow, deny=body.deny)
    keep = ids != -1
    items = [RecommendedItem(item_id=int(i), rank=r + 1, score=float(s), retrieval_score=float(s))
             for r, (i, s) in enumerate(zip(ids[keep], scores[keep]))]
    return Recommendation(items=items, path="cold_start", degraded=True, degraded_reason="error", reranked_m=0,
                          timings_ms={"total": round((time.perf_counter() - started) * 1000, 3)},
                          budget_ms=float(body.budget_ms or rec.config.budget_ms), user_id=body.user_id)


_ENDPOINTS = ("/recommend", "/rerank", "/events", "/healthz", "/readyz", "/metrics", "/items/search", "/")


def _is_history(path: str) -> bool:
    """Whether ``path`` is ``/users/<id>/history`` (one metrics label for every user)."""
    parts = path.split("/")
    return len(parts) == 4 and parts[1] == "users" and parts[3] == "history"


class _Guard:
    """Pure ASGI middleware: request start time, bearer auth (401; probes and the explorer page's
    :data:`~pipeline.explorer.PUBLIC_PATHS` are open), body size limit (413, the body is read here, at most
    ``max_body_bytes``), in-flight shedding (503) and a last-resort guard that turns any escaped exception
    into 503."""

    def __init__(self, app: Any, *, state: _State, metrics: Metrics, api_key: str) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics
        self.api_key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.state.config
        started = time.perf_counter()
        scope["shortlist.started"] = started
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "/users/{id}/history" if _is_history(path) else "other"
        status_seen: list[int] = []

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        async def reply(status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"detail": detail}).encode()
            raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
            await send_wrapper({"type": "http.response.start", "status": status, "headers": raw})
            await send_wrapper({"type": "http.response.body", "body": body})

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            public = path in config.open_paths or path in PUBLIC_PATHS
            if self.api_key and not public and not self._authorized(headers):
                await reply(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            {"WWW-Authenticate": "Bearer"})
                return
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
                await reply(413, f"request body over {config.max_body_bytes} bytes; send fewer items")
                return
            with self.state.lock:
                if self.state.in_flight >= config.max_in_flight:
                    shed = True
                else:
                    shed = False
                    self.state.in_flight += 1
            if shed:
                self.metrics.shed.labels("in_flight").inc()
                await reply(503, f"overloaded: {config.max_in_flight} requests in flight; retry later",
                            {"Retry-After": str(config.retry_after_s)})
                return
            self.metrics.in_flight.set(self.state.in_flight)
            try:
                body = await self._read_body(receive, config.max_body_bytes)
                if body is None:
                    await reply(413, f"request body over {config.max_body_bytes} bytes; send fewer items")
                    return
                await self.app(scope, self._replay(body, receive), send_wrapper)
            finally:
                with self.state.lock:
                    self.state.in_flight -= 1
        except Exception:  # never a bare 500
            log.exception("unhandled error on %s", path)
            if not status_seen:
                await reply(503, "internal error; the request was not served, retry later",
                            {"Retry-After": str(config.retry_after_s)})
        finally:
            status = status_seen[0] if status_seen else 0
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint in ("/recommend", "/rerank", "/events"):
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
                if status == 503:
                    self.metrics.shed.labels("unavailable").inc()

    def _authorized(self, headers: dict[str, str]) -> bool:
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    @staticmethod
    async def _read_body(receive: Callable, limit: int) -> bytes | None:
        """The whole request body, or ``None`` once it passes ``limit`` bytes (a chunked body too)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Callable) -> Callable:
        """A ``receive`` that hands the buffered body over once, then waits on the real one (disconnects)."""
        sent = False

        async def wrapped() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return wrapped


__all__ = ["Metrics", "create_app", "field_error", "request_models"]
