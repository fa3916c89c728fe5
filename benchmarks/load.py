"""Load test of the HTTP service on 127.0.0.1: latency under a budget, with and without micro-batching.

    python -m benchmarks.load [--artifacts DIR] [--ranker DIR] [--loads 5 10 20 40 80] [--seconds 15]
                              [--budget-ms 50] [--threads 1] [--backend torch] [--quality-users 100] [--quick]

For each mode (micro-batching on, and off: one rerank job per forward pass) the benchmark starts
``shortlist serve`` in a subprocess on a free loopback port (one uvicorn worker), waits for ``/readyz``,
and runs an **open-loop** asyncio ``httpx`` client: requests ``POST /recommend {user_id, k: 10,
budget_ms}`` for random users leave at Poisson arrival times of each offered load, whatever the answers
do. The client is **bounded**: at most ``--max-outstanding`` requests in flight; an arrival beyond that is
counted as dropped (not queued). Latency is measured from the moment a request is sent to its answer.
Per load it reports requests/s answered, p50/p95/p99 latency, the degraded fraction (retrieval order kept),
the shed fraction (429/503) and the mean shortlist size M, and per mode the **sustainable load**: the
highest offered load that, like every lower one, keeps p99 within ``budget_ms + 10`` ms with nothing shed
or dropped.

**Quality** (``--quality-users N``): N test users through ``POST /recommend`` (budget large enough for the
full shortlist, sequential requests) against the offline path on the same users (the same retrieval lists
reranked in batch by :func:`pipeline.batch.rerank_lists`): NDCG@10 of both and how many lists agree.

**Models**: ``--artifacts`` (default: ``artifacts`` when it has a ``LATEST`` version, else a pipeline
artifact built once under ``artifacts/load`` from ``artifacts/rerank/retriever-two_tower`` with the test
histories of ml-latest-small); ``--ranker`` (default: the fastest student under ``artifacts/rerank``, i.e.
the ``student*`` folder with the fewest layers, else ``two_tower-one_pass``). The client shares the
machine's cores with the server, which the meta records. Server logs go to ``artifacts/load_logs``.

Writes ``benchmarks/results/load.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, write_results
from pipeline.report import markdown_table

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "degraded_fraction",
           "shed_fraction", "mean_m"]
MODES = {"micro-batching": [], "no batching": ["--no-microbatch"]}


# ---- models ------------------------------------------------------------------------------------------
def layers_of(folder: Path) -> int:
    """Encoder layers of a saved ranker (from its manifest; a large number when unreadable)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return int(manifest["encoder_config"]["num_hidden_layers"])
    except (OSError, KeyError, ValueError, TypeError):
        return 10**6


def find_ranker(root: Path) -> Path | None:
    """The fastest student (fewest layers) under ``root``, else ``two_tower-one_pass``, else ``None``."""
    students = sorted((p for p in root.glob("student*") if (p / "manifest.json").is_file()),
                      key=lambda p: (layers_of(p), p.name))
    if students:
        return students[0]
    one_pass = root / "two_tower-one_pass"
    return one_pass if (one_pass / "manifest.json").is_file() else None


def prepare_artifact(args: argparse.Namespace) -> Path:
    """The pipeline artifact to serve (see the module docstring); built once when missing."""
    if args.artifacts:
        return Path(args.artifacts)
    default = ROOT / "artifacts"
    if (default / "LATEST").is_file():
        return default
    target = ROOT / "artifacts" / "load"
    if (target / "LATEST").is_file():
        return target
    source = ROOT / "artifacts" / "rerank" / "retriever-two_tower"
    if not (source / "manifest.json").is_file():
        raise SystemExit("benchmarks.load: no artifact found; run `shortlist train` (or python -m benchmarks.rerank) "
                         "first, or pass --artifacts")
    from pipeline.artifacts import save_artifact
    from retrieval.registry import load_retriever

    raw, split = load_split(args)
    retriever = load_retriever(source)
    retriever.set_history(split.history("test"))
    history = split.history("test")
    save_artifact(target, retriever, raw.items, config={"source": str(source)},
                  data={"name": DEFAULT_DATA, "fingerprint": history.fingerprint(), "stats": split.stats()},
                  metrics={}, version="two_tower-test-history")
    return target


