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
import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.errors import (
    BudgetExceededError,
    ConfigError,
    DataValidationError,
    OverloadedError,
    ShortlistError,
    UnknownIdError,
)
from pipeline.event_log import EventLog, folded_offset
from pipeline.explorer import ASSETS, CSP, PAGE, PUBLIC_PATHS, ItemCatalogue, ItemSearch, UserHistory, asset
from pipeline.guard import Guard, mark
from pipeline.hot_swap import ModelSlot, Reloader, SharedLock, smoke_check
from pipeline.recommender import STAGES, Recommender
from pipeline.recommender_config import ServiceConfig
from pipeline.service_metrics import Metrics

log = logging.getLogger(__name__)

# ---- request models --------------------------------------------------------------------------------
def _integral(value: Any) -> Any:
    """A JSON number with no fraction (``100.0``) is an integer in JSON Schema: take it as one."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer field: strict (no strings, no booleans) but ``100.0`` counts, as JSON Schema says.
Integral = BeforeValidator(_integral)
#: The largest integer every JSON parser reads exactly (RFC 7493, I-JSON): ids and timestamps stay within
#: it, so the limits the spec publishes are the ones the server enforces, whatever the client's numbers
#: are (2**63 - 1 has no exact double: a client sending it as one sends 2**63, which no int64 holds).
MAX_SAFE_INT = 2**53 - 1
#: A user or item id (a larger JSON integer is a 422, not an overflow later).
ExternalId = Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT), Integral]


def request_models(config: ServiceConfig) -> dict[str, type[BaseModel]]:
    """Pydantic request models with the limits of ``config`` (strict types, unknown fields rejected)."""
    strict = ConfigDict(extra="forbid", strict=True)
    # the spec says what _one_of checks: a non-null user_id or a history
    one_of = ConfigDict(extra="forbid", strict=True, json_schema_extra={"anyOf": [
        {"required": ["user_id"], "properties": {"user_id": {"type": "integer"}}},
        {"required": ["history"], "properties": {"history": {"type": "array"}}}]})

    class RecommendRequest(BaseModel):
        model_config = one_of
        user_id: ExternalId | None = Field(None, description="external user id; unknown users get popular items")
        history: list[ExternalId] | None = Field(None, max_length=config.max_history,
                                          description="item ids, oldest first; replaces the user's history")
        k: Annotated[int, Field(ge=1, le=config.max_k), Integral] = 10
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
        model_config = one_of
        user_id: ExternalId | None = None
        history: list[ExternalId] | None = Field(None, max_length=config.max_history)
        candidates: list[ExternalId] = Field(..., min_length=1, max_length=config.max_candidates)
        top_n: Annotated[int, Field(ge=1, le=config.max_candidates), Integral] | None = None

        @model_validator(mode="after")
        def _user_or_history(self) -> Any:
            return _one_of(self)

    class EventRequest(BaseModel):
        model_config = strict
        user_id: ExternalId
        item_id: ExternalId
        timestamp: Annotated[int, Field(ge=0, le=MAX_SAFE_INT), Integral] | None = Field(None, description="seconds since the epoch (default: now)")

    return {"recommend": RecommendRequest, "rerank": RerankRequest, "events": EventRequest}


def _one_of(model: Any) -> Any:
    if model.user_id is None and model.history is None:
        raise ValueError("give user_id (a known or new user) or history (item ids, oldest first)")
    return model


def field_error(field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """A 422 in FastAPI's shape, naming the body field at fault."""
    return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", field], "msg": message,
                                                              "type": kind}]})


