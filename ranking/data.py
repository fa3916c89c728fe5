"""Training lists and validation lists for the reranker, built from retrieval candidates.

* A **training list** is one position ``t`` of a user's training sequence: the history is the items
  before ``t``, the positive is item ``t``, and the negatives are mostly *hard* ones (drawn from the
  retriever's top ``hard_pool`` for that user, which never holds the user's own items) plus a few uniform
  ones from the catalogue. Positions are sampled from anywhere in the sequence, not only the last one
  (``position_weighting="linear"`` draws recent positions more often, as the held-out items are each
  user's latest), and fresh lists are drawn every epoch.
* A **validation list** is a user's whole training sequence as history and the retriever's top ``M`` as
  candidates; the held-out validation item is the target. Users whose target is outside the top ``M``
  get NDCG@10 = 0 whatever the order, so only lists that hold the target are kept, and the metric divides
  by the count of all users (:func:`reranked_ndcg`), which makes it exactly the reranked list's
  NDCG@10 over every validation user.

Everything here works in item *rows* of the ranker's catalogue vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.dataset import Interactions, sequences
from data.errors import DataValidationError
from data.protocol import Split
from data.vocab import IdVocab
from ranking.config import TrainerConfig


def stage_retriever(name: str, split: Split, stage: str, previous: Any = None, threads: int | None = None) -> Any:
    """A retriever with its default config whose users' histories are ``split.history(stage)``, for
    candidates and hard negatives: :func:`retrieval.fitting.fit_retriever` without a search.

    A model fitted on the validation history is reused for another stage when passed as ``previous`` and
    its registry entry serves a stage by reading the new histories (the two-tower: nothing is retrained).
    ``threads`` sets the two-tower's training threads (a speed setting only).
    """
    from retrieval.fitting import FitOptions, fit_retriever
    from retrieval.registry import spec

    if previous is not None and spec(name).test_stage == "history":
        return previous.set_history(split.history(stage))
    configs = {"two_tower": {"threads": threads}} if threads else None
    return fit_retriever(name, split, stage, configs=configs, options=FitOptions(tune=False, threads=1)).model


def user_sequences(data: Interactions, users: IdVocab, items: IdVocab) -> list[np.ndarray]:
    """Per user of ``users``, the item rows of their events in time order (items outside ``items`` skipped)."""
    frame = data.frame[data.frame["item_id"].isin(items.ids) & data.frame["user_id"].isin(users.ids)]
    return sequences(frame, users, items)


def retrieval_rows(retriever: object, user_ids: np.ndarray, k: int, items: IdVocab) -> np.ndarray:
    """``(n, k)`` item rows of the retriever's top ``k`` per user (seen items excluded; ``-1`` pads)."""
    ids, _ = retriever.retrieve(np.asarray(user_ids, dtype=np.int64), k, exclude_seen=True)
    ids = np.atleast_2d(ids)
    return items.rows(ids.ravel(), missing="ignore").reshape(ids.shape)


@dataclass
class TrainingLists:
    """Sampled training lists.

    Attributes:
        histories: per list, the history item rows (oldest first).
        items: ``(n, 1 + n_negatives)`` item rows; column 0 is the positive.
        users: ``(n,)`` the user row of each list.
    """

    histories: list[np.ndarray]
    items: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])


def sample_lists(seqs: Sequence[np.ndarray], pools: np.ndarray, n_items: int, config: TrainerConfig,
                 rng: np.random.Generator, users: np.ndarray | None = None) -> TrainingLists:
    """Draw training lists (see the module docstring).

    Args:
        seqs: per user row, the training item rows in time order.
        pools: ``(n_users, K)`` hard-negative pools (retrieval item rows, ``-1`` pads), one row per user row.
        n_items: catalogue size (uniform negatives are drawn from ``range(n_items)``).
        config: ``positions_per_user``, ``min_history``, ``position_weighting``, ``n_negatives``,
            ``hard_fraction``.
        rng: the generator (seeded by the caller).
        users: the user rows to draw from (default: all with enough history).
    """
    if pools.shape[0] != len(seqs):
        raise DataValidationError(f"pools has {pools.shape[0]} rows for {len(seqs)} user sequences")
    n_neg = config.n_negatives
    n_hard = round(n_neg * config.hard_fraction)
    if users is None:
        users = np.arange(len(seqs))
    histories: list[np.ndarray] = []
    lists: list[np.ndarray] = []
    owners: list[int] = []
    for u in users:
        seq = seqs[int(u)]
        positions = np.arange(config.min_history, seq.size)
        if positions.size == 0:
            continue
        weights = positions.astype(np.float64) if config.position_weighting == "linear" else None
        chosen = rng.choice(positions, size=min(config.positions_per_user, positions.size), replace=False,
                            p=None if weights is None else weights / weights.sum())
        seen = set(seq.tolist())
        pool = pools[int(u)]
        pool = pool[pool >= 0]
        pool = pool[~np.isin(pool, seq)]
        for t in np.sort(chosen):
            positive = int(seq[t])
            take = min(n_hard, pool.size)
            hard = rng.choice(pool, size=take, replace=False) if take else np.empty(0, np.int64)
            negatives = hard.tolist()
            taken = set(negatives) | seen
            while len(negatives) < n_neg:
                if len(taken) >= n_items:
                    raise DataValidationError("catalogue too small to draw distinct negatives; lower n_negatives")
                draw = int(rng.integers(0, n_items))
                if draw not in taken:
                    taken.add(draw)
                    negatives.append(draw)
            histories.append(seq[:t])
            lists.append(np.asarray([positive, *negatives], dtype=np.int64))
            owners.append(int(u))
    items = np.stack(lists) if lists else np.zeros((0, n_neg + 1), dtype=np.int64)
    return TrainingLists(histories, items, np.asarray(owners, dtype=np.int64))