def load_split(args: argparse.Namespace) -> tuple[Any, Any]:
    from pipeline.train import load_dataset, prepare_split

    raw = load_dataset(DEFAULT_DATA, args.data_path)
    return raw, prepare_split(raw)


# ---- the server --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(artifact: Path, ranker: Path | None, extra: Sequence[str], *, threads: int, budget_ms: float,
           log_path: Path, ready_timeout: float = 300.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """``shortlist serve`` in a subprocess on a free loopback port; yields its base URL once ready."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--artifacts", str(artifact), "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(threads), "--budget-ms", str(budget_ms), *extra]
    if ranker is not None:
        command += ["--ranker", str(ranker)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not ready within {ready_timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---- the client --------------------------------------------------------------------------------------
async def offered_load(url: str, users: np.ndarray, rate: float, seconds: float, *, budget_ms: float, k: int = 10,
                       max_outstanding: int = 64, seed: int = 0, headers: dict[str, str] | None = None
                       ) -> dict[str, Any]:
    """Open-loop Poisson arrivals at ``rate`` req/s for ``seconds``; per request status, latency and body."""
    import httpx

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 10)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]
    chosen = rng.choice(users, size=arrivals.size)
    outstanding = 0
    dropped = 0
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=max_outstanding)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0, headers=headers) as client:
        loop = asyncio.get_running_loop()
        origin = loop.time() + 0.05

        async def one(at: float, user: int) -> None:
            nonlocal outstanding, dropped
            await asyncio.sleep(max(0.0, origin + at - loop.time()))
            if outstanding >= max_outstanding:
                dropped += 1
                return
            outstanding += 1
            lateness = (loop.time() - origin - at) * 1000
            start = time.perf_counter()
            try:
                body = {"user_id": int(user), "k": k, "budget_ms": budget_ms}
                response = await client.post("/recommend", json=body)
                ms = (time.perf_counter() - start) * 1000
                body = response.json() if response.status_code == 200 else {}
                records.append({"status": response.status_code, "ms": ms, "lateness_ms": lateness,
                                "degraded": bool(body.get("degraded")), "m": int(body.get("reranked_m", 0)),
                                "reason": body.get("degraded_reason")})
            except httpx.HTTPError as exc:
                records.append({"status": 0, "ms": (time.perf_counter() - start) * 1000, "lateness_ms": lateness,
                                "error": type(exc).__name__})
            finally:
                outstanding -= 1

        started = time.perf_counter()
        await asyncio.gather(*(one(float(a), int(u)) for a, u in zip(arrivals, chosen)))
        wall = time.perf_counter() - started
    return {"records": records, "dropped": dropped, "sent": int(arrivals.size), "wall_s": wall}


def summarise(run: dict[str, Any], mode: str, rate: float, seconds: float) -> dict[str, Any]:
    """One table row of a load level."""
    records = run["records"]
    ok = [r for r in records if r["status"] == 200]
    shed = [r for r in records if r["status"] in (429, 503)]
    errors = [r for r in records if r["status"] not in (200, 429, 503)]
    ms = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
    reasons: dict[str, int] = {}
    for r in ok:
        if r["degraded"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    total = max(1, run["sent"])
    return {
        "method": f"{mode} @ {rate:g} req/s", "mode": mode, "offered_rps": float(rate),
        "achieved_rps": round(len(ok) / seconds, 2),
        "p50_ms": round(float(np.nanpercentile(ms, 50)), 2), "p95_ms": round(float(np.nanpercentile(ms, 95)), 2),
        "p99_ms": round(float(np.nanpercentile(ms, 99)), 2),
        "degraded_fraction": round(sum(r["degraded"] for r in ok) / max(1, len(ok)), 4),
        "degraded_reasons": reasons,
        "shed_fraction": round((len(shed) + run["dropped"]) / total, 4),
        "errors": len(errors), "sent": run["sent"], "answered": len(ok),
        "mean_m": round(float(np.mean([r["m"] for r in ok])) if ok else 0.0, 2),
        "client_lateness_p99_ms": round(float(np.percentile([r["lateness_ms"] for r in records], 99)), 2)
        if records else 0.0,
    }


def sustainable(rows: Sequence[dict[str, Any]], budget_ms: float, slack_ms: float = 10.0) -> float | None:
    """The highest offered load that, with every lower load, keeps p99 <= budget + slack with nothing shed
    or failed and (nearly) every request answered (``None`` when the lowest load already misses): a
    lower load that misses is not excused by a higher one that happens to pass."""
    best = None
    for r in sorted(rows, key=lambda r: r["offered_rps"]):
        if not (r["p99_ms"] <= budget_ms + slack_ms and r["shed_fraction"] == 0 and r["errors"] == 0
                and r["answered"] >= 0.98 * r["sent"]):
            break
        best = r["offered_rps"]
    return best


# ---- quality -----------------------------------------------------------------------------------------
def http_vs_offline(post: Callable[[dict[str, Any]], dict[str, Any]], retriever: Any, ranker: Any,
                    users: np.ndarray, relevant: Sequence[np.ndarray], n_items: int, *, m: int, retrieve_k: int,
                    k: int = 10, blend: Any = None, budget_ms: float = 10_000.0) -> dict[str, Any]:
    """NDCG@10 of the top-``k`` through ``post`` (one ``/recommend`` request body -> its JSON answer) against
    the offline path on the same ``users``: each user's retrieval top ``retrieve_k``, the top ``m`` reranked
    one user per call (:func:`pipeline.batch.rerank_lists`, histories as the retriever holds them)."""
    from data.metrics import evaluate_rankings
    from pipeline.batch import rerank_lists
    from pipeline.recommender import stored_history

    users = np.asarray(users, dtype=np.int64)
    online = np.full((users.size, k), -1, dtype=np.int64)
    paths: dict[str, int] = {}
    for row, user in enumerate(users):
        body = post({"user_id": int(user), "k": k, "budget_ms": budget_ms, "explain": False})
        got = [item["item_id"] for item in body["items"]]
        online[row, :len(got)] = got
        key = f"{body['path']} M={body['reranked_m']}" + (" degraded" if body["degraded"] else "")
        paths[key] = paths.get(key, 0) + 1
    ids, scores = retriever.retrieve(users, max(retrieve_k, k), exclude_seen=True)
    histories = []
    for user in users:
        h = stored_history(retriever, int(user))
        histories.append(h[ranker.items.rows(h, missing="ignore") >= 0] if h.size else h)
    # One list per call, as the service scores a request: the int8 backends quantize activations per
    # forward pass, so a batch of many users would give (slightly) different scores than single requests.
    offline = np.concatenate([rerank_lists(ranker, [histories[i]], ids[i:i + 1], scores[i:i + 1], m,
                                           blend=blend)[0] for i in range(users.size)])[:, :k]
    reports = {name: evaluate_rankings(lists, relevant, ks=(k,), n_items=n_items, n_boot=0)
               for name, lists in (("http", online), ("offline", offline))}
    same = int(np.all(online == offline, axis=1).sum())
    return {"users": int(users.size), f"NDCG@{k}_http": reports["http"].means[f"NDCG@{k}"],
            f"NDCG@{k}_offline": reports["offline"].means[f"NDCG@{k}"], "identical_lists": same,
            "paths": paths}


# ---- the run -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    started = time.perf_counter()
    artifact = prepare_artifact(args)
    ranker_dir = Path(args.ranker) if args.ranker else find_ranker(ROOT / "artifacts" / "rerank")
    print(f"artifact: {artifact}\nranker: {ranker_dir}")
    from pipeline.recommender import Recommender

    local = Recommender.load(artifact, ranker_dir, backend=args.backend)  # the offline twin, same backend
    users = local.retriever.users.ids
    logs = ROOT / "artifacts" / "load_logs"
    rows: list[dict[str, Any]] = []
    quality: dict[str, Any] | None = None
    server_args = ["--max-m", str(args.max_m), "--retrieve-k", str(args.retrieve_k), "--backend", args.backend]
    for mode, extra in MODES.items():
        if args.modes and mode not in args.modes:
            continue
        with server(artifact, ranker_dir, [*server_args, *extra], threads=args.threads, budget_ms=args.budget_ms,
                    log_path=logs / f"{mode.replace(' ', '_')}.log") as url:
            for _ in range(3):  # connection warm-up
                httpx.post(f"{url}/recommend", json={"user_id": int(users[0]), "k": 10}, timeout=30)
            if quality is None and args.quality_users and ranker_dir is not None:
                quality = quality_check(args, url, local)
                print(f"quality: {quality}")
            for rate in args.loads:
                result = asyncio.run(offered_load(url, users, rate, args.seconds, budget_ms=args.budget_ms,
                                                  max_outstanding=args.max_outstanding, seed=args.seed))
                row = summarise(result, mode, rate, args.seconds)
                rows.append(row)
                print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
    local.close()
    summary = {mode: sustainable([r for r in rows if r["mode"] == mode], args.budget_ms) for mode in MODES
               if any(r["mode"] == mode for r in rows)}
    meta = {
        "artifact": str(artifact), "ranker": str(ranker_dir), "ranker_layers": layers_of(ranker_dir) if ranker_dir
        else None, "budget_ms": args.budget_ms, "slack_ms": 10.0, "seconds_per_load": args.seconds,
        "loads": list(args.loads), "threads": args.threads, "backend": args.backend, "max_m": args.max_m, "retrieve_k": args.retrieve_k,
        "max_outstanding": args.max_outstanding, "client": "open-loop Poisson arrivals, asyncio httpx, 127.0.0.1",
        "cores_shared_with_client": os.cpu_count(), "load_average": os.getloadavg(),
        "sustainable_rps": summary, "quality": quality,
        "server_metrics": [line for line in metrics.splitlines() if line.startswith(
            ("shortlist_degraded_responses_total", "shortlist_rerank_batch_jobs_sum",
             "shortlist_rerank_batch_jobs_count", "shortlist_shed_requests_total"))],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"\n## POST /recommend load test (budget {args.budget_ms:g} ms, p99 target {args.budget_ms + 10:g} ms)\n")
    path = write_results(args.name, rows, meta, COLUMNS)
    print("\nsustainable load (req/s, p99 within budget + 10 ms, nothing shed): "
          + ", ".join(f"{mode}: {value}" for mode, value in summary.items()))
    if quality:
        print(f"quality on {quality['users']} test users: NDCG@10 HTTP {quality['NDCG@10_http']:.5f} vs offline "
              f"{quality['NDCG@10_offline']:.5f}; identical top-10 lists: {quality['identical_lists']}")
    print(f"wrote {path} in {meta['seconds']:.0f} s")
    return {"rows": rows, "meta": meta, "path": path}


def quality_check(args: argparse.Namespace, url: str, local: Any) -> dict[str, Any]:
    """:func:`http_vs_offline` on ``--quality-users`` random test users of ml-latest-small."""
    import httpx

    from retrieval.evaluate import targets_by_user

    _, split = load_split(args)
    users, relevant = targets_by_user(split, "test")
    known = np.isin(users, local.retriever.users.ids)
    users, relevant = users[known], [r for r, keep in zip(relevant, known) if keep]
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(users.size, size=min(args.quality_users, users.size), replace=False))
    with httpx.Client(base_url=url, timeout=60) as client:
        def post(body: dict[str, Any]) -> dict[str, Any]:
            response = client.post("/recommend", json=body)
            response.raise_for_status()
            return response.json()

        return http_vs_offline(post, local.retriever, local.ranker, users[pick], [relevant[i] for i in pick],
                               len(split.items), m=args.max_m, retrieve_k=args.retrieve_k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default=None, help="pipeline artifact to serve (default: see the docstring)")
    parser.add_argument("--ranker", default=None, help="ranker folder (default: the fastest student)")
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--loads", type=float, nargs="+", default=[5, 10, 20, 40, 80], help="offered req/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per load level")
    parser.add_argument("--budget-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--backend", default="onnx-int8",
                        help="the server's ranker backend (ranking.backends; onnx-int8 is the fastest on CPU)")
    parser.add_argument("--max-m", type=int, default=50, help="the server's cap on the shortlist size")
    parser.add_argument("--retrieve-k", type=int, default=200)
    parser.add_argument("--max-outstanding", type=int, default=64, help="client bound on requests in flight")
    parser.add_argument("--modes", nargs="*", default=None, choices=list(MODES), help="default: both")
    parser.add_argument("--quality-users", type=int, default=100, help="0 skips the quality check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="load", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 loads x 3 s, 20 quality users")
    args = parser.parse_args(argv)
    if args.quick:
        args.loads, args.seconds, args.quality_users = [5, 20], 3.0, min(args.quality_users, 20)
        args.name = "load_quick" if args.name == "load" else args.name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run(args)


if __name__ == "__main__":
    main()
