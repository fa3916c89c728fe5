"""Residual training lists: the cross-encoder learns a correction on top of the retrieval score.

A plain listwise cross-encoder spends its capacity re-learning what the retriever already knows (popularity,
genre, the sequence), and on ml-latest-small it ends up a weaker copy of it (see the README). The residual
objective gives the retrieval score to the loss as a fixed offset::

    logit(candidate) = base(retrieval score, retrieval rank) + cross_encoder(history, candidate)

so the gradient only pushes the cross-encoder where the retrieval order is wrong.

**No leak**: the offsets must be what retrieval would say *without having seen the positive*. The retriever
used for candidates and validation was fitted on every training event, so its score of a training positive
is in-sample (too high). The lists here come from a *prefix retriever*, the same kind of retriever fitted
on each user's training sequence minus its last ``tail`` events; the lists are the positions inside that
tail (history = the events before the position, candidates = the prefix retriever's top ``M`` of that
history, positive = the event at the position), exactly as a validation list is built from the full
retriever and the held-out item. Items the user consumed at any other time are not candidates (they are
neither negatives nor unseen). Only lists whose positive is in the top ``M`` are kept, as in validation.

``base`` is a :class:`~ranking.blend.HybridBlend` without the cross-encoder feature (z-scored retrieval score
and log rank), fitted on these lists; the same weights give the validation offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data.dataset import Interactions
from data.errors import DataValidationError
from data.protocol import Split
from ranking.blend import HybridBlend


@dataclass
class ResidualLists:
    """Position lists with out-of-sample retrieval scores.

    Attributes:
        histories: per list, the history item rows (oldest first).
        candidates: ``(n, M)`` candidate item rows in retrieval order.
        retrieval: ``(n, M)`` retrieval scores (``-inf``: not a candidate).
        target_col: ``(n,)`` the positive's column.
        users: ``(n,)`` the user row of each list.
        n_positions: positions looked at (lists whose positive was outside the top ``M`` included).
    """

    histories: list[np.ndarray]
    candidates: np.ndarray
    retrieval: np.ndarray
    target_col: np.ndarray
    users: np.ndarray
    n_positions: int

    def __len__(self) -> int:
        return int(self.candidates.shape[0])


def drop_tail(data: Interactions, tail: int) -> Interactions:
    """``data`` without each user's last ``tail`` events (by time, then item)."""
    if tail < 1:
        raise DataValidationError(f"tail must be >= 1, got {tail}")
    f = data.frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    from_end = f.groupby("user_id").cumcount(ascending=False).to_numpy()
    return data.with_frame(f[from_end >= tail].reset_index(drop=True), name=f"{data.name}:prefix{tail}")


def fit_prefix_retriever(retriever: Any, split: Split, tail: int) -> Any:
    """A new retriever of ``retriever``'s class and config, fitted on ``split.train`` minus each user's last
    ``tail`` events (it must read histories: :meth:`history_query` or ``encode_histories``)."""
    prefix = drop_tail(split.train, tail)
    model = type(retriever)(retriever.config)
    return model.fit(prefix, items=split.items)


def query_vectors(retriever: Any, histories: list[np.ndarray]) -> np.ndarray:
    """Query vectors of item-row histories, batched where the retriever can."""
    if hasattr(retriever, "encode_histories"):
        return retriever.encode_histories(histories)
    out = []
    for h in histories:
        q = retriever.history_query(h)
        if q is None:
            raise DataValidationError(
                f"{type(retriever).__name__} cannot score a history; the residual objective needs a retriever "
                "that reads histories (two_tower, or one with history_query)")
        out.append(np.asarray(q, dtype=np.float32))
    return np.stack(out)


