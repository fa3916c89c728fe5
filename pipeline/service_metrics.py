"""The HTTP service's Prometheus metrics, in their own registry (several apps can live in one process)."""

from __future__ import annotations

#: Histogram buckets of the latency metrics, in seconds (1 ms .. 2.5 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.25,
           0.5, 1.0, 2.5)


class Metrics:
    """Every metric ``GET /metrics`` shows.

    Each 503 is counted once: in ``shed`` when the service refused work because of overload, else in
    ``unavailable`` (see :mod:`pipeline.guard`).
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("shortlist_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("shortlist_request_latency_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=BUCKETS, registry=r)
        self.stage = Histogram("shortlist_stage_latency_seconds", "Latency of each /recommend stage",
                               ["stage"], buckets=BUCKETS, registry=r)
        self.degraded = Counter("shortlist_degraded_responses", "Responses that kept the retrieval order",
                                ["reason"], registry=r)
        self.paths = Counter("shortlist_recommend_paths", "Responses by path", ["path"], registry=r)
        self.reranked_m = Histogram("shortlist_reranked_m", "Shortlist size M of reranked responses",
                                    buckets=(1, 5, 10, 20, 30, 50, 75, 100, 200), registry=r)
        self.shed = Counter("shortlist_shed_requests", "503s because of overload, by reason", ["reason"],
                            registry=r)
        self.unavailable = Counter("shortlist_unavailable_responses",
                                   "503s for any other reason (not ready, no reranker, errors)", ["reason"],
                                   registry=r)
        self.timeouts = Counter("shortlist_body_timeouts", "Requests answered 408: the body came too slowly",
                                registry=r)
        self.queue_depth = Gauge("shortlist_queue_depth", "Rerank jobs waiting for the micro-batcher", registry=r)
        self.in_flight = Gauge("shortlist_in_flight_requests", "Requests being handled", registry=r)
        self.batch_size = Histogram("shortlist_rerank_batch_jobs", "Jobs per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("shortlist_rerank_batch_seconds", "Scoring time of a micro-batch",
                                       buckets=BUCKETS, registry=r)
        self.events = Counter("shortlist_events", "Events accepted (written to the log when there is one)",
                              registry=r)
        self.observed_users = Gauge("shortlist_observed_users", "Users whose events are held in memory",
                                    registry=r)
        self.evicted_users = Gauge("shortlist_evicted_users",
                                   "Users dropped from memory at max_observed_users (events stay in the log)",
                                   registry=r)
        self.reloads = Counter("shortlist_model_reloads", "Hot-swap attempts by outcome", ["outcome"], registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


__all__ = ["BUCKETS", "Metrics"]
