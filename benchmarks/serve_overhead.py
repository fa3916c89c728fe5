"""What Ray Serve costs per request, against ``shortlist serve`` (one uvicorn process), for the same app.

    python -m benchmarks.serve_overhead [--artifacts DIR] [--requests 500]

Trains (or takes) an ALS artifact of ml-latest-small, serves it with retrieval only (no reranker: the
overhead, not the model, is measured) through ``shortlist serve`` on loopback and through
``shortlist serve --engine ray``'s application (the router and one replica) and through one replica as
its own HTTP ingress (the router's hop, measured), sends the same sequential ``POST /recommend``
requests (keep-alive) to each, checks that the lists are the same, and reports p50/p99 latency, start-up
time (process start to ``/readyz`` 200; for Ray, ``ray.init`` plus deploy) and the resident memory of the
server processes. Writes ``benchmarks/results/serve_overhead.json``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import round_row, write_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def wait_ready(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def timed_requests(url: str, users: list[int], k: int) -> tuple[np.ndarray, list[list[int]]]:
    import httpx

    times, lists = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for user in users[:20]:  # warm the connection and the app
            client.post("/recommend", json={"user_id": user, "k": k})
        for user in users:
            started = time.perf_counter()
            response = client.post("/recommend", json={"user_id": user, "k": k})
            times.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            lists.append([i["item_id"] for i in response.json()["items"]])
    return np.asarray(times), lists


def row(method: str, times: np.ndarray, start_s: float, rss_mb: float) -> dict:
    return {"method": method, "requests": int(times.size), "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)), "mean_ms": float(times.mean()), "start_s": start_s,
            "rss_mb": rss_mb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=None, help="an artifact (default: train ALS on ml-latest-small)")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="shortlist-serve-overhead-"))
    artifacts = args.artifacts
    if artifacts is None:
        from pipeline.cli import main as cli

        artifacts = str(work / "artifacts")
        command = ["train", "--model", "als", "--no-tune", "--artifacts", artifacts]
        if args.data_path:
            command += ["--data-path", args.data_path]
        if cli(command) != 0:
            return 2
    from pipeline.artifacts import load_artifact

    ids = load_artifact(artifacts).retriever.users.ids
    users = [int(u) for u in np.random.default_rng(0).choice(ids, args.requests)]

    # one uvicorn process: `shortlist serve`
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--artifacts", artifacts, "--port", str(port),
                               "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "SHORTLIST_API_KEY": ""})
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        start_s = time.perf_counter() - started
        times, local_lists = timed_requests(f"http://127.0.0.1:{port}", users, args.k)
        rows = [row("shortlist serve (uvicorn, 1 process)", times, start_s, tree_rss_mb(server.pid))]
    finally:
        server.terminate()
        server.wait(30)

    # Ray Serve: one replica of the same app, behind the router (what `--engine ray` deploys), then the
    # replica as its own HTTP ingress (no router: what the router's extra hop costs)
    import ray
    from ray import serve

    from pipeline.ray_runtime import worker_env
    from pipeline.ray_serve import APP_NAME, ReplicaSpec, bind, deployment

    spec = ReplicaSpec(artifacts=artifacts, threads=1)
    apps = [("shortlist serve --engine ray (Ray Serve: router + 1 replica)", bind(spec, {"num_replicas": 1})),
            ("Ray Serve, 1 replica as the HTTP ingress (no router)",
             deployment().options(num_replicas=1).bind(spec.__dict__))]
    ray_lists = []
    for name, app in apps:
        port = free_port()
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": worker_env(1)})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(app, name=APP_NAME, route_prefix="/")
            wait_ready(f"http://127.0.0.1:{port}")
            start_s = time.perf_counter() - started
            times, lists = timed_requests(f"http://127.0.0.1:{port}", users, args.k)
            ray_lists.append(lists)
            rows.append(row(name, times, start_s, tree_rss_mb(os.getpid()) - tree_rss_mb_self()))
        finally:
            serve.shutdown()
            ray.shutdown()
    base = rows[0]["p50_ms"]
    for r in rows:
        r["p50_ratio"] = r["p50_ms"] / base
    same = min(sum(a == b for a, b in zip(local_lists, lists)) for lists in ray_lists)
    rows = [round_row(r, 3) for r in rows]
    from benchmarks.common import RESULTS

    write_results("serve_overhead", rows, {"artifacts": artifacts, "requests": args.requests, "k": args.k,
                                           "identical_lists": same},
                  ["method", "requests", "p50_ms", "p99_ms", "mean_ms", "p50_ratio", "start_s", "rss_mb"],
                  out_dir=Path(args.out_dir) if args.out_dir else RESULTS)
    print(f"\nidentical lists: {same} of {len(users)}")
    return 0 if same == len(users) else 1


def tree_rss_mb_self() -> float:
    """This (client) process's own resident memory, subtracted from the Ray tree (MB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
