"""A latency model of a reranker: predicted milliseconds of a request from its shape, calibrated per machine.

:func:`calibrate` times a ranker's ``rank`` (either variant) on synthetic requests
(random catalogue items; a grid of history tokens x candidate counts x tokens per candidate) with its
current backend, and fits, by non-negative least squares on relative error,

    cost_ms = w . [1, batches, h, c, m*h, c*h, m*h*h/100]

where ``h`` is the history's tokens, ``m`` the candidates, ``c`` their tokens in total and ``batches`` the
forward passes (``ceil(m / bucket_size)``). The terms cover both modes: one-pass runs the history once
(``h``) and every candidate token attends to it (``c*h``); pairwise re-reads the history for every
candidate (``m*h``, and ``m*h*h`` for its attention). Requests are timed with the KV cache cold (the worst
case: the ranker's cache is cleared before each call) and, in the one-pass mode, also warm
(``cached_history=True``). The budget (:class:`LatencyConfig`, 3 s) bounds the measuring: once it is
spent, calibration stops after at least :data:`MIN_POINTS` grid points (in random order) and fits those,
so calibrating the 6-layer MiniLM ranker takes a few seconds on 2 cores (about 3-7 s, measured; longer
only when one grid point alone takes long).

A saved model (:meth:`LatencyModel.save`, JSON) records the machine (CPU count, processor, torch version),
backend and threads; loading it elsewhere raises :class:`~data.errors.ArtifactError` unless
``allow_mismatch=True``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from data.config import JsonConfig, require
from data.errors import ArtifactError, ConfigError
from data.io import atomic_write_json

KIND = "latency_model"
#: Grid points measured at least, whatever the budget (more than the fitted terms).
MIN_POINTS = 8
FEATURES = ("intercept", "batches", "history_tokens", "candidate_tokens", "candidates_x_history",
            "candidate_tokens_x_history", "candidates_x_history_sq")


@dataclass
class LatencyConfig(JsonConfig):
    """How :func:`calibrate` measures.

    Attributes:
        budget_s: seconds of measuring; when spent, measuring stops (after at least :data:`MIN_POINTS`
            grid points).
        history_tokens: history lengths (tokens, ``[CLS]``/``[SEP]`` included) of the grid; capped by what
            the ranker's ``TextConfig`` allows.
        candidates: candidate counts of the grid.
        candidate_tokens: tokens per candidate of the grid (items of the nearest lengths are drawn).
        repeats: timed calls per grid point (the median is fitted).
        warm: also time the one-pass mode with the history cached.
        seed: seed of the synthetic requests.
    """

    budget_s: float = 3.0
    history_tokens: tuple[int, ...] = (16, 48, 96)
    candidates: tuple[int, ...] = (2, 8, 32)
    candidate_tokens: tuple[int, ...] = (8, 24)
    repeats: int = 3
    warm: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.budget_s > 0, f"LatencyConfig.budget_s must be > 0, got {self.budget_s!r}")
        for name in ("history_tokens", "candidates", "candidate_tokens"):
            values = getattr(self, name)
            require(len(values) > 0 and all(isinstance(v, int) and v >= 1 for v in values),
                    f"LatencyConfig.{name} must be a non-empty tuple of integers >= 1, got {values!r}")
        require(isinstance(self.repeats, int) and self.repeats >= 1,
                f"LatencyConfig.repeats must be an integer >= 1, got {self.repeats!r}")


def machine_fingerprint() -> dict[str, Any]:
    """What a calibration depends on besides the backend: CPU count, processor and torch version."""
    return {"cpus": os.cpu_count(), "processor": platform.processor() or "", "machine": platform.machine(),
            "torch": torch.__version__}


def features(history_tokens: float, candidates: float, candidate_tokens: float,
             bucket_size: int) -> np.ndarray:
    """The fitted terms of one request (see the module docstring), in the order of :data:`FEATURES`."""
    h, m, c = float(history_tokens), float(candidates), float(candidate_tokens)
    return np.array([1.0, math.ceil(m / bucket_size), h, c, m * h, c * h, m * h * h / 100.0])


def _fit(rows: np.ndarray, ms: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Non-negative weights minimising the squared *relative* error (columns scaled for conditioning), with
    points off by more than 15% down-weighted (Huber-like, ``rounds`` refits): one timing disturbed by
    another process must not bend the whole fit."""
    scale = np.maximum(rows.max(axis=0), 1e-12)
    base = 1.0 / np.maximum(ms, 0.05)
    weight = base
    for _ in range(rounds):
        coef, _ = nnls((rows / scale) * weight[:, None], ms * weight)
        relative = np.abs((rows / scale) @ coef - ms) * base
        weight = base / np.sqrt(np.maximum(1.0, relative / 0.15))
    return coef / scale


