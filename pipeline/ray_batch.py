"""Batch candidates on Ray Data: ``shortlist candidates --engine ray``.

The users (every user of the artifact, or the ``user_id`` column of a Parquet file) become a Ray dataset
of blocks of ``batch_size`` users; :meth:`ray.data.Dataset.map_batches` sends them through a pool of
``workers`` stateful actors (:class:`CandidateActor`), each of which loads and verifies the artifact (and
the ranker and blend) once, then runs :class:`pipeline.batch.CandidateJob` on every batch: the very code
of the single-process path, so the rows are the same. The result is written as a Parquet dataset (a folder
of one file per block, read back whole with ``pandas.read_parquet(folder)``), atomically: to a temporary
folder beside ``out``, renamed when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.errors import DataValidationError
from pipeline.batch import BatchStats, read_users
from retrieval.base import check_k


@dataclass(frozen=True)
class CandidateSpec:
    """What every actor loads and runs (plain values, so it travels to the workers).

    Attributes:
        artifacts: the artifact root or version folder.
        k: candidates per user.
        exclude_seen: drop items in the user's stored history.
        ranker: a saved ranker folder (``None``: retrieval order only).
        rerank_m: candidates reranked per user.
        blend: a HybridBlend JSON file (``None``: the ranker's own head, if any).
        threads: torch/FAISS threads per actor.
    """

    artifacts: str
    k: int = 100
    exclude_seen: bool = True
    ranker: str | None = None
    rerank_m: int = 50
    blend: str | None = None
    threads: int = 1


class CandidateActor:
    """A Ray Data actor: loads and verifies the models once, then turns user batches into candidate rows."""

    def __init__(self, spec: CandidateSpec) -> None:
        import faiss
        import torch

        from pipeline.artifacts import load_artifact
        from pipeline.batch import CandidateJob

        torch.set_num_threads(spec.threads)
        faiss.omp_set_num_threads(spec.threads)
        retriever = load_artifact(spec.artifacts).retriever  # checksums and manifest verified here
        ranker = blend = None
        if spec.ranker:
            from ranking.loading import load_ranker

            ranker = load_ranker(spec.ranker, load_tokenizer=False)
        if spec.blend:
            from ranking.blend import HybridBlend

            blend = HybridBlend.load(spec.blend)
        self.job = CandidateJob.prepare(retriever, k=spec.k, exclude_seen=spec.exclude_seen, ranker=ranker,
                                        rerank_m=spec.rerank_m, blend=blend)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.job.frame(batch["user_id"].to_numpy(dtype=np.int64))


def generate_candidates_ray(
    artifacts: str | Path,
    out: str | Path,
    *,
    k: int = 100,
    users: np.ndarray | str | Path | None = None,
    batch_size: int = 1024,
    exclude_seen: bool = True,
    ranker: str | Path | None = None,
    rerank_m: int = 50,
    blend: str | Path | None = None,
    workers: int = 2,
    threads: int = 1,
) -> BatchStats:
    """Write the candidates of :func:`pipeline.batch.generate_candidates` with Ray Data; see the module.

    ``users`` is an array of user ids, a Parquet file with a ``user_id`` column, or ``None`` (every user
    of the artifact). ``workers`` actors with ``threads`` threads each run the batches (with a ranker,
    batches are cut to 64 users as in the single-process path). Uses the Ray runtime that is up, else starts
    a local one with ``workers * threads`` CPUs and stops it after (a runtime with fewer free CPUs than
    ``workers * threads`` leaves actors waiting). The artifact, ranker and blend are first loaded and
    verified once in this process, so a bad file fails here with the single-process message, before Ray
    starts. ``out`` becomes a folder of Parquet files; ``BatchStats.seconds`` covers the whole run, Ray's
    start-up included.
    """
    from pipeline.artifacts import load_artifact
    from pipeline.ray_runtime import ray_session

    k = check_k(k)
    for name, value in (("workers", workers), ("threads", threads), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataValidationError(f"{name} must be a positive integer, got {value!r}")
    if ranker is not None and (isinstance(rerank_m, bool) or not isinstance(rerank_m, (int, np.integer))
                               or rerank_m < 1):
        raise DataValidationError(f"rerank_m must be a positive integer, got {rerank_m!r}")
    out = Path(out)
    if out.is_file():
        raise DataValidationError(f"--out {out} is a file; the ray engine writes a folder of Parquet files: "
                                  "pass a new path or remove the file")
    # verified here before Ray starts (a bad artifact or ranker fails with the single-process path's message),
    # and the artifact resolved to one version folder, so every actor loads the same version even if LATEST moves meanwhile
    artifact = load_artifact(artifacts)
    artifacts = artifact.folder
    if users is None:
        users = artifact.retriever.users.ids
    elif isinstance(users, (str, Path)):
        users = read_users(users)
    users = np.asarray(users, dtype=np.int64)
    if ranker is not None or blend is not None:  # the ranker, blend and vocabularies checked here too
        from pipeline.batch import CandidateJob
        from ranking.loading import load_ranker

        loaded_blend = None
        if blend is not None:
            from ranking.blend import HybridBlend

            loaded_blend = HybridBlend.load(blend)
        CandidateJob.prepare(artifact.retriever, k=k, ranker=None if ranker is None else load_ranker(
            ranker, load_tokenizer=False), rerank_m=rerank_m, blend=loaded_blend)
    del artifact
    if ranker is not None:
        batch_size = min(batch_size, 64)
    spec = CandidateSpec(str(artifacts), k, exclude_seen, None if ranker is None else str(ranker), int(rerank_m),
                         None if blend is None else str(blend), int(threads))
    started = time.perf_counter()
    with ray_session(workers * threads, threads=threads) as ray:
        from data.io import atomic_path

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the rows come out in the users' order
        context.enable_progress_bars = True
        blocks = [pd.DataFrame({"user_id": users[i : i + batch_size]}) for i in range(0, users.size, batch_size)]
        dataset = ray.data.from_pandas(blocks or [pd.DataFrame({"user_id": np.empty(0, np.int64)})])
        actors = max(1, min(workers, len(blocks)))  # no actor that would get no block
        rows = dataset.map_batches(CandidateActor, fn_constructor_args=(spec,), batch_size=batch_size,
                                   batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
                                   num_cpus=threads)
        try:
            with atomic_path(out) as tmp:
                rows.write_parquet(str(tmp))
                if not tmp.exists():  # no users: still an (empty) dataset folder
                    tmp.mkdir()
        except Exception as exc:  # an actor's ShortlistError (bad ranker...) reaches the caller as itself
            error = domain_error(exc)
            if error is exc:
                raise
            raise error from exc
    seconds = time.perf_counter() - started
    written = count_rows(out)
    return BatchStats(users=int(users.size), rows=written, seconds=seconds,
                      users_per_second=users.size / seconds if seconds > 0 else float("inf"), path=out,
                      reranked_m=min(int(rerank_m), k) if ranker is not None else 0)


def domain_error(exc: BaseException) -> BaseException:
    """The first :class:`~data.errors.ShortlistError` in the chain of a Ray error (Ray wraps what an actor
    raised), else ``exc`` itself."""
    from data.errors import ShortlistError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ShortlistError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return exc


def count_rows(folder: str | Path) -> int:
    """Rows of a Parquet dataset folder, from the files' footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(folder).glob("*.parquet")))


__all__ = ["CandidateActor", "CandidateSpec", "count_rows", "domain_error", "generate_candidates_ray"]
