"""``shortlist serve``: load the recommender, set the threads, run the HTTP service with uvicorn.

    shortlist serve --artifacts artifacts --ranker auto --host 127.0.0.1 --port 8000

**Threads on 2 cores**: one uvicorn worker (one process, one event loop); request handlers run retrieval
(the query tower and FAISS) in the server's thread pool with ``--threads`` torch threads and one FAISS
OpenMP thread, and the micro-batcher's single worker thread runs the reranker with ``--threads`` torch
threads. ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are set before torch is imported, and torch's inter-op
pool is cut to one thread, so the web server, torch and FAISS never oversubscribe the cores.

The module is light to import (the CLI builds its parser from :func:`add_arguments`); FastAPI, uvicorn and
torch are imported when serving starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from data.errors import ArtifactError

log = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")


def configure_threads(threads: int = 1, faiss_threads: int = 1) -> None:
    """Pin torch (intra-op ``threads``, inter-op 1), FAISS OpenMP and the BLAS pools of this process.

    The environment variables only take effect when torch/FAISS are not imported yet, so call this first.
    """
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started: keep what is there
        log.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())
    try:
        import faiss

        faiss.omp_set_num_threads(faiss_threads)
    except ImportError:
        log.debug("faiss not installed; nothing to pin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options (shared by ``shortlist serve`` and ``python -m pipeline.serve``)."""
    parser.add_argument("--artifacts", "--artifact", dest="artifacts", default="artifacts",
                        help="pipeline artifact root (uses LATEST), a version folder, or a saved retriever folder")
    parser.add_argument("--ranker", default=None, metavar="auto|DIR",
                        help="a saved ranker folder, or auto: the student `shortlist train-ranker` wrote for the "
                             "artifact (none: retrieval order only)")
    parser.add_argument("--blend", default=None, help="a HybridBlend JSON file (cross-encoder + retrieval score)")
    parser.add_argument("--latency", default=None,
                        help="a saved latency model (default: calibrated at start-up)")
    parser.add_argument("--backend", default="torch", help="ranker scoring backend (torch, or one the ranker offers)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every model (2-core default: 1)")
    parser.add_argument("--budget-ms", type=float, default=None, help="default latency budget of a request")
    parser.add_argument("--max-m", type=int, default=None, help="the most candidates reranked per request")
    parser.add_argument("--retrieve-k", type=int, default=None, help="candidates retrieved per request")
    parser.add_argument("--max-batch", type=int, default=None, help="rerank jobs per micro-batch (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="micro-batch gathering wait")
    parser.add_argument("--no-microbatch", action="store_true", help="score every rerank job alone")
    parser.add_argument("--max-queue", type=int, default=None, help="rerank jobs queued before shedding")
    parser.add_argument("--max-in-flight", type=int, default=None, help="concurrent requests before shedding")
    parser.add_argument("--config", default=None, help="a RecommenderConfig JSON file (flags override it)")
    parser.add_argument("--service-config", default=None, help="a ServiceConfig JSON file (flags override it)")
    parser.add_argument("--no-warm-up", action="store_true", help="report ready without warming up")
    parser.add_argument("--event-log", default=None, metavar="FILE",
                        help="append POST /events to FILE before answering, replay it at start-up (default: "
                             "events in memory only)")
    parser.add_argument("--fsync", default=None, choices=("batch", "interval", "always", "never"),
                        help="event log fsync policy (default batch: group commit before each answer)")
    parser.add_argument("--body-timeout-s", type=float, default=None,
                        help="a request body must arrive within this many seconds (else 408)")
    parser.add_argument("--watch-latest-s", type=float, default=None,
                        help="poll the artifacts root's LATEST this often and hot-swap (0: off)")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: one uvicorn process (default); ray: Ray Serve replicas (the [ray] extra)")
    parser.add_argument("--serve-config", default=None,
                        help="--engine ray: a Serve config YAML (replicas, autoscaling; default: "
                             "pipeline/ray_serve.yaml)")


def configs_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(RecommenderConfig, ServiceConfig)`` from the files and flags of ``args``."""
    import dataclasses

    from pipeline.recommender_config import RecommenderConfig, ServiceConfig

    rec = RecommenderConfig.load(args.config) if args.config else RecommenderConfig()
    svc = ServiceConfig.load(args.service_config) if args.service_config else ServiceConfig()
    batch = rec.microbatch
    batch_changes = {k: v for k, v in {"max_batch": 1 if args.no_microbatch else args.max_batch,
                                       "max_wait_ms": 0.0 if args.no_microbatch else args.max_wait_ms,
                                       "max_queue": args.max_queue}.items() if v is not None}
    rec_changes = {k: v for k, v in {"budget_ms": args.budget_ms, "max_m": args.max_m,
                                     "retrieve_k": args.retrieve_k, "threads": args.threads}.items() if v is not None}
    if rec_changes.get("max_m") is not None and rec_changes["max_m"] < rec.min_m:
        rec_changes["min_m"] = rec_changes["max_m"]
    rec = dataclasses.replace(rec, microbatch=dataclasses.replace(batch, **batch_changes), **rec_changes)
    svc_changes = {k: v for k, v in {"max_in_flight": args.max_in_flight,
                                     "warm_up": False if args.no_warm_up else None,
                                     "body_timeout_s": getattr(args, "body_timeout_s", None),
                                     "watch_latest_s": getattr(args, "watch_latest_s", None)}.items()
                   if v is not None}
    event_changes = {k: v for k, v in {"path": getattr(args, "event_log", None),
                                       "fsync": getattr(args, "fsync", None)}.items() if v is not None}
    if event_changes:
        svc_changes["events"] = dataclasses.replace(svc.events, **event_changes)
    return rec, dataclasses.replace(svc, **svc_changes)


def build_app(args: argparse.Namespace) -> Any:
    """Load and verify the recommender (errors surface here, before the port opens) and wrap it in the app."""
    from pathlib import Path

    from pipeline.artifacts import LATEST, latest_version
    from pipeline.recommender import Recommender
    from pipeline.service import create_app

    rec_config, svc_config = configs_from_args(args)

    def load() -> Recommender:
        ranker = args.ranker
        if ranker == "auto":
            from pipeline.evaluate import resolve_ranker

            ranker = resolve_ranker("auto", args.artifacts)
            if ranker is None:
                raise ArtifactError(f"--ranker auto: no ranker trained for {args.artifacts}; run `shortlist "
                                    "train-ranker --artifacts ...` first, or serve without --ranker")
        loaded = Recommender.load(args.artifacts, ranker, blend=args.blend, latency=args.latency,
                                  config=rec_config, backend=args.backend)
        loaded.set_threads(max(1, args.threads))
        return loaded

    recommender = load()
    root = Path(args.artifacts)
    watch = (lambda: latest_version(root)) if (root / LATEST).is_file() else None
    return create_app(recommender, svc_config, reload=load, version=watch, owned=True)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (one uvicorn worker; ``--engine ray``: :func:`pipeline.ray_serve.run`)."""
    if getattr(args, "engine", "local") == "ray":
        from pipeline.ray_serve import run as run_on_ray

        return run_on_ray(args)
    configure_threads(max(1, args.threads))
    import uvicorn

    app = build_app(args)
    print(f"shortlist serve: http://{args.host}:{args.port} (ready when GET /readyz answers 200; the explorer "
          f"page is at http://{args.host}:{args.port}/)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.serve``: the same as ``shortlist serve``."""
    from pipeline.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
