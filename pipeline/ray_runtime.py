"""Starting and stopping a local Ray runtime for the ``--engine ray`` paths (the ``[ray]`` extra).

:func:`ray_session` joins a Ray runtime that is already up (``ray.init`` called by the caller, or
``RAY_ADDRESS`` pointing at a cluster) and leaves it running, or starts a local one with ``num_cpus``
and shuts it down on exit. Worker processes get the same thread limits as the driver, so the actors
never oversubscribe the cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from data.errors import ConfigError

#: Thread pools pinned in every Ray worker (torch, FAISS's OpenMP, BLAS).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def require_ray() -> Any:
    """``import ray``, or a :class:`~data.errors.ConfigError` naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--engine ray needs Ray: pip install 'shortlist[ray]' (ray[serve,data]), or use "
                          "--engine local") from exc
    return ray


def worker_env(threads: int = 1) -> dict[str, str]:
    """Environment of Ray workers: ``threads`` threads per pool, offline Hugging Face."""
    env = {name: str(threads) for name in THREAD_ENV}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1")})
    return env


@contextmanager
def ray_session(num_cpus: int | None = None, *, threads: int = 1) -> Iterator[Any]:
    """Yield the ``ray`` module with a runtime up; one started here (``num_cpus`` CPUs, no dashboard) is
    shut down on exit, one that was already up is left alone."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"num_cpus must be >= 1, got {num_cpus}")
    options: dict[str, Any] = {"runtime_env": {"env_vars": worker_env(threads)}, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):  # a local runtime; with RAY_ADDRESS ray.init joins that cluster
        options.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**options)
    try:
        yield ray
    finally:
        ray.shutdown()


__all__ = ["THREAD_ENV", "ray_session", "require_ray", "worker_env"]
