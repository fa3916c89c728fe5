"""Typed configs of the online recommender, its micro-batcher and its HTTP service."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.config import JsonConfig, require
from pipeline.event_log import EventLogConfig


def _positive_int(obj: object, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                f"{type(obj).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class MicroBatchConfig(JsonConfig):
    """How concurrent rerank jobs are gathered into one scoring call (:mod:`pipeline.microbatch`).

    Attributes:
        max_batch: most jobs (requests) scored together; 1 turns micro-batching off (one job per call).
        max_wait_ms: how long the worker waits, after the first job of a batch arrived, for more jobs
            (0: take only what is already queued).
        max_candidates: most candidates in one call (a job is never split; one larger job runs alone).
        max_queue: most jobs waiting; a job beyond it is refused with
            :class:`~data.errors.OverloadedError` (HTTP 503) instead of queueing without bound.
    """

    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_candidates: int = 2048
    max_queue: int = 64

    def __post_init__(self) -> None:
        _positive_int(self, "max_batch", "max_candidates", "max_queue")
        require(0 <= self.max_wait_ms <= 1000, f"MicroBatchConfig.max_wait_ms must be in [0, 1000], "
                                               f"got {self.max_wait_ms}")


@dataclass
class RecommenderConfig(JsonConfig):
    """The online recommender (:class:`pipeline.recommender.Recommender`): retrieval depth, shortlist size
    bounds, the latency budget and explanations.

    Attributes:
        retrieve_k: candidates retrieved per request (at least ``k`` are always retrieved).
        max_m: the most candidates the reranker may score (the shortlist size M never exceeds it).
        min_m: the smallest worthwhile shortlist; when the budget left cannot cover it (or
            all candidates, if fewer), the response keeps the retrieval order and says ``degraded``.
        budget_ms: default latency budget of a request, in milliseconds.
        plan_margin_ms: kept free when sizing M from the latency model (prediction error, blending,
            the response).
        reserve_ms: time kept after the reranker's deadline for blending and the response; the reranker
            is waited for at most ``budget - elapsed - reserve_ms``.
        rerank: rerank at all (False: the retrieval order, not counted as degraded).
        blend: blend the cross-encoder score with the retrieval score when a blend is loaded.
        explain_top_n: history items named per recommended item (``because``); 0 disables.
        explain_history: most recent history items considered for explanations.
        max_k: the largest ``k`` a request may ask for.
        max_observed: most real-time events kept per user (the oldest observed events are dropped first).
        max_observed_users: most users whose real-time events one process holds in memory (known and new
            users alike). At the cap, the user whose events changed least recently is dropped from memory
            (counted in :attr:`~pipeline.recommender.Recommender.evicted_users`): their next requests use
            the stored history only. Nothing is lost for good when the service writes an event log: the
            events stay there and reach the model at the next ``shortlist train --events``.
        calibrate: at warm-up, measure the reranker's latency when no latency model was given.
        warm_up_users: users (or histories) recommended for at warm-up.
        threads: torch threads of every model while serving (and FAISS OpenMP threads); 0 leaves them.
        microbatch: the rerank micro-batcher.
    """

    retrieve_k: int = 200
    max_m: int = 100
    min_m: int = 5
    budget_ms: float = 50.0
    plan_margin_ms: float = 5.0
    reserve_ms: float = 2.0
    rerank: bool = True
    blend: bool = True
    explain_top_n: int = 3
    explain_history: int = 50
    max_k: int = 100
    max_observed: int = 1000
    max_observed_users: int = 100_000
    calibrate: bool = True
    warm_up_users: int = 8
    threads: int = 1
    microbatch: MicroBatchConfig = field(default_factory=MicroBatchConfig)

    def __post_init__(self) -> None:
        _positive_int(self, "retrieve_k", "max_m", "min_m", "max_k", "max_observed", "explain_history",
                      "max_observed_users")
        _positive_int(self, "explain_top_n", "warm_up_users", "threads", minimum=0)
        require(self.min_m <= self.max_m, f"RecommenderConfig.min_m ({self.min_m}) must be <= max_m ({self.max_m})")
        require(self.budget_ms > 0, f"RecommenderConfig.budget_ms must be > 0, got {self.budget_ms}")
        require(self.plan_margin_ms >= 0 and self.reserve_ms >= 0,
                "RecommenderConfig.plan_margin_ms and reserve_ms must be >= 0")


@dataclass
class ServiceConfig(JsonConfig):
    """The HTTP service (:func:`pipeline.service.create_app`): authentication, input limits, shedding.

    Attributes:
        api_key_env: environment variable holding the API key; when it is set and non-empty, every
            endpoint but ``open_paths`` needs ``Authorization: Bearer <key>``.
        open_paths: paths served without the key (liveness and readiness probes).
        max_k: the largest ``k`` of ``POST /recommend``.
        max_candidates: the longest ``candidates`` list of ``POST /rerank`` (and ``allow``/``deny`` lists).
        max_history: the longest ``history`` a request may carry.
        max_body_bytes: the largest request body; a larger one gets 413.
        max_in_flight: requests handled at once; more are shed with 503 and ``Retry-After``.
        max_budget_ms: the largest ``budget_ms`` a request may ask for.
        rerank_timeout_ms: how long ``POST /rerank`` waits for the reranker before answering 503.
        retry_after_s: the ``Retry-After`` header of a shed request, in seconds.
        warm_up: warm the models up (and calibrate latency) before ``/readyz`` reports ready.
        body_timeout_s: the whole request body must arrive within this many seconds of the headers, else
            408 (a slow client never holds an in-flight slot: the body is read before one is taken).
        events: the durable event log of ``POST /events`` (:class:`~pipeline.event_log.EventLogConfig`;
            no ``path``: events are kept in memory only).
        watch_latest_s: when serving an artifacts root, poll its ``LATEST`` this often and hot-swap to a
            new version (0: only ``POST /admin/reload`` swaps).
    """

    api_key_env: str = "SHORTLIST_API_KEY"
    open_paths: tuple[str, ...] = ("/healthz", "/readyz")
    max_k: int = 100
    max_candidates: int = 1000
    max_history: int = 1000
    max_body_bytes: int = 262_144
    max_in_flight: int = 64
    max_budget_ms: float = 10_000.0
    rerank_timeout_ms: float = 2_000.0
    retry_after_s: int = 1
    warm_up: bool = True
    body_timeout_s: float = 10.0
    events: EventLogConfig = field(default_factory=EventLogConfig)
    watch_latest_s: float = 5.0

    def __post_init__(self) -> None:
        _positive_int(self, "max_k", "max_candidates", "max_history", "max_body_bytes", "max_in_flight",
                      "retry_after_s")
        require(0 < self.body_timeout_s <= 3600, f"ServiceConfig.body_timeout_s must be in (0, 3600], "
                                                 f"got {self.body_timeout_s}")
        require(self.watch_latest_s >= 0, f"ServiceConfig.watch_latest_s must be >= 0, got {self.watch_latest_s}")
        require(self.max_budget_ms > 0 and self.rerank_timeout_ms > 0,
                "ServiceConfig.max_budget_ms and rerank_timeout_ms must be > 0")
        require(isinstance(self.api_key_env, str) and self.api_key_env != "",
                "ServiceConfig.api_key_env must name an environment variable")


__all__ = ["MicroBatchConfig", "RecommenderConfig", "ServiceConfig"]