# ---- the app ---------------------------------------------------------------------------------------
class _State:
    """What the endpoints share: the model slot, readiness, the in-flight count, the event log."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.slot = ModelSlot()
        self.catalogue: ItemCatalogue | None = None
        self.ready = threading.Event()
        self.status = "starting"
        self.in_flight = 0
        self.lock = threading.Lock()
        self.events_lock = SharedLock()
        self.event_log: EventLog | None = None
        self.replayed_to = 0  # byte offset of the log the serving recommender has seen
        self.reloader: Reloader | None = None

    @property
    def recommender(self) -> Recommender | None:
        return self.slot.current


#: ``info`` keys of a recommender that hold file paths: ``/readyz`` shows only their last part.
_PATH_KEYS = ("artifact", "ranker", "blend", "latency")


def public_description(rec: Recommender) -> dict[str, Any]:
    """:meth:`Recommender.describe` without file-system paths (``/readyz`` is open to anyone)."""
    described = rec.describe()
    for key in _PATH_KEYS:
        if described.get(key):
            described[key] = PurePath(str(described[key])).name
    described.pop("events_folded", None)
    return described


def create_app(recommender: Recommender | Callable[[], Recommender], config: ServiceConfig | None = None, *,
               reload: Callable[[], Recommender] | None = None,
               version: Callable[[], str | None] | None = None, owned: bool = False) -> FastAPI:
    """The FastAPI app serving ``recommender`` (or the recommender a loader callable returns).

    At start-up a background thread loads (when given a loader), replays the event log
    (``config.events.path``), warms up the recommender and checks it; ``/readyz`` answers 503 until that is
    done, and the model endpoints answer 503 meanwhile. ``reload`` (a loader of the newest version) enables
    ``POST /admin/reload``; with ``version`` (what ``LATEST`` names) and ``config.watch_latest_s`` a changed
    ``LATEST`` hot-swaps too (:mod:`pipeline.hot_swap`). At shutdown the app closes the event log and the
    recommenders it loaded (or was handed with ``owned=True``). The API key is read from
    ``config.api_key_env`` once, here.
    """
    config = config or ServiceConfig()
    state = _State(config)
    metrics = Metrics()
    models = request_models(config)
    api_key = os.environ.get(config.api_key_env, "")
    RecommendRequest, RerankRequest, EventRequest = models["recommend"], models["rerank"], models["events"]
    loaded_here = callable(recommender) and not isinstance(recommender, Recommender)

    def observe_batch(jobs: int, candidates: int, seconds: float) -> None:
        metrics.batch_size.observe(jobs)
        metrics.batch_seconds.observe(seconds)

    def replay(rec: Recommender, start: int) -> int:
        """Feed the log's events from byte ``start`` into ``rec``; returns the offset reached."""
        end = start
        if state.event_log is None:
            return end
        skipped = 0
        for end, (user, item, stamp) in state.event_log.events(start):
            if rec.unknown_items([item]):
                skipped += 1
                continue
            rec.observe(user, item, stamp)
        if skipped:
            log.warning("event replay: %d events for items outside this model's catalogue skipped", skipped)
        return end

    def prepare_model(rec: Recommender) -> None:
        """Start, replay, warm up and check ``rec`` (not yet served)."""
        rec.start()
        if rec.batcher is not None:
            rec.batcher.on_batch = observe_batch
        if state.event_log is not None and config.events.replay:
            rec._replay_offset = replay(rec, folded_offset(state.event_log.path, rec.info.get("events_folded")))
        if config.warm_up:
            state.status = "warming up" if not state.ready.is_set() else state.status
            rec.warm_up()
        smoke_check(rec)

    def activate(rec: Recommender, owned: bool = True) -> None:
        """Switch to ``rec``: under the event lock, replay what arrived since its replay, then install."""
        with state.events_lock.exclusive():
            if state.event_log is not None and config.events.replay:
                state.replayed_to = replay(rec, getattr(rec, "_replay_offset", 0))
            state.slot.install(rec, owned=owned)
            state.catalogue = ItemCatalogue(rec)
        if rec.batcher is not None:
            metrics.queue_depth.set_function(lambda: state.slot.current.batcher.queue_depth
                                             if state.slot.current is not None and state.slot.current.batcher
                                             else 0)
        metrics.observed_users.set_function(lambda: state.slot.current.observed_users
                                            if state.slot.current is not None else 0)
        metrics.evicted_users.set_function(lambda: state.slot.current.evicted_users
                                           if state.slot.current is not None else 0)

    def prepare() -> None:
        try:
            if config.events.path:
                state.event_log = EventLog(config.events.path, config.events)
            state.status = "loading"
            rec = recommender() if loaded_here else recommender
            prepare_model(rec)
            activate(rec, owned=loaded_here or owned)
            state.status = "ready"
            state.ready.set()
            if state.reloader is not None:
                state.reloader.watch(config.watch_latest_s)
        except Exception as exc:  # reported by /readyz, the process keeps serving probes
            state.status = f"failed: {type(exc).__name__}: {exc}"
            log.exception("the recommender could not be loaded or warmed up")

    if reload is not None:
        state.reloader = Reloader(reload, prepare_model, activate, version=version,
                                  on_result=lambda r: metrics.reloads.labels(r["status"]).inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loaded_here or config.warm_up:  # loading and warming take a while: /readyz says 503 meanwhile
            threading.Thread(target=prepare, name="shortlist-warm-up", daemon=True).start()
        else:  # a loaded model, no warm-up: start, replay and check it now (ready once the app serves), off
            # the event loop: the smoke check's reranks may be scored on this very loop (Ray Serve's batcher)
            await asyncio.to_thread(prepare)
        try:
            yield
        finally:
            if state.reloader is not None:
                state.reloader.stop()
            if state.event_log is not None:
                state.event_log.close()
            state.ready.clear()
            state.status = "stopped"
            state.slot.close()  # only a recommender the app loaded (one passed in belongs to the caller)

    app = FastAPI(title="shortlist", version="0.1.0", lifespan=lifespan, responses=_COMMON_RESPONSES,
                  description="Two-stage recommender: retrieval + budgeted cross-encoder reranking")
    app.state.shortlist = state
    app.state.metrics = metrics

    # -- middleware (pure ASGI: probes first, auth, media type, body limits and timeout, shedding) -----
    app.add_middleware(Guard, state=state, metrics=metrics, api_key=api_key, public=PUBLIC_PATHS,
                       endpoint_of=_endpoint_of)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (bytes that are not text): a 422 too
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["body"], "msg": "the body is not valid JSON text; send UTF-8 JSON", "type": "json_invalid"}]})
        return await http_exception_handler(request, exc)

    @app.exception_handler(ShortlistError)
    async def on_domain_error(request: Request, exc: ShortlistError) -> JSONResponse:
        response = _domain_response(exc, config)
        if response.status_code == 503:
            mark(request.scope, "queue_full" if isinstance(exc, OverloadedError) else
                 "rerank_timeout" if isinstance(exc, BudgetExceededError) else type(exc).__name__)
        return response

    def unavailable(request: Request, reason: str, detail: str) -> HTTPException:
        mark(request.scope, reason)
        return HTTPException(503, detail=detail, headers={"Retry-After": str(config.retry_after_s)})

    @contextlib.contextmanager
    def serving(request: Request) -> Iterator[Recommender]:
        """The recommender for this request, held until it is answered (a hot swap waits for it)."""
        with state.slot.lease() as rec:
            if not state.ready.is_set() or rec is None:
                raise unavailable(request, "not_ready",
                                  f"not ready ({state.status}); retry after /readyz says ready")
            yield rec

    def model_headers(rec: Recommender) -> dict[str, str]:
        version_name = rec.info.get("version")
        return {"X-Model-Version": str(version_name)} if version_name else {}

    # -- endpoints ---------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the process answers (in the event loop, never behind requests)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready yet (or loading failed)", "content": {
        "application/json": {"schema": {"type": "object", "required": ["ready", "status"], "properties": {
            "ready": {"type": "boolean"}, "status": {"type": "string"}}}}}}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the models are loaded, warmed up and checked."""
        rec = state.slot.current
        if state.ready.is_set() and rec is not None:
            body = {"ready": True, "status": state.status, "model": public_description(rec)}
            if state.reloader is not None:
                body["reload"] = state.reloader.last
            return JSONResponse(body)
        return JSONResponse(status_code=503, content={"ready": False, "status": state.status})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    def prometheus_metrics() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/recommend")
    def recommend(body: RecommendRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """Top-k items for a user or a history, within ``budget_ms``."""
        with serving(request) as rec:
            started = request.scope.get("shortlist.started", time.perf_counter())
            for name in ("history", "allow"):
                unknown = rec.unknown_items(getattr(body, name)) if getattr(body, name) else []
                if unknown:
                    return field_error(name, f"unknown item id(s) {unknown[:10]} (of {len(unknown)}); send "
                                             "catalogue items only", "unknown_id")
            try:
                result = rec.recommend(body.user_id, k=body.k, budget_ms=body.budget_ms,
                                       exclude_seen=body.exclude_seen, allow=body.allow, deny=body.deny,
                                       history=body.history, explain=body.explain, started=started,
                                       include_retrieval=body.include_retrieval)
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
            return JSONResponse(result.to_dict(), headers=model_headers(rec))

    @app.post("/rerank")
    def rerank(body: RerankRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """Cross-encoder scores of ``candidates``: ``{"results": [{item_id, score, index}]}``, best first."""
        with serving(request) as rec:
            if rec.ranker is None:
                raise unavailable(request, "no_reranker", "no reranker is loaded; start the service with --ranker")
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
                raise unavailable(request, "reranker_failed",
                                  f"the reranker failed ({type(exc).__name__}); retry later") from exc
            return JSONResponse({"results": results}, headers=model_headers(rec))

    @app.post("/events")
    def events(body: EventRequest, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        """Append an interaction to a user's history; the next recommendation reflects it. With an event
        log, the event is written to it (and fsynced as its policy says) before the answer."""
        with serving(request) as rec:
            if rec.unknown_items([body.item_id]):
                return field_error("item_id", f"unknown item id {body.item_id}; send events for catalogue items",
                                   "unknown_id")
            stamp = body.timestamp if body.timestamp is not None else int(time.time())
            with state.events_lock.shared():
                current = state.slot.current  # a swap may have happened while this request waited
                if state.event_log is not None:
                    try:
                        state.event_log.append(body.user_id, body.item_id, stamp)
                    except OSError as exc:
                        log.exception("the event log could not be written")
                        raise unavailable(request, "event_log", f"the event could not be stored ({exc}); "
                                                                "retry later") from exc
                length = current.observe(body.user_id, body.item_id, stamp)
            metrics.events.inc()
            return {"user_id": body.user_id, "item_id": body.item_id, "history_length": length}

    # -- hot swap ----------------------------------------------------------------------------------
    @app.post("/admin/reload", status_code=202, responses={
        200: _error("swapped (with ?wait=true)"), 403: _error("no API key configured: admin is off"),
        409: _error("refused, busy, or not reloadable")})
    def admin_reload(request: Request, wait: Annotated[bool, Query(description="answer when it is done")] = False
                     ) -> JSONResponse:
        """Load the newest version in the background, check and warm it, and switch atomically (in-flight
        requests finish on the old one; a bad version is refused and the old one keeps serving). Needs the
        API key: with none configured, this endpoint is off (403)."""
        if not api_key:
            return JSONResponse(status_code=403, content={"detail": f"admin endpoints need an API key: set "
                                                                    f"${config.api_key_env} and restart"})
        if state.reloader is None:
            return JSONResponse(status_code=409, content={"detail": "this server was not started from an "
                                                                    "artifact it can reload"})
        if not state.ready.is_set():
            raise unavailable(request, "not_ready", f"not ready ({state.status}); reload after /readyz says ready")
        if not wait:
            started = state.reloader.reload_in_background("POST /admin/reload")
            return JSONResponse(status_code=202 if started else 409,
                                content={"status": "reloading" if started else "busy"})
        result = state.reloader.reload("POST /admin/reload")
        return JSONResponse(status_code=200 if result["status"] == "swapped" else 409, content=result)

    # -- the explorer page and its lookups ---------------------------------------------------------
    def catalogue(request: Request) -> ItemCatalogue:
        with serving(request):
            return state.catalogue

    @app.get("/users/{user_id}/history", response_model=UserHistory)
    def user_history(user_id: Annotated[int, Path(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT, description="external user id")],
                     request: Request,
                     limit: Annotated[int, Query(ge=1, le=config.max_history,
                                                 description="most recent items returned")] = 20) -> UserHistory:
        """The user's most recent items (stored history plus real-time events), newest first, with titles
        and genres; an unknown user has an empty history."""
        return catalogue(request).history(user_id, limit)

    @app.get("/items/search", response_model=ItemSearch)
    def search_items(request: Request,
                     q: Annotated[str, Query(min_length=1, max_length=100, pattern=r"\S",
                                             description="part of a title, or an id")],
                     limit: Annotated[int, Query(ge=1, le=config.max_k)] = 20) -> Any:
        """Catalogue items whose title contains ``q`` (case-insensitive; those starting with it first), after
        the item whose id is ``q``; ids only when the artifact has no item table."""
        return catalogue(request).search(q, limit)

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


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"detail": {}}, "required": ["detail"]}}}}


#: What the front door (:mod:`pipeline.guard`) and the error handlers may answer on any operation.
_COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("missing or wrong API key (when one is configured)"),
    408: _error("the request body did not arrive within body_timeout_s"),
    413: _error("request body over max_body_bytes"),
    415: _error("a body that is not JSON"),
    503: _error("overloaded (shed, with Retry-After), not ready yet, or unavailable"),
}


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


_ENDPOINTS = ("/recommend", "/rerank", "/events", "/healthz", "/readyz", "/metrics", "/items/search", "/",
              "/admin/reload")


def _endpoint_of(path: str) -> str:
    """The metrics label of ``path`` (one label for every user's history, "other" for unknown paths)."""
    if path in _ENDPOINTS:
        return path
    parts = path.split("/")
    return "/users/{id}/history" if len(parts) == 4 and parts[1] == "users" and parts[3] == "history" else "other"


__all__ = ["Metrics", "create_app", "field_error", "public_description", "request_models"]