def position_lists(retriever: Any, seqs: list[np.ndarray], tail: int, m: int, min_history: int = 3,
                   batch: int = 512, progress: bool = True) -> ResidualLists:
    """The residual lists of the last ``tail`` positions of every sequence (see the module docstring).

    Args:
        retriever: the prefix retriever (its item rows are the rows of ``seqs``).
        seqs: per user row, the full training sequence (item rows, time order).
        tail: positions per user, counted from the end.
        m: candidates per list.
        min_history: a position needs at least this many events before it.
    """
    items = np.asarray(retriever.item_factors, dtype=np.float32)
    m = min(int(m), items.shape[0])
    positions = [(u, t) for u, s in enumerate(seqs) for t in range(max(min_history, s.size - tail), s.size)]
    histories, cands, scores, cols, owners = [], [], [], [], []
    for start in tqdm(range(0, len(positions), batch), desc="residual lists", disable=not progress):
        chunk = positions[start:start + batch]
        hist = [seqs[u][:t] for u, t in chunk]
        full = query_vectors(retriever, hist) @ items.T
        for row, (u, t) in enumerate(chunk):
            seq = seqs[u]
            target = int(seq[t])
            s = full[row]
            target_score = float(s[target])
            s[seq] = -np.inf  # every item of this user, at any time, is neither a negative nor unseen ...
            s[target] = target_score  # ... except the positive
            top = np.argpartition(-s, m - 1)[:m]
            top = top[np.argsort(-s[top], kind="stable")]
            hit = np.flatnonzero(top == target)
            if hit.size == 0:
                continue
            histories.append(hist[row])
            cands.append(top)
            scores.append(s[top])
            cols.append(int(hit[0]))
            owners.append(u)
    n = len(cands)
    return ResidualLists(histories, np.asarray(cands, dtype=np.int64).reshape(n, m),
                         np.asarray(scores, dtype=np.float64).reshape(n, m), np.asarray(cols, dtype=np.int64),
                         np.asarray(owners, dtype=np.int64), len(positions))


def fit_base(lists: ResidualLists) -> HybridBlend:
    """The retrieval-only blend fitted on ``lists``; its weights give the offsets.

    It is the hybrid blend with a constant cross-encoder feature (zeros: its z-score is 0, so its weight is
    0), i.e. a listwise fit of the z-scored retrieval score and the log rank."""
    return HybridBlend().fit(np.zeros_like(lists.retrieval), lists.retrieval, lists.target_col)


def residual_base(ranker: Any) -> HybridBlend | None:
    """The base blend a ranker trained with the residual objective carries in ``meta["residual_base"]`` (its
    scores are a correction to add to :func:`base_offsets`), else ``None``."""
    payload = (getattr(ranker, "meta", None) or {}).get("residual_base")
    return HybridBlend.from_dict(payload) if payload else None


def base_offsets(base: HybridBlend, retrieval: np.ndarray) -> np.ndarray:
    """``(n, M)`` offsets ``X @ w`` of the base blend (``-inf`` where retrieval is not finite)."""
    retrieval = np.asarray(retrieval, dtype=np.float64)
    X, valid, _ = base.features(np.zeros_like(retrieval), retrieval)
    return np.where(valid, X @ base.weights, -np.inf)


class ResidualBatches:
    """Shuffled batches of residual lists, reshuffled every pass: ``next()`` returns
    ``(histories, items, offsets, target_col)`` of ``batch_size`` lists; ``drawn`` counts lists served."""

    def __init__(self, lists: ResidualLists, offsets: np.ndarray, rng: np.random.Generator, batch_size: int) -> None:
        if len(lists) < batch_size:
            raise DataValidationError(
                f"only {len(lists)} residual lists for batch_size={batch_size}; raise residual_tail or lower "
                "batch_size")
        self.lists, self.offsets, self.rng, self.batch_size = lists, offsets, rng, batch_size
        self.drawn = 0
        self._order = np.empty(0, dtype=np.int64)
        self._cursor = 0

    def next(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        if self._cursor + self.batch_size > self._order.size:
            self._order = self.rng.permutation(len(self.lists))
            self._cursor = 0
        rows = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        self.drawn += rows.size
        lists = self.lists
        return ([lists.histories[i] for i in rows], lists.candidates[rows], self.offsets[rows],
                lists.target_col[rows])