@dataclass
class LatencyModel:
    """Predicted latency of a ranker's requests; see the module docstring.

    Attributes:
        backend: the ranker backend's name at calibration.
        threads: its intra-op threads.
        mode: the ranker's scoring mode.
        bucket_size: candidates per forward pass (the ranker's ``pass_size``: ``RankerConfig.bucket_size``
            in the pairwise mode, a whole request up to ``ONE_PASS_MAX_BUCKET`` in the one-pass mode).
        cold: weights of :data:`FEATURES`, KV cache cold.
        warm: the same with the history cached (one-pass mode; None: not measured).
        machine: :func:`machine_fingerprint` at calibration.
        meta: calibration facts (points, seconds, fit error).
    """

    backend: str
    threads: int
    mode: str
    bucket_size: int
    cold: list[float]
    warm: list[float] | None = None
    machine: dict[str, Any] = field(default_factory=machine_fingerprint)
    meta: dict[str, Any] = field(default_factory=dict)

    def predict_ms(self, history_tokens: int, candidates: int, candidate_tokens: int, *,
                   cached_history: bool = False) -> float:
        """Predicted ms of ranking ``candidates`` items of ``candidate_tokens`` tokens in total after a
        history of ``history_tokens`` tokens (0 for no candidates)."""
        if candidates <= 0:
            return 0.0
        coef = self.warm if cached_history and self.warm is not None else self.cold
        row = features(history_tokens, candidates, candidate_tokens, self.bucket_size)
        return float(row @ np.asarray(coef))

    def max_candidates(self, budget_ms: float, history_tokens: int, tokens_per_candidate: float, *, cap: int,
                       cached_history: bool = False) -> int:
        """The largest ``M <= cap`` whose predicted ms fits ``budget_ms`` (0 if not even one does); the
        prediction grows with ``M``, so this is a binary search."""
        def fits(m: int) -> bool:
            return self.predict_ms(history_tokens, m, round(m * tokens_per_candidate),
                                   cached_history=cached_history) <= budget_ms

        low, high = 0, max(0, int(cap))
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        return low

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "features": list(FEATURES), "backend": self.backend, "threads": self.threads,
                "mode": self.mode, "bucket_size": self.bucket_size, "cold": list(self.cold),
                "warm": None if self.warm is None else list(self.warm), "machine": self.machine,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LatencyModel:
        if values.get("kind") != KIND or values.get("features") != list(FEATURES):
            raise ArtifactError(f"not a latency model of this version (kind {values.get('kind')!r}, features "
                                f"{values.get('features')}); re-run calibrate")
        try:
            return cls(values["backend"], int(values["threads"]), values["mode"], int(values["bucket_size"]),
                       [float(v) for v in values["cold"]],
                       None if values.get("warm") is None else [float(v) for v in values["warm"]],
                       dict(values["machine"]), dict(values.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"latency model is incomplete ({exc}); re-run calibrate") from exc

    def check_ranker(self, ranker: Any, source: str | Path = "latency model") -> None:
        """Raise :class:`ArtifactError` unless this model was calibrated for ``ranker``'s mode, forward-pass
        size (``pass_size``) and backend: another shape of work makes its predictions meaningless."""
        here = (ranker.mode, ranker.pass_size, ranker.backend.name)
        if (self.mode, self.bucket_size, self.backend) != here:
            raise ArtifactError(
                f"{source}: calibrated for a {self.mode} ranker on {self.backend} scoring {self.bucket_size} "
                f"candidates per pass, but this ranker is {here[0]} on {here[2]} with {here[1]}; re-run "
                "ranking.latency.calibrate on it (or give no latency file: the recommender calibrates at load)"
            )

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, *, backend: str | None = None, threads: int | None = None,
             allow_mismatch: bool = False) -> LatencyModel:
        """Read a saved model; a different machine (or ``backend``/``threads`` when given) raises
        :class:`ArtifactError` unless ``allow_mismatch``."""
        path = Path(path)
        try:
            model = cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: cannot read a latency model ({exc}); re-run calibrate") from exc
        here = machine_fingerprint()
        problems = [f"machine {k}: saved {model.machine.get(k)!r}, here {v!r}" for k, v in here.items()
                    if model.machine.get(k) != v]
        if backend is not None and backend != model.backend:
            problems.append(f"backend: saved {model.backend!r}, asked {backend!r}")
        if threads is not None and threads != model.threads:
            problems.append(f"threads: saved {model.threads}, asked {threads}")
        if problems and not allow_mismatch:
            raise ArtifactError(f"{path}: latency model calibrated elsewhere ({'; '.join(problems)}); "
                                "re-run ranking.latency.calibrate here, or pass allow_mismatch=True to use "
                                "it anyway")
        return model


