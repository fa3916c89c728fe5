"""Training lists of the item-token reranker: every position of every training sequence, with hard
negatives from the retriever's candidates for that prefix.

* :func:`training_positions`: every ``(user, t)`` with at least ``min_history`` items before ``t``
  (about 88,000 on ml-latest-small), each used once per epoch.
* :func:`prefix_pools`: per position, the retriever's top ``K`` items for the prefix ``seq[:t]`` (the
  candidates the reranker would be given at that moment), never one of the user's own items (past or
  future: a future item is a positive, not a negative). The retriever saw these positions in training, so
  the positive is in the pool more often than at test time; the model never reads the retrieval score, so
  that only changes which negatives it sees, not what it may trust (the hybrid head that does read
  retrieval scores is fitted on validation, see :func:`ranking.item_trainer.fit_hybrid_head`).
* :class:`PositionBatches`: shuffled batches of lists ``(histories, items)`` with the positive in column 0,
  ``n_hard`` negatives drawn from the pool and ``n_uniform`` from the catalogue.

**False negatives from the unknown future.** A hard negative says "the retriever liked this item here and
the user did not take it". The training data can confirm that only for what the user did *later in the
training data*: the items a user takes right after the training window (in production: next week; in the
evaluation: the held-out items) are unknown, are exactly what the retriever ranks high for the user's last
prefixes, and so become hard negatives of the very histories that look most like the one served next. The
model then learns to push down the items the user is about to take. Measured on ml-latest-small: the
validation item sits in the hard pool of 26% of each user's last 20 positions, and training that way
*lowered* validation NDCG@10 as it went on (0.045 at step 500 to 0.041 at 4,000), while masking the held-out
items (a diagnostic only: it uses the future) raised it to 0.061. The fix uses no future: positions with
fewer than ``hard_horizon`` known later events in the training data draw no hard negatives (all uniform),
so a hard negative is always an item the user did not take over the next ``hard_horizon`` events.

Everything works in item rows of the ranker's catalogue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data.errors import DataValidationError
from data.vocab import IdVocab


def training_positions(seqs: Sequence[np.ndarray], min_history: int = 1) -> np.ndarray:
    """``(n, 2)`` int64 ``(user row, t)`` of every position with at least ``min_history`` items before it."""
    parts = [np.stack([np.full(s.size - min_history, u), np.arange(min_history, s.size)], axis=1)
             for u, s in enumerate(seqs) if s.size > min_history]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), dtype=np.int64)


def _queries(retriever: Any, prefixes: list[np.ndarray]) -> np.ndarray | None:
    """Query vectors of item-row prefixes (the retriever's rows), or ``None`` when it has no history query."""
    if hasattr(retriever, "encode_histories"):
        return retriever.encode_histories(prefixes)
    if getattr(retriever, "history_query", None) is None:
        return None
    out = [retriever.history_query(p) for p in prefixes]
    if any(q is None for q in out):
        return None
    return np.stack(out).astype(np.float32)


def prefix_pools(retriever: Any, seqs: Sequence[np.ndarray], positions: np.ndarray, items: IdVocab, k: int, *,
                 chunk: int = 4096, progress: bool = False) -> tuple[np.ndarray, float]:
    """``(pools, hit_rate)``: ``(n_positions, k)`` item rows (of ``items``), the retriever's top ``k`` for each
    prefix with the user's own items excluded (see the module docstring; ``-1`` pads when fewer remain),
    and the share of positions whose positive would rank inside that top ``k`` (what a validation list
    built from this retriever would hold; compare it with the validation lists' share to see the leak).

    The retriever must score by inner product of a history query and its item vectors (``item_factors``:
    the two-tower, ALS, BPR); one that reads no history (popularity) gives its popularity order."""
    if k < 1:
        raise DataValidationError(f"k must be >= 1, got {k}")
    ret_rows = retriever.items.rows(items.ids, missing="ignore")  # our row -> the retriever's row
    if (ret_rows < 0).any():
        raise DataValidationError("prefix_pools: the retriever's catalogue lacks some of the ranker's items; fit "
                                  "both on the same split")
    vectors = np.asarray(retriever.item_factors, dtype=np.float32)[ret_rows]  # in our row order
    popularity = np.asarray(getattr(retriever, "popularity", np.zeros(len(items))), dtype=np.float32)
    popularity = popularity[ret_rows] if popularity.size == retriever.items.ids.size else np.zeros(len(items))
    k = min(k, len(items))
    out = np.full((positions.shape[0], k), -1, dtype=np.int64)
    owned = [np.unique(s) for s in seqs]
    hits = 0
    for start in tqdm(range(0, positions.shape[0], chunk), desc="candidate pools", disable=not progress,
                      unit="chunk"):
        block = positions[start:start + chunk]
        prefixes = [ret_rows[seqs[u][:t]] for u, t in block]
        queries = _queries(retriever, prefixes) if vectors.ndim == 2 and vectors.shape[1] > 1 else None
        if queries is None:
            scores = np.broadcast_to(popularity, (block.shape[0], len(items))).copy()
        else:
            scores = queries @ vectors.T
        positive = np.array([scores[i, seqs[u][t]] for i, (u, t) in enumerate(block)])
        for i, (u, _) in enumerate(block):
            scores[i, owned[u]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        valid = np.isfinite(np.take_along_axis(scores, top, axis=1))
        out[start:start + block.shape[0]] = np.where(valid, top, -1)
        kth = np.take_along_axis(scores, top[:, -1:], axis=1)[:, 0]
        hits += int(np.sum(positive > kth))
    return out, hits / max(positions.shape[0], 1)


class PositionBatches:
    """Shuffled batches of training lists over every position, a fresh shuffle each epoch.

    ``next()`` returns ``(histories, items)``: ``batch_size`` item-row histories (oldest first) and a
    ``(batch_size, 1 + n_hard + n_uniform)`` array whose column 0 is the positive. Negatives are never one
    of the user's own items; hard ones are distinct draws from the position's pool.

    Args:
        seqs: per user row, the training item rows in time order.
        positions: from :func:`training_positions`.
        pools: from :func:`prefix_pools` (one row per position), or ``None`` for uniform negatives only.
        n_items: catalogue size.
        n_hard: hard negatives per list (capped by the pool).
        n_uniform: uniform negatives per list.
        batch_size: lists per batch.
        rng: the seeded generator.
        hard_horizon: positions with fewer known later events than this draw only uniform negatives (see the
            module docstring); 0 lets every position draw hard ones.
    """

    def __init__(self, seqs: Sequence[np.ndarray], positions: np.ndarray, pools: np.ndarray | None, n_items: int,
                 n_hard: int, n_uniform: int, batch_size: int, rng: np.random.Generator,
                 hard_horizon: int = 0) -> None:
        if positions.shape[0] == 0:
            raise DataValidationError("no training positions: every user needs more than min_history events")
        if pools is not None and pools.shape[0] != positions.shape[0]:
            raise DataValidationError(f"pools has {pools.shape[0]} rows for {positions.shape[0]} positions")
        self.seqs, self.positions, self.pools = seqs, positions, pools
        self.n_items, self.batch_size, self.rng = n_items, batch_size, rng
        self.hard_horizon = int(hard_horizon)
        self.n_hard = min(n_hard, pools.shape[1]) if pools is not None else 0
        self.n_uniform = n_uniform + (n_hard - self.n_hard)
        self.owned = [np.unique(s) for s in seqs]
        self.epoch = 0
        self.drawn = 0
        self._order = rng.permutation(positions.shape[0])
        self._cursor = 0

    @property
    def width(self) -> int:
        return 1 + self.n_hard + self.n_uniform

    def _uniform(self, user: int, size: int, taken: np.ndarray) -> np.ndarray:
        out = np.empty(0, dtype=np.int64)
        blocked = np.union1d(self.owned[user], taken)
        if self.n_items - blocked.size < size:
            raise DataValidationError("the catalogue is too small to draw distinct negatives; lower n_uniform")
        while out.size < size:
            draw = self.rng.integers(0, self.n_items, size=2 * (size - out.size) + 4)
            draw = draw[~np.isin(draw, blocked)]
            draw = np.unique(np.concatenate([out, draw]))
            out = draw if draw.size <= size else self.rng.choice(draw, size=size, replace=False)
        return out

    def next(self) -> tuple[list[np.ndarray], np.ndarray]:
        if self._cursor + self.batch_size > self._order.size:
            self._order = self.rng.permutation(self.positions.shape[0])
            self._cursor = 0
            self.epoch += 1
        index = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        self.drawn += index.size
        histories, lists = [], np.empty((index.size, self.width), dtype=np.int64)
        for i, p in enumerate(index.tolist()):
            user, t = self.positions[p]
            seq = self.seqs[user]
            histories.append(seq[:t])
            lists[i, 0] = seq[t]
            hard = np.empty(0, dtype=np.int64)
            if self.n_hard and seq.size - 1 - t >= self.hard_horizon:
                pool = self.pools[p]
                pool = pool[pool >= 0]
                hard = self.rng.choice(pool, size=min(self.n_hard, pool.size), replace=False)
            uniform = self._uniform(user, self.width - 1 - hard.size, hard)
            lists[i, 1:] = np.concatenate([hard, uniform])
        return histories, lists


__all__ = ["PositionBatches", "prefix_pools", "training_positions"]
