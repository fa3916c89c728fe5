"""Micro-batching of rerank work: concurrent jobs from several requests scored in one call.

One worker thread owns the scoring model (so no two forward passes compete for the cores, and the
ranker's caches are only touched from one thread). :meth:`MicroBatcher.submit` queues a job
``(history, candidates)`` and returns a :class:`concurrent.futures.Future` of its scores. The worker takes
the first queued job, waits at most ``max_wait_ms`` for more, and scores up to ``max_batch`` jobs (and
``max_candidates`` candidates) with one call of the scoring function, then resolves every future.

A caller that stops waiting cancels its future; a cancelled job that has not started is skipped. The queue
is bounded: :meth:`submit` raises :class:`~data.errors.OverloadedError` when ``max_queue`` jobs wait, so
the service sheds load instead of queueing without bound. :attr:`MicroBatcher.backlog_ms` sums the
predicted cost of queued and running jobs, which the recommender subtracts from a request's budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from data.errors import OverloadedError
from pipeline.recommender_config import MicroBatchConfig

log = logging.getLogger(__name__)

#: ``score(histories, candidate_lists) -> one score array per list``.
ScoreFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], Sequence[np.ndarray]]


class JobFuture(Future):
    """A job's future; ``started`` is when its batch started scoring (0 until then)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0.0


@dataclass
class Job:
    """One queued rerank job.

    Attributes:
        history: the history item ids (oldest first).
        candidates: candidate item ids.
        cost_ms: its predicted scoring time alone (for :attr:`MicroBatcher.backlog_ms`).
        future: resolves to the ``float32`` scores of ``candidates``.
        submitted: ``time.perf_counter()`` at submission.
    """

    history: np.ndarray
    candidates: np.ndarray
    cost_ms: float = 0.0
    future: JobFuture = field(default_factory=JobFuture)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    """Counters of a batcher (read by the service's metrics).

    Attributes:
        batches: scoring calls made.
        jobs: jobs scored.
        cancelled: jobs skipped because their caller had stopped waiting.
        rejected: submissions refused because the queue was full.
        failed: jobs whose scoring call raised.
    """

    batches: int = 0
    jobs: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0


class MicroBatcher:
    """Gathers rerank jobs into batched scoring calls; see the module docstring.

    Args:
        score: the scoring function (called only from the worker thread).
        config: batch size, wait and queue bounds.
        on_batch: called after each scoring call with ``(jobs, candidates, seconds)`` (metrics).
        on_start: called once in the worker thread before the first job (thread settings).
        name: the worker thread's name.
    """

    def __init__(self, score: ScoreFn, config: MicroBatchConfig | None = None, *,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_start: Callable[[], None] | None = None, name: str = "rerank-batcher") -> None:
        self.score = score
        self.config = config or MicroBatchConfig()
        self.on_batch = on_batch
        self.on_start = on_start
        self.name = name
        self.stats = BatcherStats()
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._running_cost = 0.0
        self._queued_cost = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> MicroBatcher:
        """Start the worker thread (idempotent; a closed batcher starts again)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive() and not self._closed:
                return self
            self._closed = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the jobs already queued; later submissions raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # ---- submission -----------------------------------------------------------------------------
    def submit(self, history: np.ndarray, candidates: np.ndarray, cost_ms: float = 0.0) -> JobFuture:
        """Queue a job; returns the future of its scores. Raises :class:`OverloadedError` when the queue is
        full or the batcher is not running."""
        job = Job(np.asarray(history, dtype=np.int64), np.asarray(candidates, dtype=np.int64), float(cost_ms))
        with self._cond:
            if not self.running:
                raise OverloadedError(f"{self.name}: not running (starting up or shutting down); retry")
            if len(self._jobs) >= self.config.max_queue:
                self.stats.rejected += 1
                raise OverloadedError(
                    f"{self.name}: {len(self._jobs)} jobs already queued (max_queue={self.config.max_queue}); "
                    "shed this request"
                )
            self._jobs.append(job)
            self._queued_cost += job.cost_ms
            self._cond.notify_all()
        return job.future

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not counting the batch being scored)."""
        return len(self._jobs)

    @property
    def backlog_ms(self) -> float:
        """Predicted milliseconds of work ahead of a new job: queued plus running jobs' costs."""
        return max(0.0, self._queued_cost + self._running_cost)

    # ---- worker ---------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """Block for the next batch; ``None`` once closed and drained."""
        c = self.config
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].submitted + c.max_wait_ms / 1000.0
            while len(self._jobs) < c.max_batch and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Job] = []
            candidates = 0
            while self._jobs and len(batch) < c.max_batch:
                job = self._jobs[0]
                if batch and candidates + job.candidates.size > c.max_candidates:
                    break
                self._jobs.popleft()
                self._queued_cost -= job.cost_ms
                if not job.future.set_running_or_notify_cancel():
                    self.stats.cancelled += 1
                    continue
                batch.append(job)
                candidates += job.candidates.size
            self._running_cost = sum(j.cost_ms for j in batch)
            if not self._jobs:
                self._queued_cost = 0.0  # no float drift when idle
            return batch

    def _run(self) -> None:
        if self.on_start is not None:
            try:
                self.on_start()
            except Exception:
                log.exception("%s: on_start failed", self.name)
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.future.started = started
            try:
                scores = self.score([j.history for j in batch], [j.candidates for j in batch])
                if len(scores) != len(batch):
                    raise RuntimeError(f"score returned {len(scores)} lists for {len(batch)} jobs")
            except Exception as exc:  # noqa: BLE001 - every error goes to the waiting callers
                log.warning("%s: scoring %d jobs failed: %s", self.name, len(batch), exc)
                self.stats.failed += len(batch)
                for job in batch:
                    job.future.set_exception(exc)
            else:
                for job, values in zip(batch, scores):
                    job.future.set_result(np.asarray(values, dtype=np.float32))
            seconds = time.perf_counter() - started
            with self._cond:
                self._running_cost = 0.0
                self.stats.batches += 1
                self.stats.jobs += len(batch)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), int(sum(j.candidates.size for j in batch)), seconds)
                except Exception:
                    log.exception("%s: on_batch failed", self.name)


def ranker_scorer(ranker: object) -> ScoreFn:
    """The scoring function of a :class:`~ranking.cross_encoder.CrossEncoderRanker` for a batcher.

    One job goes through ``ranker.score`` (the one-pass mode reuses its history key/value cache, keyed by
    the history's content, so a changed history is never served stale); several jobs go through
    ``ranker.score_lists`` with the lists padded by ``-1``: every history and every candidate in one
    batched call.
    """

    def score(histories: Sequence[np.ndarray], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(histories) == 1:
            return [ranker.score(histories[0], candidates[0])]  # type: ignore[attr-defined]
        width = max(c.size for c in candidates)
        padded = np.full((len(candidates), max(width, 1)), -1, dtype=np.int64)
        for i, c in enumerate(candidates):
            padded[i, :c.size] = c
        table = ranker.score_lists(list(histories), padded)  # type: ignore[attr-defined]
        return [table[i, :c.size] for i, c in enumerate(candidates)]

    return score


__all__ = ["BatcherStats", "Job", "JobFuture", "MicroBatcher", "ranker_scorer"]