# ---- calibration --------------------------------------------------------------------------------
def synthetic_request(ranker: Any, history_tokens: int, candidates: int, candidate_tokens: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(history item ids, candidate item ids)``: random items, the history grown until it reaches
    ``history_tokens`` tokens (or the ranker's ``max_history_items``), candidates drawn among the items whose
    token length is nearest ``candidate_tokens`` (any ranker with ``history_token_count`` and
    ``candidate_lengths``)."""
    n = len(ranker.items)
    order = rng.permutation(n)
    cap = min(n, int(getattr(ranker, "max_history_items", n)))
    k = 1
    while k < cap and ranker.history_token_count(order[:k]) < history_tokens:
        k += 1
    lengths = np.asarray(ranker.candidate_lengths(), dtype=np.float64)
    nearest = np.argsort(np.abs(lengths - candidate_tokens) + rng.random(n) * 0.5, kind="stable")
    pool = nearest[:max(candidates, min(n, 4 * candidates))]
    picked = rng.choice(pool, size=candidates, replace=pool.size < candidates)
    return ranker.items.ids[order[:k]], ranker.items.ids[picked]


def calibrate(ranker: Any, config: LatencyConfig | None = None) -> LatencyModel:
    """Time ``ranker`` (its current backend) on the grid of ``config`` and fit a :class:`LatencyModel`.

    Clears the ranker's KV cache (cold timings need it empty). Takes about ``config.budget_s`` seconds
    (plus two warm-up calls, and more when :data:`MIN_POINTS` points alone take longer).
    """
    config = config or LatencyConfig()
    if len(ranker.items) == 0:
        raise ConfigError("calibrate: the ranker's catalogue is empty; build it over some items first")
    rng = np.random.default_rng(config.seed)
    grid = [(h, m, t) for h in config.history_tokens for m in config.candidates
            for t in config.candidate_tokens]
    requests = [synthetic_request(ranker, h, m, t, rng) for h, m, t in grid]
    shapes = [ranker.request_shape(hist, cands) for hist, cands in requests]
    warm = config.warm and ranker.mode == "one_pass"

    def timed(hist: np.ndarray, cands: np.ndarray, cold: bool) -> float:
        if cold:
            ranker.clear_cache()
        start = time.perf_counter()
        ranker.rank(hist, cands)
        return (time.perf_counter() - start) * 1000

    biggest = int(np.argmax([s["candidates"] * (s["history_tokens"] + 1) for s in shapes]))
    for _ in range(2):  # warm-up: allocators, one-off kernel selection
        timed(*requests[biggest], cold=True)
    cold_ms: list[list[float]] = [[] for _ in grid]
    warm_ms: list[list[float]] = [[] for _ in grid]
    order = rng.permutation(len(grid))  # a random order spreads a cut-short first pass over the grid
    start = time.perf_counter()
    for i in (i for _ in range(config.repeats) for i in order):
        measured = sum(1 for t in cold_ms if t)
        if time.perf_counter() - start > config.budget_s and measured >= min(len(grid), MIN_POINTS):
            break
        cold_ms[i].append(timed(*requests[i], cold=True))
        if warm:
            warm_ms[i].append(timed(*requests[i], cold=False))
    done = [i for i, t in enumerate(cold_ms) if t]
    rows = np.stack([features(**shapes[i], bucket_size=ranker.pass_size) for i in done])
    cold_y = np.array([np.median(cold_ms[i]) for i in done])
    cold = _fit(rows, cold_y)
    warm_coef = _fit(rows, np.array([np.median(warm_ms[i]) for i in done])) if warm else None
    backend = ranker.backend
    threads = int(getattr(backend, "threads", 0) or torch.get_num_threads())
    error = np.abs(rows @ cold - cold_y) / cold_y
    return LatencyModel(backend.name, threads, ranker.mode, ranker.pass_size, cold.tolist(),
                        None if warm_coef is None else warm_coef.tolist(),
                        meta={"points": len(done), "repeats": min(len(cold_ms[i]) for i in done),
                              "seconds": round(time.perf_counter() - start, 3),
                              "median_relative_error": float(np.median(error)), "config": config.to_dict()})
