"""Soak test: a steady load with events for a bounded time on loopback; RSS, p99 over time, errors.

    python -m benchmarks.soak [--artifacts DIR] [--ranker DIR] [--seconds 120] [--rps 20] [--events-share 0.3]
                              [--windows 6] [--slow-clients 64]

Starts ``shortlist serve`` in a subprocess on a free loopback port with a durable event log (default
fsync policy), waits for ``/readyz``, and sends a steady open-loop load: ``--rps`` requests per second, a
share of them ``POST /events`` (random users, new ones included, catalogue items) and the rest ``POST
/recommend``. It reports, per time window, requests answered, p50/p99 latency, errors (anything but 200)
and the server's RSS (from ``/proc``), and the RSS at start and end. **RSS must stay flat**: the verdict
compares the last window's RSS with the first's (``rss_growth_mb``, ``rss_ratio``).

Then, with ``--slow-clients N``, it opens N connections that send headers and part of a body and stop,
and measures ``/healthz``, ``/readyz`` and ``/recommend`` latency while they hang (issue 14: the probes
must answer within 50 ms).

**Models**: ``--artifacts`` (default: ``artifacts`` when it has a ``LATEST``; else a popularity artifact is
trained on ml-latest-small under ``artifacts/soak`` in a few seconds). Writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_results
from pipeline.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "window_s", "answered", "events", "errors", "p50_ms", "p99_ms", "rss_mb"]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_artifact(args: argparse.Namespace) -> Path:
    if args.artifacts:
        return Path(args.artifacts)
    if (ROOT / "artifacts" / "LATEST").is_file():
        return ROOT / "artifacts"
    target = ROOT / "artifacts" / "soak"
    if not (target / "LATEST").is_file():
        from pipeline.config import TrainConfig
        from pipeline.train import train

        train(TrainConfig(model="popularity", tune=False, artifacts=str(target)), progress=False)
    return target


def start_server(artifact: Path, ranker: str | None, port: int, log_path: Path, events: Path) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "pipeline.serve", "--artifacts", str(artifact), "--port", str(port),
               "--threads", "1", "--event-log", str(events), "--watch-latest-s", "0"]
    if ranker:
        command += ["--ranker", ranker]
    with open(log_path, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not get ready in 300 s")
        time.sleep(0.5)


async def steady_load(url: str, pid: int, users: np.ndarray, items: np.ndarray, *, seconds: float, rps: float,
                      share: float, windows: int, seed: int = 0) -> list[dict[str, Any]]:
    import httpx

    rng = np.random.default_rng(seed)
    records: list[tuple[float, str, int, float]] = []
    rss: list[tuple[float, float]] = []
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=32)) as client:
        async def one(kind: str, body: dict[str, Any]) -> None:
            sent = time.perf_counter()
            try:
                status = (await client.post(f"/{kind}", json=body)).status_code
            except httpx.HTTPError:
                status = 0
            records.append((sent - start, kind, status, (time.perf_counter() - sent) * 1000))

        start = time.perf_counter()
        tasks = []
        next_at, n = 0.0, 0
        next_rss = 0.0
        while (now := time.perf_counter() - start) < seconds:
            if now >= next_rss:
                rss.append((now, rss_mb(pid)))
                next_rss += seconds / (windows * 4)
            if now >= next_at:
                user = int(rng.choice(users)) if rng.random() < 0.8 else int(10**9 + rng.integers(0, 10**6))
                if rng.random() < share:
                    tasks.append(asyncio.create_task(one("events", {"user_id": user,
                                                                    "item_id": int(rng.choice(items))})))
                else:
                    tasks.append(asyncio.create_task(one("recommend", {"user_id": user, "k": 10})))
                n += 1
                next_at = n / rps
            await asyncio.sleep(min(0.005, max(0.0, next_at - now)))
        await asyncio.gather(*tasks)
        rss.append((seconds, rss_mb(pid)))
    rows = []
    width = seconds / windows
    for w in range(windows):
        lo, hi = w * width, (w + 1) * width
        inside = [r for r in records if lo <= r[0] < hi]
        latency = np.array([r[3] for r in inside if r[2] == 200]) if inside else np.array([])
        window_rss = [v for t, v in rss if lo <= t <= hi]
        rows.append({"method": "soak", "window_s": f"{lo:.0f}-{hi:.0f}", "answered": int(latency.size),
                     "events": sum(1 for r in inside if r[1] == "events" and r[2] == 200),
                     "errors": sum(1 for r in inside if r[2] != 200),
                     "p50_ms": round(float(np.percentile(latency, 50)), 2) if latency.size else None,
                     "p99_ms": round(float(np.percentile(latency, 99)), 2) if latency.size else None,
                     "rss_mb": round(max(window_rss), 1) if window_rss else None})
    return rows


def slow_clients(url: str, port: int, count: int, user: int, probes: int = 20) -> list[dict[str, Any]]:
    """Latency of the probes and of /recommend while ``count`` connections hold a half-sent body."""
    import httpx

    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"user_id\": ")
        sockets.append(sock)
    time.sleep(0.5)
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            for method, path, body in (("GET", "/healthz", None), ("GET", "/readyz", None),
                                       ("POST", "/recommend", {"user_id": user, "k": 10})):
                times, codes = [], []
                for _ in range(probes):
                    sent = time.perf_counter()
                    response = client.request(method, path, json=body)
                    times.append((time.perf_counter() - sent) * 1000)
                    codes.append(response.status_code)
                rows.append({"method": f"{path} with {count} slow clients", "answered": codes.count(200),
                             "errors": probes - codes.count(200), "p50_ms": round(float(np.median(times)), 2),
                             "p99_ms": round(float(np.percentile(times, 99)), 2),
                             "max_ms": round(max(times), 2)})
    finally:
        for sock in sockets:
            sock.close()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=None)
    parser.add_argument("--ranker", default=None)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--rps", type=float, default=20.0)
    parser.add_argument("--events-share", type=float, default=0.3)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--slow-clients", type=int, default=64)
    args = parser.parse_args(argv)

    from pipeline.artifacts import load_artifact

    artifact = prepare_artifact(args)
    loaded = load_artifact(artifact)
    users, items = loaded.retriever.users.ids, loaded.retriever.items.ids
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    process = start_server(artifact, args.ranker, port, work / "server.log", work / "events.log")
    try:
        rows = asyncio.run(steady_load(url, process.pid, users, items, seconds=args.seconds, rps=args.rps,
                                       share=args.events_share, windows=args.windows))
        slow = slow_clients(url, port, args.slow_clients, int(users[0])) if args.slow_clients else []
    finally:
        process.terminate()
        process.wait(30)
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    from pipeline.event_log import read_events

    logged = sum(1 for _ in read_events(work / "events.log"))
    meta = {"artifact": str(artifact), "ranker": args.ranker, "seconds": args.seconds, "rps": args.rps,
            "events_share": args.events_share, "rss_start_mb": first, "rss_end_mb": last,
            "rss_growth_mb": round(last - first, 1), "rss_ratio": round(last / first, 3),
            "errors": sum(r["errors"] for r in rows), "events_acknowledged": sum(r["events"] for r in rows),
            "events_in_log": logged, "cpu_count": os.cpu_count(),
            "note": "client and server share the machine's cores"}
    print(markdown_table(rows, COLUMNS))
    if slow:
        print()
        print(markdown_table(slow, ["method", "answered", "errors", "p50_ms", "p99_ms", "max_ms"]))
    print(f"\nRSS {first} MiB -> {last} MiB ({meta['rss_growth_mb']:+} MiB, x{meta['rss_ratio']}); errors "
          f"{meta['errors']}; events acknowledged {meta['events_acknowledged']}, in the log {logged}")
    write_results("soak", rows + slow, meta)
    return {"rows": rows + slow, "meta": meta}


if __name__ == "__main__":
    main()
