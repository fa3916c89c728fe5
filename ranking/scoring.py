"""Batched scoring of many candidate lists: evaluation, validation during training, offline reranking.

:func:`score_lists` takes per-list histories (item rows, oldest first) and a ``(n, M)`` array of
candidate item rows (``-1`` pads short lists) and returns ``(n, M)`` scores (``-inf`` on padding), in
either mode, through any :class:`~ranking.backends.ScoringBackend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from data.errors import DataValidationError
from ranking.backends import ScoringBackend
from ranking.inputs import candidate_batch, history_batch, length_buckets, pairwise_batch
from ranking.text import ItemTokens


def score_lists(backend: ScoringBackend, tokens: ItemTokens, mode: str, histories: Sequence[np.ndarray],
                candidates: np.ndarray, *, batch_size: int = 64, progress: bool = False,
                desc: str = "rerank") -> np.ndarray:
    """Scores of every candidate of every list; see the module docstring.

    Rows are sorted by token length and cut into forward passes of ``batch_size`` rows (little padding);
    the one-pass mode runs the histories of about ``4 * batch_size`` candidates at once (at least one list).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != len(histories):
        raise DataValidationError(
            f"candidates must be a (lists, M) array with one row per history; got shape {candidates.shape} "
            f"for {len(histories)} histories"
        )
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    if candidates.size == 0:
        return out
    history_tokens = [tokens.history(h) for h in histories]
    pad = tokens.special.pad
    if mode == "pairwise":
        users, cols = np.nonzero(candidates >= 0)
        rows = tokens.candidates(candidates[users, cols])
        lengths = [history_tokens[u].size + r.size for u, r in zip(users, rows)]
        for index in tqdm(length_buckets(lengths, batch_size), desc=desc, unit="batch", disable=not progress):
            batch = pairwise_batch([history_tokens[users[i]] for i in index], [rows[i] for i in index], pad)
            out[users[index], cols[index]] = backend.score_pairs(batch)
        return out
    if mode != "one_pass":
        raise DataValidationError(f"mode must be 'pairwise' or 'one_pass', got {mode!r}")
    per_pass = max(1, (4 * batch_size) // max(1, candidates.shape[1]))
    starts = range(0, len(history_tokens), per_pass)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        lists = np.arange(s, min(s + per_pass, len(history_tokens)))
        local, cols = np.nonzero(candidates[lists] >= 0)
        if local.size == 0:
            continue
        h_ids, h_mask = history_batch([history_tokens[i] for i in lists], pad)
        state = backend.encode_history(h_ids, h_mask)
        rows = tokens.candidates(candidates[lists[local], cols])
        for index in length_buckets([r.size for r in rows], batch_size):
            c_ids, c_mask = candidate_batch([rows[i] for i in index], pad)
            owner = torch.as_tensor(local[index], dtype=torch.long)
            out[lists[local[index]], cols[index]] = backend.score_candidates(state, c_ids, c_mask, owner)
    return out