class ListBatches:
    """Shuffled batches of training lists, drawn afresh (:func:`sample_lists`) whenever the drawn ones run out.

    The trainers' shared sampling loop: ``next()`` returns ``(histories, items)`` of ``batch_size`` lists;
    ``drawn`` counts every list drawn so far (all epochs).
    """

    def __init__(self, seqs: Sequence[np.ndarray], pools: np.ndarray, n_items: int, config: TrainerConfig,
                 rng: np.random.Generator, users: np.ndarray | None, batch_size: int) -> None:
        self.seqs, self.pools, self.n_items, self.config = seqs, pools, n_items, config
        self.rng, self.users, self.batch_size = rng, users, batch_size
        self.drawn = 0
        self._lists: TrainingLists | None = None
        self._cursor = 0

    def next(self) -> tuple[list[np.ndarray], np.ndarray]:
        if self._lists is None or self._cursor + self.batch_size > len(self._lists):
            lists = sample_lists(self.seqs, self.pools, self.n_items, self.config, self.rng, self.users)
            order = self.rng.permutation(len(lists))
            self._lists = TrainingLists([lists.histories[i] for i in order], lists.items[order], lists.users[order])
            self.drawn += len(lists)
            self._cursor = 0
        start, self._cursor = self._cursor, self._cursor + self.batch_size
        return self._lists.histories[start:self._cursor], self._lists.items[start:self._cursor]


@dataclass
class ListTrainingLog:
    """What a run over sampled lists did: the fields the reranker trainer (:class:`ranking.trainer.TrainingLog`)
    and the distiller (:class:`ranking.distill.DistillLog`) share; each adds its own.

    Attributes:
        steps: optimizer steps run.
        best_step: the step whose weights were kept (0: the starting weights, when evaluated at the start and
            never beaten; with no validation, the last step).
        best_metric: validation NDCG@10 of the reranked list at ``best_step``.
        retrieval_metric: validation NDCG@10 of the retrieval order (same users).
        stopped_early: patience ran out before the step budget.
        seconds: wall time, evaluations included.
        train_seconds: time in training steps only.
        lists_per_s: training lists per training second.
        n_train_lists: lists drawn (all passes).
        device: torch device.
        history: one record per evaluation (``step``, mean losses since the last, ``metric``, ``seconds``, and
            what the subclass logs).
    """

    steps: int = 0
    best_step: int = 0
    best_metric: float = float("nan")
    retrieval_metric: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0
    train_seconds: float = 0.0
    lists_per_s: float = 0.0
    n_train_lists: int = 0
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ValidationLists:
    """Reranking lists whose target is inside the candidates.

    Attributes:
        histories: per list, the history item rows (oldest first).
        candidates: ``(n, M)`` candidate item rows in retrieval order (``-1`` pads).
        target_col: ``(n,)`` the column of the target in ``candidates``.
        n_users: every evaluated user, including those whose target was not retrieved.
        retrieval_ndcg: NDCG@10 of the retrieval order over all ``n_users``.
        offsets: ``(n, M)`` fixed scores added to the cross-encoder's before ranking (the residual
            objective's retrieval offsets, :mod:`ranking.residual`); ``None`` ranks by the cross-encoder alone.
    """

    histories: list[np.ndarray]
    candidates: np.ndarray
    target_col: np.ndarray
    n_users: int
    retrieval_ndcg: float
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.candidates.shape[0])


def validation_lists(seqs: Sequence[np.ndarray], candidates: np.ndarray, targets: np.ndarray) -> ValidationLists:
    """Keep the users (rows of ``candidates``) whose target row is among their candidates.

    Args:
        seqs: per evaluated user, the history item rows (oldest first).
        candidates: ``(n, M)`` retrieval item rows per user.
        targets: ``(n,)`` the target item row per user (``-1``: unknown, never a hit).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    hit = (candidates == targets[:, None]) & (targets[:, None] >= 0)
    keep = np.flatnonzero(hit.any(axis=1))
    cols = hit[keep].argmax(axis=1)
    n = candidates.shape[0]
    retrieval = float((1.0 / np.log2(cols[cols < 10] + 2)).sum() / n) if n else 0.0
    return ValidationLists([seqs[i] for i in keep], candidates[keep], cols, n, retrieval)


def reranked_ndcg(scores: np.ndarray, target_col: np.ndarray, n_users: int, k: int = 10) -> float:
    """NDCG@k over ``n_users`` of lists reordered by ``scores`` (``(n, M)``, ``-inf`` pads), where row ``i``'s
    target sits in column ``target_col[i]``; users not listed count 0. Ties rank the target last."""
    if n_users <= 0:
        return 0.0
    scores = np.asarray(scores, dtype=np.float64)
    target = scores[np.arange(scores.shape[0]), target_col]
    rank = (scores >= target[:, None]).sum(axis=1) - 1  # 0-based; ties count against the target
    gains = np.where(rank < k, 1.0 / np.log2(rank + 2), 0.0)
    return float(gains.sum() / n_users)
